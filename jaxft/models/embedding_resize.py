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
and load the grown state into it::

    graphdef, state = nnx.split(model)
    state = extend_embeddings(state, tok.vocab_size)
    model = build_model(dataclasses.replace(cfg, vocab_size=tok.vocab_size), rngs=nnx.Rngs(0))
    nnx.update(model, state)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
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


def extend_embeddings(state: nnx.State, new_vocab_size: int, *, init: str = "mean",
                      rng: jax.Array | None = None) -> nnx.State:
    """``state`` with every vocabulary-sized parameter grown to ``new_vocab_size``.

    ``rng`` seeds ``init="normal"`` (default ``jax.random.key(0)``).  The old
    vocabulary size is read from the state; a mismatch between parameters, or
    a ``new_vocab_size`` below it, is an error.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    flat = list(nnx.to_flat_state(state))
    targets: list[tuple[int, int, bool]] = []  # (index in flat, axis, bias)
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
    old_vocab = sizes.pop()
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
