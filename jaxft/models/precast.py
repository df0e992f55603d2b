"""Parameters cast once to the dtype their modules compute in, for a program that reads them many
times: a decoding loop.

`Linear` casts its kernel, and `Embed` its table, to the compute dtype (``model.dtype``) at every
call.  In a training step that is once per step, as it must be (the float32 parameters change).
In a decoding loop the parameters do not change, yet each step cast every float32 matrix to
bfloat16 again: compiled for an H200, the greedy loop of a 1B model read the float32 weights,
wrote bfloat16 copies and read those (8 bytes per parameter per token where the product needs 2);
XLA did not move the casts out of the loop.  `compute_dtype_states` casts those arrays once,
before the loop, which is the same arithmetic (the modules' own cast is then a no-op); norm scales,
biases and relative-position tables keep their dtype (their modules compute in float32).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models.layers import Embed, Linear
from jaxft.models.stacking import STACKED, _placeholders

# the arrays each module casts whole to its ``dtype`` before using them
_CAST_WHOLE = ((Linear, "kernel"), (Embed, "embedding"))


def compute_dtype_states(graphdef: nnx.GraphDef, states: tuple) -> tuple:
    """``states`` (per layer or stacked, `jaxft.models.stacking`) with every `Linear` kernel and
    `Embed` table cast to its module's compute dtype where that is narrower; the rest as is."""
    kinds = _compute_dtypes(graphdef, states)
    if not kinds:
        return tuple(states)

    def cast(path, leaf):
        dtype = kinds.get(_kind(path))
        if dtype is None or not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.dtype.itemsize <= dtype.itemsize:
            return leaf
        return leaf.astype(dtype)
    return tuple(jax.tree_util.tree_map_with_path(cast, s) for s in states)


def _compute_dtypes(graphdef: nnx.GraphDef, states: tuple) -> dict[tuple, Any]:
    """Parameter kind (its path without layer indices) -> compute dtype, for the kinds whose every
    module casts the whole array; a kind with two different dtypes is left out."""
    model = nnx.merge(graphdef, *(_placeholders(s) for s in states))
    out: dict[tuple, Any] = {}
    for path, node in nnx.iter_graph(model):
        for cls, name in _CAST_WHOLE:
            if isinstance(node, cls):
                kind = _kind(tuple(path) + (name,))
                dtype = jnp.dtype(node.dtype)
                out[kind] = dtype if out.get(kind, dtype) == dtype else None
    return {k: v for k, v in out.items() if v is not None}


def _kind(path: tuple) -> tuple:
    """A parameter's path without layer indices, the stacked marker and the Variable's value attribute."""
    names = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        if isinstance(key, int) or key in (STACKED, "value"):
            continue
        names.append(str(key))
    return tuple(names)
