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

Stacked storage (what the train state keeps with ``model.scan_layers``; `jaxft.models.stacking`,
re-exported here): `stack_layers` turns every stack of identical layers of a state
(``layers/{0..n-1}/...``) into one subtree ``layers/stacked/...`` whose arrays have a leading
layer axis, and `unstack_layers` undoes it.  `merged(graphdef, *states)` builds the model from such states: the per-layer modules hold only
shapes (computing with one is an error), and `run_layers` of a stacked stack
scans the stored arrays directly, so the step neither stacks the parameters nor unstacks their
gradients, and the optimizer updates one array per parameter kind: the program stops growing
with depth.  Paths outside the train state (HF import/export, adapters, sparse diffs) stay
per layer; the train code unstacks at those boundaries.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.models.cache import LayerSlot
from jaxft.models.dropout import dropout_rng, next_key
from jaxft.models.layers import REMAT_POLICIES, remat_call, scanned_body
from jaxft.models.stacking import (STACKED, _is_var, _layer_view, _placeholders, _stacks, has_stacks, holds_stacks,
                                   per_layer_abstract, restack_like, stack_layers, stack_like, stack_owned,
                                   unstack_layers, unstack_owned)
from jaxft.sharding import constrain

__all__ = ["run_layers", "is_stacked", "map_layers", "run_layers_cached", "merged",
           # stacked storage (`jaxft.models.stacking`), re-exported
           "STACKED", "has_stacks", "holds_stacks", "per_layer_abstract", "restack_like", "stack_layers", "stack_like",
           "stack_owned", "unstack_layers", "unstack_owned"]

log = logging.getLogger(__name__)
_WARNED: set[str] = set()
# id(layers container) -> the stacked states of those layers, while `merged` is active
_BOUND: contextvars.ContextVar[dict[int, tuple]] = contextvars.ContextVar("jaxft_stacked_layers", default={})


def run_layers(layers: Sequence[nnx.Module], fn: Callable, x: jax.Array, *args, remat: str,
               scan: bool, per_layer: tuple[np.ndarray, ...] = ()) -> jax.Array:
    """``x`` after every layer in order.  ``fn(layer, x, *args, *extra) -> x`` with ``extra``
    the i-th entries of ``per_layer`` (arrays with a leading axis of len(layers)): values that
    differ between layers, such as Gemma 2's local / global flag."""
    bound = _BOUND.get().get(id(layers))
    layers = list(layers)
    if bound is not None:
        if (why := _not_scannable(layers)) is not None:
            raise ValueError(f"stacked layers: {why}")
        return _scan(layers, fn, x, args, remat, per_layer, bound)
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
          per_layer: tuple[np.ndarray, ...], stored: tuple | None = None) -> jax.Array:
    graphdef = nnx.graphdef(layers[0])
    if stored is None:
        stacked = (_stack([nnx.state(layer) for layer in layers]),)
    else:  # stacked storage: the layer axis's metadata dropped, so a layer's Variables look unstacked
        stacked = _views(stored)
    keys = [next_key() for _ in layers]
    keys_N = None if keys[0] is None else jnp.stack(keys)
    extra_N = tuple(jnp.asarray(p) for p in per_layer)

    def one(state, key, x, extra, args):
        with dropout_rng(key), scanned_body():
            return fn(nnx.merge(graphdef, *state), x, *args, *extra)

    if remat != "none":
        one = jax.checkpoint(one, policy=REMAT_POLICIES[remat], prevent_cse=False)

    def body(x, xs):
        state, key, extra = xs
        return one(state, key, x, extra, args), None

    x, _ = jax.lax.scan(body, x, (stacked, keys_N, extra_N))
    return x


# --------------------------------------------------------------------------- incremental decoding


def is_stacked(layers: Sequence[nnx.Module]) -> bool:
    """Whether ``layers`` (a model's stack, inside `merged`) run from stacked storage."""
    return id(layers) in _BOUND.get()


def _views(stored: tuple) -> tuple:
    """Stacked states with each Variable's layer axis dropped from its metadata (a layer's view)."""
    return tuple(jax.tree.map(_layer_view, s, is_leaf=_is_var) for s in stored)


def _stored_views(layers: Sequence[nnx.Module]) -> tuple:
    """The stacked states bound to ``layers`` (`merged`), as `_views`."""
    return _views(_BOUND.get()[id(layers)])


def map_layers(layers: Sequence[nnx.Module], fn: Callable[[nnx.Module], Any]) -> Any:
    """``fn(layer)`` of every layer: a list for per-layer storage; for stacked storage one
    ``lax.map`` over the stored arrays, whose outputs carry a leading layer axis."""
    if not is_stacked(layers):
        return [fn(layer) for layer in layers]
    graphdef = nnx.graphdef(list(layers)[0])
    return jax.lax.map(lambda state: fn(nnx.merge(graphdef, *state)), _stored_views(layers))


def run_layers_cached(layers: Sequence[nnx.Module], fn: Callable, x: jax.Array, cache: Any,
                      cross: Any = None, per_layer: tuple[np.ndarray, ...] = ()) -> tuple[jax.Array, Any]:
    """Incremental decoding through a stack: ``fn(layer, x, layer_cache, layer_cross, *extra) ->
    (x, layer_cache)`` for every layer in order; returns (x, cache).

    Per-layer storage: a loop; ``cache`` and ``cross`` (or None) are sequences of per-layer
    caches.  Stacked storage: one scan over the stored arrays (the decode step does not grow
    with depth and nothing is unstacked); ``cache`` is one ``KVCache`` with a leading layer axis,
    carried by the scan and handed to each layer as a ``LayerSlot`` (written in place), and
    ``cross`` (stacked likewise, read only) is scanned.  ``per_layer`` as in `run_layers`."""
    if not is_stacked(layers):
        out = []
        for i, (layer, layer_cache) in enumerate(zip(layers, cache)):
            x, layer_cache = fn(layer, x, layer_cache, None if cross is None else cross[i], *(p[i] for p in per_layer))
            out.append(layer_cache)
        return x, tuple(out)
    graphdef = nnx.graphdef(list(layers)[0])

    def body(carry, xs):
        x, stack = carry
        state, i, layer_cross, extra = xs
        x, slot = fn(nnx.merge(graphdef, *state), x, LayerSlot(stack, i), layer_cross, *extra)
        return (x, slot.stack), None

    xs = (_stored_views(layers), jnp.arange(len(layers), dtype=jnp.int32), cross,
          tuple(jnp.asarray(p) for p in per_layer))
    (x, cache), _ = jax.lax.scan(body, (x, cache), xs)
    return x, cache


# --------------------------------------------------------------------------- models on stacked storage


@contextlib.contextmanager
def merged(graphdef: nnx.GraphDef, *states: Any) -> Iterator[nnx.Module]:
    """``nnx.merge(graphdef, *states)`` for states that may hold stacks (`stack_layers`).
    Inside the block, `run_layers` of each stacked stack scans the stored arrays (every state's part
    of that stack: e.g. an adapter's factors train while its base kernels are frozen)."""
    model = nnx.merge(graphdef, *(_placeholders(s) for s in states))
    found: dict[tuple, list] = {}
    for s in states:
        for path, sub in _stacks(s):
            found.setdefault(path, []).append(sub)
    bound = dict(_BOUND.get())
    for path, subs in found.items():
        node = model
        for k in path:
            node = node[k] if isinstance(k, int) else getattr(node, k)
        bound[id(node)] = tuple(subs)
    token = _BOUND.set(bound)
    try:
        yield model
    finally:
        _BOUND.reset(token)
