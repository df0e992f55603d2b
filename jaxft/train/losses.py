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


def chunked_token_losses(hidden_BLD: jax.Array, head_fn: Callable[[jax.Array], jax.Array],
                         targets_BL: jax.Array, weights_BL: jax.Array, *, chunk: int,
                         label_smoothing: float, z_loss: float) -> Sums:
    """`summed_token_losses(head_fn(hidden_BLD), ...)` without materialising [B, L, V].

    The sequence is padded (weight 0) to ``n`` chunks of ``C`` tokens (`chunk_layout`);
    the batch axis stays on the data axes and the vocabulary on the tensor axis
    (``head_fn`` constrains its logits as the full path does)."""
    B, L = hidden_BLD.shape[:2]
    n, C = chunk_layout(L, chunk)
    kw = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    if n == 1:  # one chunk: exactly today's computation, nothing to recompute
        return summed_token_losses(head_fn(hidden_BLD), targets_BL, weights_BL, **kw)
    pad = n * C - L
    w_BL = weights_BL.astype(jnp.float32)
    if pad:
        hidden_BLD = jnp.pad(hidden_BLD, ((0, 0), (0, pad), (0, 0)))
        targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
        w_BL = jnp.pad(w_BL, ((0, 0), (0, pad)))

    def by_chunk(x, logical):  # [B, n*C, ...] -> [n, B, C, ...], scanned over chunks
        x = x.reshape((B, n, C) + x.shape[2:]).swapaxes(0, 1)
        return constrain(x, (None,) + logical)

    xs = (by_chunk(hidden_BLD, ("batch", "length", "embed")), by_chunk(targets_BL, ("batch", "length")),
          by_chunk(w_BL, ("batch", "length")))

    # save only the chunk's inputs; the backward pass recomputes the chunk's logits
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_sums(h_BCD, t_BC, w_BC):
        h_BCD = constrain(h_BCD, ("batch", "length", "embed"))
        loss, zl, _ = summed_token_losses(head_fn(h_BCD), t_BC, w_BC, **kw)
        return loss, zl

    def body(carry, x):
        loss, zl = chunk_sums(*x)
        return (carry[0] + loss, carry[1] + zl), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, zl_sum), _ = jax.lax.scan(body, (zero, zero), xs)
    return loss_sum, zl_sum, jnp.sum(w_BL)
