"""Run a stack of layers: a Python loop (unrolled) or one ``jax.lax.scan`` (``model.scan_layers``).

Both compute ``x = fn(layer_i, x, *args, *per_layer_i)`` for i = 0..n-1 with the same
remat policy and the same dropout masks (each layer takes one ``next_key()`` draw, in
layer order, as its own nested stream).

The scan keeps the parameters where they are, one module per layer (``layers/{i}/...``
paths, so checkpoints, HF import/export and anything that wraps a module see the same model),
and stacks the layers' state along a new leading axis inside the traced program: the
scan body is traced and compiled once instead of n times, so compile time and the host
memory of compilation stop growing with depth.  The cost is one stacked copy of the
layer parameters per forward (sharded like the parameters: the layer axis is replicated,
every other axis keeps its logical sharding); see docs/decisions.md.

Layers of different structure (a wrapped module on some layers only) cannot share one trace: the
stack falls back to the loop, with one log line.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.models.dropout import dropout_rng, next_key
from jaxft.models.layers import REMAT_POLICIES, remat_call
from jaxft.sharding import constrain

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def run_layers(layers: Sequence[nnx.Module], fn: Callable, x: jax.Array, *args, remat: str,
               scan: bool, per_layer: tuple[np.ndarray, ...] = ()) -> jax.Array:
    """``x`` after every layer in order.  ``fn(layer, x, *args, *extra) -> x`` with ``extra``
    the i-th entries of ``per_layer`` (arrays with a leading axis of len(layers)): values that
    differ between layers, such as Gemma 2's local / global flag."""
    layers = list(layers)
    if scan and len(layers) > 1:
        why = _not_scannable(layers)
        if why is None:
            return _scan(layers, fn, x, args, remat, per_layer)
        if why not in _WARNED:
            _WARNED.add(why)
            log.warning("model.scan_layers: %s; running the layers unrolled", why)
    call = remat_call(fn, remat)
    for i, layer in enumerate(layers):
        x = call(layer, x, *args, *(jnp.asarray(p[i]) for p in per_layer))
    return x


def _not_scannable(layers: list[nnx.Module]) -> str | None:
    """Why these layers cannot run as one scan body (None: they can)."""
    def signature(layer):
        graphdef, state = nnx.split(layer)
        leaves, treedef = jax.tree.flatten(state)
        return graphdef, treedef, [(v.shape, v.dtype) for v in leaves]

    first = signature(layers[0])
    for i, layer in enumerate(layers[1:], 1):
        if signature(layer) != first:
            return f"layer {i} differs in structure from layer 0 (e.g. a wrapped module on some layers only)"
    return None


def _stack(states: list[nnx.State]) -> nnx.State:
    """The layers' states stacked on a new leading axis, each parameter constrained to its own
    logical sharding with the layer axis replicated."""
    def stack(*vs):
        out = jnp.stack([v[...] for v in vs])
        axes = vs[0].get_metadata().get("out_sharding")
        if axes is not None and len(axes) == out.ndim - 1:
            out = constrain(out, (None,) + tuple(axes))
        return vs[0].replace(out)

    is_var = lambda v: isinstance(v, nnx.Variable)  # noqa: E731
    return jax.tree.map(stack, *states, is_leaf=is_var)


def _scan(layers: list[nnx.Module], fn: Callable, x: jax.Array, args: tuple, remat: str,
          per_layer: tuple[np.ndarray, ...]) -> jax.Array:
    graphdef = nnx.graphdef(layers[0])
    stacked = _stack([nnx.state(layer) for layer in layers])
    keys = [next_key() for _ in layers]
    keys_N = None if keys[0] is None else jnp.stack(keys)
    extra_N = tuple(jnp.asarray(p) for p in per_layer)

    def one(state, key, x, extra, args):
        with dropout_rng(key):
            return fn(nnx.merge(graphdef, state), x, *args, *extra)

    if remat != "none":
        one = jax.checkpoint(one, policy=REMAT_POLICIES[remat], prevent_cse=False)

    def body(x, xs):
        state, key, extra = xs
        return one(state, key, x, extra, args), None

    x, _ = jax.lax.scan(body, x, (stacked, keys_N, extra_N))
    return x
