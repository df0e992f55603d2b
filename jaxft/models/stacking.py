"""Stacked storage of a model's layers: what the train state keeps with ``model.scan_layers``.

`stack_layers` turns every stack of identical layers of a state (``layers/{0..n-1}/...``) into one
subtree ``layers/stacked/...`` whose arrays have a leading layer axis (that axis replicated, every
other keeping its logical sharding), and `unstack_layers` undoes it.  `stack_owned` /
`unstack_owned` do the same for states nothing else holds, deleting each source array once it is
copied, so converting an 8B model's parameters never holds two copies of them.  The abstract and
checkpoint helpers (`per_layer_abstract`, `restack_like`) read and write per-layer layouts.
`jaxft.models.scan` runs the layers from this storage.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

STACKED = "stacked"  # the key of a stack's layers stored as one subtree with a leading layer axis


def _is_var(v: Any) -> bool:
    return isinstance(v, nnx.Variable)


def _axes(v: nnx.Variable) -> tuple | None:
    axes = v.get_metadata().get("out_sharding")
    return None if axes is None else tuple(axes)


def _layer_view(v: nnx.Variable) -> nnx.Variable:
    axes = _axes(v)
    return v if axes is None else v.replace(v[...], out_sharding=axes[1:])


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(tuple(x.shape), x.dtype) for x in leaves]


def _stackable(node: Mapping) -> bool:
    keys = list(node.keys())
    if len(keys) < 2 or sorted(keys, key=str) != sorted(range(len(keys)), key=str):
        return False
    first = _signature(node[0])
    return all(_signature(node[i]) == first for i in range(1, len(keys)))


def _stackable_paths(state: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, bool]]:
    """(path, stackable?) of every node keyed by integers (the stacks of layers) in ``state``."""
    if not isinstance(state, Mapping):
        return
    if state and all(isinstance(k, int) for k in state.keys()):
        yield prefix, _stackable(state)
        if _stackable(state):
            return
    for k, v in _items(state):
        yield from _stackable_paths(v, prefix + (k,))


def stack_layers(*states: Any, _values: Callable[[list], Any] = jnp.stack) -> tuple:
    """``states`` (nnx.States of one model, e.g. trainable and frozen) with each stack of identical
    layers (a node keyed 0..n-1, n >= 2, whose children match in structure, shapes and dtypes in
    every state that has it) stored as ``{STACKED: subtree}``, its arrays stacked on a new leading
    axis (sharding metadata: that axis replicated).  A stack that fails the test in any state
    stays per layer in all of them, so each stack is stacked everywhere or nowhere."""
    verdicts: dict[tuple, bool] = {}
    for state in states:
        for path, ok in _stackable_paths(state):
            verdicts[path] = verdicts.get(path, True) and ok
    chosen = {p for p, ok in verdicts.items() if ok}
    return tuple(_stack_at(s, chosen, _values) for s in states)


def stack_owned(*states: Any) -> tuple:
    """`stack_layers` of states whose per-layer arrays nothing else holds (e.g. the parameters
    just loaded into a model, the model dropped): each stacked array is built on its own and its
    layers' arrays deleted once it is, so the peak is the parameters plus one stacked array, not
    two copies of every stack.  Each stacked array keeps its layers' sharding, the layer axis
    replicated."""
    return stack_layers(*states, _values=lambda values: _stack_deleting(values))


def _stack_deleting(values: list) -> Any:
    out = jax.block_until_ready(_stacked(tuple(values), _stacked_sharding(values[0])))
    for v in values:
        if isinstance(v, jax.Array):
            v.delete()
    return out


@functools.partial(jax.jit, static_argnums=1)
def _stacked(values: tuple, sharding: NamedSharding | None) -> jax.Array:
    out = jnp.stack(values)
    return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)


def _full_spec(sharding: NamedSharding, ndim: int) -> tuple:
    """A sharding's PartitionSpec with an entry for every one of ``ndim`` dimensions."""
    return tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))


def _stacked_sharding(x: Any) -> NamedSharding | None:
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    return NamedSharding(sharding.mesh, PartitionSpec(None, *_full_spec(sharding, x.ndim)))


def _stack_at(state: Any, chosen: set, values: Callable[[list], Any] = jnp.stack, prefix: tuple = ()) -> Any:
    if not isinstance(state, Mapping):
        return state
    if prefix in chosen:
        def stack(*vs):
            value = values([v.get_value() if _is_var(v) else v for v in vs])
            axes = _axes(vs[0])
            return vs[0].replace(value) if axes is None else vs[0].replace(value, out_sharding=(None,) + axes)

        return _like(state, {STACKED: jax.tree.map(stack, *[dict(_items(state))[i] for i in range(len(state))], is_leaf=_is_var)})
    return _like(state, {k: _stack_at(v, chosen, values, prefix + (k,)) for k, v in _items(state)})


def _like(node: Mapping, items: dict) -> Mapping:
    """``items`` in a container of ``node``'s kind (nnx.State or dict: the tree structure is kept)."""
    return nnx.State(items) if isinstance(node, nnx.State) else items


def _items(node: Mapping):
    """A node's (key, child) pairs, children as stored (an nnx.State wraps nested dicts on access)."""
    return (node.raw_mapping if isinstance(node, nnx.State) else node).items()


def stack_like(state: Any, like: Any) -> Any:
    """``state`` (per layer; e.g. a mask of a stacked tree's parameters) stacked where ``like`` is."""
    return _stack_at(state, {path for path, _ in _stacks(like)})


def unstack_layers(state: Any, _value: Callable[[Any, int], Any] = lambda x, i: x[i]) -> Any:
    """`stack_layers` undone: per-layer subtrees ``0..n-1`` again (a state without stacks is returned as is)."""
    if not isinstance(state, Mapping):
        return state
    if set(state.keys()) == {STACKED}:
        sub = dict(_items(state))[STACKED]
        n = jax.tree.leaves(sub)[0].shape[0]

        def take(i):
            def one(v):
                if not _is_var(v):
                    return _value(v, i)
                axes, value = _axes(v), _value(v.get_value(), i)
                return v.replace(value) if axes is None else v.replace(value, out_sharding=axes[1:])
            return jax.tree.map(one, sub, is_leaf=_is_var)

        return _like(state, {i: take(i) for i in range(n)})
    return _like(state, {k: unstack_layers(v, _value) for k, v in _items(state)})


def unstack_owned(state: Any) -> Any:
    """`unstack_layers` of a state whose stacked arrays nothing else holds (e.g. just restored):
    each stacked array is deleted as soon as its layers are sliced out, so the peak is the
    parameters plus one array, not two copies of every stack."""
    parts: dict[int, list] = {}
    for _, sub in _stacks(state):
        for leaf in jax.tree.leaves(sub):
            parts[id(leaf)] = jax.block_until_ready([leaf[i] for i in range(leaf.shape[0])])
            if isinstance(leaf, jax.Array):
                leaf.delete()
    return unstack_layers(state, lambda x, i: parts[id(x)][i])


def has_stacks(state: Any) -> bool:
    """Whether ``state`` holds a stacked stack (`stack_layers`)."""
    return next(_stacks(state), None) is not None


def _stacks(state: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path of the stack, its stacked subtree) of every stack in ``state``."""
    if isinstance(state, Mapping):
        if set(state.keys()) == {STACKED}:
            yield prefix, dict(_items(state))[STACKED]
            return
        for k, v in _items(state):
            yield from _stacks(v, prefix + (k,))


def _placeholders(state: Any) -> Any:
    """``state`` with every stack as per-layer Variables holding only shapes and dtypes (what
    `nnx.merge` needs; no slice is traced per layer, and computing with one fails loudly)."""
    return unstack_layers(state, lambda x, i: jax.ShapeDtypeStruct(x.shape[1:], x.dtype))


def _is_state(x: Any) -> bool:
    return isinstance(x, nnx.State)


def _abstract_layer(x: jax.ShapeDtypeStruct, i: int) -> jax.ShapeDtypeStruct:
    """One layer of an abstract stacked array: the layer axis dropped from its shape and sharding."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*_full_spec(sharding, len(x.shape))[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


def holds_stacks(tree: Any) -> bool:
    """Whether any nnx.State in ``tree`` (e.g. a train state's checkpoint item) holds a stack."""
    return any(has_stacks(s) for s in jax.tree.leaves(tree, is_leaf=_is_state) if _is_state(s))


def per_layer_abstract(tree: Any) -> Any:
    """An abstract tree (ShapeDtypeStructs with shardings, e.g. a checkpoint's restore target) whose
    nnx.States hold stacks, with every stack as per-layer entries again: the layout of the same
    state without stacked storage."""
    return jax.tree.map(lambda s: unstack_layers(s, _abstract_layer) if _is_state(s) else s, tree, is_leaf=_is_state)


def restack_like(values: Any, targets: Any) -> Any:
    """``values`` (per-layer, e.g. restored with `per_layer_abstract(targets)`) in the layout and on
    the shardings of ``targets``: each nnx.State stacked where the target's is."""
    def restack(vals):
        return jax.tree.map(lambda v, t: stack_like(v, t) if _is_state(v) else v, vals, targets, is_leaf=_is_state)

    want = [getattr(t, "sharding", None) for t in jax.tree.leaves(targets)]
    shape = jax.eval_shape(restack, values)
    got = [(tuple(x.shape), x.dtype) for x in jax.tree.leaves(shape)]
    if got != [(tuple(t.shape), t.dtype) for t in jax.tree.leaves(targets)]:
        raise ValueError("restacked layers do not match the target's shapes")
    flat = jax.jit(lambda v: jax.tree.leaves(restack(v)), out_shardings=want)(values)
    return jax.tree.unflatten(jax.tree.structure(shape), flat)
