"""Dropout without threading RNGs through the models.

Models only call ``dropout(x, rate)``; the train step decides whether it acts by
tracing the model inside ``with dropout_rng(key):``.  Outside such a context
(eval, decoding, export) or at rate 0 ``dropout`` returns ``x`` itself, so those
programs are exactly the ones without dropout.

Inside a context the n-th ``dropout`` call (in trace order, counted from 0 at
context entry) draws its keep mask from ``fold_in(key, n)``: the masks are a pure
function of (key, model, config), and with ``jax_threefry_partitionable`` (on in
this JAX) they do not depend on how the array is sharded.  Each layer call
(`jaxft.models.layers.remat_call`) takes one draw, ``next_key()``, as its own
nested stream, passed in as an argument so a remat'd layer's reused trace stays right.

Modules keep their rates in attributes named in ``RATE_ATTRS``; ``has_dropout``
reads them, so a train step adds a key only when some rate is non-zero.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

RATE_ATTRS = ("dropout_rate", "attention_dropout_rate", "activation_dropout_rate")


@dataclasses.dataclass
class _Stream:
    key: jax.Array
    count: int = 0


_STREAM: contextvars.ContextVar[_Stream | None] = contextvars.ContextVar("jaxft_dropout_stream", default=None)


@contextlib.contextmanager
def dropout_rng(key: jax.Array | None) -> Iterator[None]:
    """Activate dropout for code traced inside (``key``: a typed PRNG key); None: no dropout."""
    token = _STREAM.set(None if key is None else _Stream(key))
    try:
        yield
    finally:
        _STREAM.reset(token)


def check_rate(name: str, rate: float) -> float:
    """``rate`` as a float if in [0, 1); else a ValueError naming the config key ``name``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}: must be in [0, 1), got {rate!r}")
    return float(rate)


def dropout_active(rate: float) -> bool:
    """Would ``dropout(x, rate)`` drop anything here (a stream is active and rate > 0)?"""
    return rate > 0.0 and _STREAM.get() is not None


def next_key() -> jax.Array | None:
    """One draw of the active stream as a key for a nested ``dropout_rng`` (None when none is
    active).  A function traced once and reused (``jax.checkpoint`` caches its trace across
    layers) takes its dropout key as an argument this way, not as trace-time state."""
    stream = _STREAM.get()
    if stream is None:
        return None
    n, stream.count = stream.count, stream.count + 1
    return jax.random.fold_in(stream.key, n)


def dropout(x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout: zero each entry with probability ``rate``, scale the rest by
    ``1 / (1 - rate)``; in x's dtype.  ``x`` unchanged outside ``dropout_rng`` or at rate 0."""
    stream = _STREAM.get()
    if stream is None or rate == 0.0:
        return x
    check_rate("dropout rate", rate)
    keep = jax.random.bernoulli(next_key(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype)).astype(x.dtype)


def has_dropout(model: nnx.Module) -> bool:
    """Does any submodule have a non-zero rate (an attribute in ``RATE_ATTRS``)?"""
    return any(getattr(m, a, 0.0) > 0.0 for _, m in nnx.iter_modules(model) for a in RATE_ATTRS)


_SALT = 0x64726F70  # "drop": keeps dropout keys apart from parameter-init keys of the same seed


def step_key(seed: int, step: jax.Array | int) -> jax.Array:
    """The dropout key of train step ``step`` (a function of ``train.seed`` and the step only)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _SALT), step)
