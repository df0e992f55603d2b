"""Token cross-entropy (+ z-loss, label smoothing), whole or chunked along the sequence.

`token_losses` takes full float32 logits_BLV.  `chunked_token_losses` takes the
last hidden states h_BLD and the model's head (``model.logits``: h [B, C, D] ->
float32 logits [B, C, V]) and computes the same summed losses over sequence
chunks of at most ``chunk`` tokens in a `jax.lax.scan` whose body is
`jax.checkpoint`-ed: the backward pass recomputes each chunk's logits instead of
storing them, so the step never holds more than one chunk's [B, C, V] logits
(and their gradient) instead of [B, L, V].  Same formulas, same sums up to float
summation order; a sequence that fits one chunk takes the plain, unchunked path.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxft.sharding import constrain

Sums = tuple[jax.Array, jax.Array, jax.Array]  # (loss_sum, z_loss_sum, weight_sum), float32


def token_losses(logits_BLV: jax.Array, targets_BL: jax.Array, label_smoothing: float,
                 z_loss: float) -> tuple[jax.Array, jax.Array]:
    """Per-token (loss, z_loss term), float32."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    nll_BL = log_z_BL - target_logit_BL
    if label_smoothing > 0:
        mean_logit_BL = jnp.mean(logits_BLV, axis=-1)
        smooth_BL = log_z_BL - mean_logit_BL  # cross-entropy against the uniform distribution
        nll_BL = (1.0 - label_smoothing) * nll_BL + label_smoothing * smooth_BL
    zl_BL = z_loss * jnp.square(log_z_BL)
    return nll_BL + zl_BL, zl_BL


def summed_token_losses(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array, *,
                        label_smoothing: float, z_loss: float) -> Sums:
    """Weighted sums of `token_losses` over all tokens: (loss_sum, z_loss_sum, weight_sum)."""
    loss_BL, zl_BL = token_losses(logits_BLV, targets_BL, label_smoothing, z_loss)
    w_BL = weights_BL.astype(jnp.float32)
    return jnp.sum(loss_BL * w_BL), jnp.sum(zl_BL * w_BL), jnp.sum(w_BL)


def chunk_layout(length: int, chunk: int) -> tuple[int, int]:
    """(n_chunks, chunk_len): the fewest chunks of at most ``chunk`` tokens, balanced so
    that the padding ``n_chunks * chunk_len - length`` is below ``n_chunks``."""
    if chunk < 1:
        raise ValueError(f"train.loss_chunk: must be >= 1 for the chunked loss, got {chunk}")
    n = max(1, math.ceil(length / chunk))
    return n, math.ceil(length / n)


def scan_chunks(fn: Callable[..., tuple[jax.Array, ...]], arrays: tuple[jax.Array, ...],
                logical: tuple[tuple[str | None, ...], ...], *, chunk: int) -> tuple[jax.Array, ...]:
    """``fn(*arrays)`` -- a tuple of sums over the sequence axis (scalars or per-row) -- computed over chunks of
    at most ``chunk`` tokens and added up.  Each array is [B, L, ...] with ``logical`` axis
    names for its chunks; padding to whole chunks is zeros, so ``fn`` must give padded
    tokens zero weight (a zero weights array does).  The chunk body is rematerialised:
    the backward pass recomputes what ``fn`` builds (the chunk's logits)."""
    B, L = arrays[0].shape[:2]
    n, C = chunk_layout(L, chunk)
    if n == 1:  # one chunk: the plain computation, nothing to recompute
        return fn(*arrays)
    pad = n * C - L

    def by_chunk(x, names):  # [B, L, ...] -> [n, B, C, ...], scanned over chunks
        if pad:
            x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        x = x.reshape((B, n, C) + x.shape[2:]).swapaxes(0, 1)
        return constrain(x, (None,) + names)

    xs = tuple(by_chunk(x, names) for x, names in zip(arrays, logical))

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_sums(*chunks):
        return fn(*(constrain(c, names) for c, names in zip(chunks, logical)))

    def body(carry, x):
        return tuple(a + b for a, b in zip(carry, chunk_sums(*x))), None

    zeros = tuple(jnp.zeros(o.shape, o.dtype) for o in jax.eval_shape(fn, *(x[0] for x in xs)))
    sums, _ = jax.lax.scan(body, zeros, xs)
    return sums


_H, _T = ("batch", "length", "embed"), ("batch", "length")


def chunked_token_losses(hidden_BLD: jax.Array, head_fn: Callable[[jax.Array], jax.Array],
                         targets_BL: jax.Array, weights_BL: jax.Array, *, chunk: int,
                         label_smoothing: float, z_loss: float) -> Sums:
    """`summed_token_losses(head_fn(hidden_BLD), ...)` without materialising [B, L, V]:
    `scan_chunks` over the sequence (the batch axis stays on the data axes and the
    vocabulary on the tensor axis: ``head_fn`` constrains its logits as the full path does)."""
    def sums(h_BCD, t_BC, w_BC):
        return summed_token_losses(head_fn(h_BCD), t_BC, w_BC, label_smoothing=label_smoothing, z_loss=z_loss)

    return scan_chunks(sums, (hidden_BLD, targets_BL, weights_BL.astype(jnp.float32)), (_H, _T, _T), chunk=chunk)


def token_kl(teacher_BLV: jax.Array, student_BLV: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Per-token KL(teacher || student) of the temperature-softened distributions, float32.
    ``top_k`` > 0: over the teacher's k most likely tokens only, both distributions
    renormalised over them (0 when the student agrees with the teacher there)."""
    t_BLV = teacher_BLV.astype(jnp.float32) / temperature
    s_BLV = student_BLV.astype(jnp.float32) / temperature
    if top_k:
        t_BLV, idx_BLK = jax.lax.top_k(t_BLV, top_k)
        s_BLV = jnp.take_along_axis(s_BLV, idx_BLK, axis=-1)
    logp, logq = jax.nn.log_softmax(t_BLV, axis=-1), jax.nn.log_softmax(s_BLV, axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def distill_token_sums(student_BLV: jax.Array, teacher_BLV: jax.Array, targets_BL: jax.Array,
                       weights_BL: jax.Array, *, alpha: float, temperature: float, top_k: int,
                       label_smoothing: float, z_loss: float) -> tuple[jax.Array, ...]:
    """(loss_sum, z_loss_sum, weight_sum, kl_sum): per target token
    ``(1 - alpha) * cross-entropy + z-loss + alpha * T^2 * KL(teacher || student)``; alpha 0 is
    `summed_token_losses` exactly.  The teacher's logits get no gradient."""
    loss_BL, zl_BL = token_losses(student_BLV, targets_BL, label_smoothing, z_loss)
    kl_BL = token_kl(jax.lax.stop_gradient(teacher_BLV), student_BLV, temperature, top_k)
    total_BL = (1.0 - alpha) * (loss_BL - zl_BL) + zl_BL + (alpha * temperature ** 2) * kl_BL
    w_BL = weights_BL.astype(jnp.float32)
    return jnp.sum(total_BL * w_BL), jnp.sum(zl_BL * w_BL), jnp.sum(w_BL), jnp.sum(kl_BL * w_BL)


def chunked_distill_sums(student_h_BLD: jax.Array, student_head: Callable[[jax.Array], jax.Array],
                         teacher_h_BLD: jax.Array, teacher_head: Callable[[jax.Array], jax.Array],
                         targets_BL: jax.Array, weights_BL: jax.Array, *, chunk: int,
                         **kw) -> tuple[jax.Array, ...]:
    """`distill_token_sums` of both models' logits, ``chunk`` tokens at a time (`scan_chunks`):
    neither model's [B, L, V] logits are ever held whole."""
    def sums(hs_BCD, ht_BCD, t_BC, w_BC):
        return distill_token_sums(student_head(hs_BCD), teacher_head(ht_BCD), t_BC, w_BC, **kw)

    return scan_chunks(sums, (student_h_BLD, teacher_h_BLD, targets_BL, weights_BL.astype(jnp.float32)),
                       (_H, _H, _T, _T), chunk=chunk)
