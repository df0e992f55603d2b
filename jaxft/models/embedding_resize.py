"""Grow a model's vocabulary: tree surgery on its parameter state.

After ``jaxft.data.vocab.extend_tokenizer`` appended pieces to the tokenizer,
``extend_embeddings`` grows every vocabulary-sized parameter to the new size:

* a path ending in ``embed/embedding`` ([vocab, embed]): new rows;
* a path ending in ``lm_head/kernel`` ([embed, vocab]): new columns;
* any other variable whose ``out_sharding`` metadata names a ``vocab`` axis
  (e.g. an encoder-decoder's shared table);
* a 1-D ``[vocab]`` bias (name containing ``bias``, e.g. ``lm_bias`` /
  ``final_logits_bias``): new entries are always 0.

New rows are initialised by ``init``: ``mean`` (the mean of the existing
rows: new tokens start as an "average" token, which keeps the output
distribution almost unchanged), ``normal`` (N(0, std of the existing
values)) or ``zeros``.  Existing entries and all metadata (logical axes, so
the result shards like the original) are unchanged, so logits of old tokens
on inputs made of old tokens are unchanged.

Rebuild the model with ``ModelConfig.vocab_size`` set to ``new_vocab_size``
and load the grown state into it (``remap_vocab`` is the general form: trimming,
reordering, and new rows as the mean of chosen old rows)::

    graphdef, state = nnx.split(model)
    state = extend_embeddings(state, tok.vocab_size)
    model = build_model(dataclasses.replace(cfg, vocab_size=tok.vocab_size), rngs=nnx.Rngs(0))
    nnx.update(model, state)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INITS = ("mean", "normal", "zeros")


def _names(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(p) for p in path)


def _axes(var: nnx.Variable) -> tuple[Any, ...]:
    axes = var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None
    return tuple(axes) if isinstance(axes, (tuple, list)) else ()


def _vocab_axis(path: tuple[str, ...], var: nnx.Variable) -> int | None:
    """The axis of ``var`` indexed by token id, or None."""
    ndim = len(getattr(var.get_value(), "shape", ()))
    if path[-2:] == ("embed", "embedding") and ndim == 2:
        return 0
    if path[-2:] == ("lm_head", "kernel") and ndim >= 2:
        return ndim - 1
    axes = _axes(var)
    if "vocab" in axes and len(axes) == ndim:
        return axes.index("vocab")
    return None


def _is_bias(path: tuple[str, ...], value: Any) -> bool:
    return value.ndim == 1 and "bias" in path[-1]


def _grow(value: jax.Array, axis: int, extra: int, init: str, bias: bool, key: jax.Array) -> jax.Array:
    old = jnp.asarray(value, jnp.float32)
    shape = list(old.shape)
    shape[axis] = extra
    if bias or init == "zeros":
        new = jnp.zeros(shape, jnp.float32)
    elif init == "mean":
        new = jnp.broadcast_to(old.mean(axis=axis, keepdims=True), shape)
    else:
        new = jax.random.normal(key, shape, jnp.float32) * old.std()
    return jnp.concatenate([old, new], axis=axis).astype(value.dtype)


def _vocab_targets(state: nnx.State) -> tuple[list, list[tuple[int, int, bool]], int]:
    """(flat state, [(index in flat, vocab axis, is a bias)], the vocabulary size) of ``state``."""
    flat = list(nnx.to_flat_state(state))
    targets: list[tuple[int, int, bool]] = []
    old_sizes: dict[str, int] = {}
    embed_sizes = [v.get_value().shape[0] for p, v in flat if _names(p)[-2:] == ("embed", "embedding")]
    for i, (p, var) in enumerate(flat):
        path, value = _names(p), var.get_value()
        if not hasattr(value, "shape"):
            continue
        axis = _vocab_axis(path, var)
        bias = _is_bias(path, value) and (axis == 0 or (bool(embed_sizes) and value.shape[0] == embed_sizes[0]))
        if axis is None and not bias:
            continue
        axis = 0 if bias else axis
        old_sizes["/".join(path)] = int(value.shape[axis])
        targets.append((i, axis, bool(bias)))
    if not targets:
        raise ValueError("no vocabulary parameter found (embed/embedding, lm_head/kernel or a 'vocab' axis)")
    sizes = set(old_sizes.values())
    if len(sizes) != 1:
        raise ValueError(f"vocabulary parameters disagree on the vocabulary size: {old_sizes}")
    return flat, targets, sizes.pop()


def vocab_size_of(state: nnx.State) -> int:
    """The number of rows of the state's vocabulary parameters."""
    return _vocab_targets(state)[2]


def extend_embeddings(state: nnx.State, new_vocab_size: int, *, init: str = "mean",
                      rng: jax.Array | None = None) -> nnx.State:
    """``state`` with every vocabulary-sized parameter grown to ``new_vocab_size``.

    ``rng`` seeds ``init="normal"`` (default ``jax.random.key(0)``).  The old
    vocabulary size is read from the state; a mismatch between parameters, or
    a ``new_vocab_size`` below it, is an error.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    flat, targets, old_vocab = _vocab_targets(state)
    if new_vocab_size < old_vocab:
        raise ValueError(f"new_vocab_size {new_vocab_size} is smaller than the model's {old_vocab}")
    if new_vocab_size == old_vocab:
        return state
    key = jax.random.key(0) if rng is None else rng
    for n, (i, axis, bias) in enumerate(targets):
        p, var = flat[i]
        grown = _grow(var.get_value(), axis, new_vocab_size - old_vocab, init, bias, jax.random.fold_in(key, n))
        flat[i] = (p, var.replace(grown))
    return nnx.from_flat_state(flat)


# --------------------------------------------------------------------------- remapping rows


def _fill(old_VX: jax.Array, shape: tuple[int, ...], init: str, bias: bool, fill_rows: int,
          key: jax.Array) -> jax.Array:
    if bias or init == "zeros":
        return jnp.zeros(shape, jnp.float32)
    if init == "mean":
        return jnp.broadcast_to(old_VX[:fill_rows].mean(axis=0, keepdims=True), shape)
    return jax.random.normal(key, shape, jnp.float32) * old_VX[:fill_rows].std()


def _remap_one(value: jax.Array, axis: int, bias: bool, index: np.ndarray, means: dict[int, list[int]],
               init: str, fill_rows: int, key: jax.Array) -> jax.Array:
    old_VX = jnp.moveaxis(jnp.asarray(value, jnp.float32), axis, 0)
    new_VX = old_VX[np.maximum(index, 0)]
    empty = (index < 0) & ~np.isin(np.arange(len(index)), list(means))
    if empty.any():
        where = empty.reshape((-1,) + (1,) * (old_VX.ndim - 1))
        new_VX = jnp.where(where, _fill(old_VX, new_VX.shape, init, bias, fill_rows, key), new_VX)
    if means:
        rows = np.asarray(list(means), np.int32)
        width = max(len(m) for m in means.values())
        ids_MK = np.zeros((len(rows), width), np.int32)
        w_MK = np.zeros((len(rows), width), np.float32)
        for r, m in enumerate(means.values()):
            ids_MK[r, :len(m)], w_MK[r, :len(m)] = m, 1.0 / len(m)
        w = w_MK.reshape(w_MK.shape + (1,) * (old_VX.ndim - 1))
        new_VX = new_VX.at[rows].set((old_VX[ids_MK] * w).sum(axis=1))
    return jnp.moveaxis(new_VX, 0, axis).astype(value.dtype)


def remap_vocab(state: nnx.State, index: Sequence[int], means: dict[int, Sequence[int]] | None = None, *,
                init: str = "mean", fill_rows: int | None = None, rng: jax.Array | None = None) -> nnx.State:
    """``state`` with every vocabulary parameter rebuilt with ``len(index)`` rows (trimming,
    reordering and growing in one gather).

    New row ``i`` is old row ``index[i]`` when ``index[i] >= 0``; else the mean of the old rows
    ``means[i]`` when given (e.g. the pieces a new piece's text splits into); else ``init``:
    ``mean`` (of the first ``fill_rows`` old rows: the real pieces, not padding; default all),
    ``normal`` (N(0, their std)) or ``zeros``.  A vocabulary bias is copied / averaged the same
    way, and 0 where ``init`` fills.  Metadata (logical axes) is unchanged.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    flat, targets, old_vocab = _vocab_targets(state)
    index_arr = np.asarray(index, np.int64).reshape(-1)
    means = {int(i): [int(j) for j in m] for i, m in (means or {}).items() if len(m)}
    used = [int(j) for j in index_arr if j >= 0] + [j for m in means.values() for j in m]
    if used and (max(used) >= old_vocab or min(used) < 0):
        raise ValueError(f"row ids must be in [0, {old_vocab}) (the model's vocabulary size)")
    if any(not 0 <= i < len(index_arr) or index_arr[i] >= 0 for i in means):
        raise ValueError("means: keys must be new rows whose index is -1")
    fill_rows = old_vocab if fill_rows is None else max(1, min(fill_rows, old_vocab))
    key = jax.random.key(0) if rng is None else rng
    for n, (i, axis, bias) in enumerate(targets):
        p, var = flat[i]
        new = _remap_one(var.get_value(), axis, bias, index_arr, means, init, fill_rows, jax.random.fold_in(key, n))
        flat[i] = (p, var.replace(new))
    return nnx.from_flat_state(flat)
