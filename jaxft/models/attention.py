"""Self-attention: RoPE (plain / linear / llama3 / yarn), ALiBi, GQA.

The pieces are split so a KV cache slots in between them:

- ``Attention`` (module) projects x to q/k/v, applies RoPE, optionally writes
  k/v to a ``KVCache`` and reads all cached slots, calls ``attend`` and
  projects back: the full forward and incremental decoding are one code path;
- ``attend(q, k, v, mask, bias)`` is the pure attention function;
- the masks live in ``jaxft.models.masks`` and the caches (``KVCache``,
  ``DecodeCache``) in ``jaxft.models.cache``; both are re-exported here.

Shapes: B batch, L query length, S key length, H query heads, G kv heads,
R = H // G heads per kv group, K head_dim, D d_model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.config.schema import ModelConfig, RopeScalingConfig
from jaxft.models.cache import CACHE_AXES, DecodeCache, KVCache, encoder_decoder_cache, through_cache
from jaxft.models import kernels
from jaxft.models.dropout import check_rate, dropout, dropout_active
from jaxft.models.kernels import SegmentMask
from jaxft.models.layers import HEADS, Linear, softcap
from jaxft.models.masks import (attention_mask, bidirectional_segment_mask, causal_segment_mask,
                                cross_attention_mask, fold_rows, is_local_layer, sliding_window_mask)
from jaxft.sharding import constrain

__all__ = ["CACHE_AXES", "Attention", "DecodeCache", "KVCache", "alibi_bias", "alibi_slopes", "apply_rope",
           "attend", "attention_mask", "bidirectional_segment_mask", "causal_segment_mask",
           "cross_attention_mask", "encoder_decoder_cache", "is_local_layer", "rope_inv_freq",
           "rope_tables", "rotate", "sliding_window_mask"]
KV_HEADS = ("batch", "length", "kv_heads", "head_dim")

# --------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float,
                  scaling: RopeScalingConfig | None) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim // 2] and the cos/sin scale ("attention factor").

    Follows HF ``modeling_rope_utils``: ``linear`` divides every frequency by
    ``factor``; ``llama3`` divides only the low frequencies (wavelength above
    ``original_max_position / low_freq_factor``) and interpolates smoothly in the
    band between; ``yarn`` blends interpolated and extrapolated frequencies with a
    linear ramp between the correction dims of ``beta_fast``/``beta_slow`` and
    scales cos/sin by ``0.1 ln(factor) + 1``.  Computed in float64 on the host.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / theta ** exponents
    if scaling is None:
        return inv_freq, 1.0
    factor = scaling.factor
    if scaling.type == "linear":
        return inv_freq / factor, 1.0
    if scaling.type == "llama3":
        old_len = scaling.original_max_position
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled), 1.0
    if scaling.type == "yarn":
        def correction_dim(rotations: float) -> float:
            return (head_dim * math.log(scaling.original_max_position / (rotations * 2 * math.pi))
                    / (2 * math.log(theta)))
        low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
        high = min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(head_dim // 2) - low) / (high - low), 0.0, 1.0)
        extrapolation_weight = 1.0 - ramp
        inv_freq = inv_freq / factor * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        return inv_freq, attention_factor
    raise ValueError(f"model.rope_scaling.type: unknown {scaling.type!r}; known: linear, llama3, yarn")


def rope_tables(positions_BL: jax.Array, inv_freq: np.ndarray,
                attention_factor: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The rotation's cos and sin at every position: float32 [B, L, head_dim // 2] each.

    A decoder computes them once per forward (or decode step) and hands them to every layer;
    `kernels.materialized` keeps XLA:CPU from evaluating sin / cos again inside each layer's q and
    k rotation, per element of [B, L, heads, head_dim] (16 such fusions in a 4-layer train step).
    """
    angles_BLk = positions_BL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    return kernels.materialized((jnp.cos(angles_BLk) * attention_factor, jnp.sin(angles_BLk) * attention_factor))


def rotate(x_BLHK: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate-half RoPE (HF LLaMA/Gemma layout: the two halves of head_dim pair up) with the
    ``rope_tables`` of x's positions."""
    cos, sin = (t[:, :, None, :] for t in tables)
    x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHK.dtype)


def apply_rope(x_BLHK: jax.Array, positions_BL: jax.Array, inv_freq: np.ndarray,
               attention_factor: float = 1.0) -> jax.Array:
    """``rotate`` with tables computed here (callers that rotate several tensors share one
    ``rope_tables`` instead)."""
    return rotate(x_BLHK, rope_tables(positions_BL, inv_freq, attention_factor))


# --------------------------------------------------------------------------- ALiBi


def alibi_slopes(n_heads: int) -> np.ndarray:
    """Standard ALiBi slopes (Press et al.; BLOOM), incl. non-power-of-2 head counts."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = base ** np.arange(1, closest + 1, dtype=np.float64)
    if closest != n_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        n_extra = min(closest, n_heads - closest)
        slopes = np.concatenate([slopes, extra_base ** np.arange(1, 1 + 2 * n_extra, 2, dtype=np.float64)])
    return slopes


def alibi_bias(q_positions_BL: jax.Array, kv_positions_BS: jax.Array, n_heads: int) -> jax.Array:
    """bias_BHLS = slope_h * (pos_k - pos_q): relative, so packed rows work; float32.

    BLOOM adds ``slope * pos_k``; per query row this differs by a constant, which
    softmax ignores.  n query rows per key row (beams / samples of one input): folded,
    [B, H, n x L, S] (`jaxft.models.masks.fold_rows`).
    """
    q_positions_BL = fold_rows(q_positions_BL, kv_positions_BS.shape[0])
    rel_BLS = (kv_positions_BS[:, None, :] - q_positions_BL[:, :, None]).astype(jnp.float32)
    slopes_H = jnp.asarray(alibi_slopes(n_heads), jnp.float32)
    return slopes_H[None, :, None, None] * rel_BLS[:, None, :, :]


# --------------------------------------------------------------------------- attention


def attend(q_BLHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, *, mask_B1LS: jax.Array | SegmentMask,
           bias_BHLS: jax.Array | None = None, logit_softcap: float | None = None,
           scale: float | None = None, dropout_rate: float = 0.0, kernel: str = "xla") -> jax.Array:
    """Grouped-query attention; logits and softmax in float32. Returns out_BLHK.

    ``kernel`` (`model.attention_kernel`): a fused kernel where the platform has one and the
    call allows it (`jaxft.models.kernels`; ``mask_B1LS`` may then be a ``SegmentMask``),
    else XLA: ``jax.nn.dot_product_attention`` (native GQA, boolean mask, additive bias for
    ALiBi), or on the CPU, and for logit soft-capping or attention dropout (``dropout_rate``,
    when a `jaxft.models.dropout` stream is active) on every platform, the explicit
    `_attend_head_major`, written to match it.

    Several query rows per key row (``q`` has n x B rows in order, ``k`` / ``v`` B: the beams
    or samples of one input reading its encoder's k/v, stored once): each input's n rows are
    folded into its query length, with ``mask_B1LS`` over the folded queries
    (`jaxft.models.masks.cross_attention_mask` builds it so).
    """
    if q_BLHK.shape[0] != k_BSGK.shape[0]:
        return _attend_shared_kv(q_BLHK, k_BSGK, v_BSGK, mask_B1LS=mask_B1LS, bias_BHLS=bias_BHLS,
                                 logit_softcap=logit_softcap, scale=scale, dropout_rate=dropout_rate, kernel=kernel)
    scale = q_BLHK.shape[-1] ** -0.5 if scale is None else scale
    dropping = dropout_active(dropout_rate)
    chosen = "xla" if kernel == "xla" else kernels.choose(
        kernel, q_BLHK, k_BSGK, mask_B1LS, has_bias=bias_BHLS is not None, logit_softcap=logit_softcap,
        dropout=dropping)
    if chosen == "splash":
        return kernels.splash_attention(q_BLHK, k_BSGK, v_BSGK, mask_B1LS, scale=scale, logit_softcap=logit_softcap)
    if chosen == "cudnn":
        return kernels.cudnn_attention(q_BLHK, k_BSGK, v_BSGK, mask=mask_B1LS, bias_BHLS=bias_BHLS, scale=scale)
    mask_B1LS = kernels.dense_mask(mask_B1LS)
    if logit_softcap is None and not dropping and kernels.platform() != "cpu":
        return jax.nn.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, bias=bias_BHLS, mask=mask_B1LS,
                                            scale=scale, implementation=None)
    return _attend_head_major(q_BLHK, k_BSGK, v_BSGK, mask_B1LS, bias_BHLS, logit_softcap, scale, dropout_rate)


def _attend_shared_kv(q_BLHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, **kw) -> jax.Array:
    R, L, H, K = q_BLHK.shape
    B = k_BSGK.shape[0]
    if R % B:
        raise ValueError(f"attention: {R} query rows for {B} key rows (not a multiple)")
    out_BNHK = attend(q_BLHK.reshape(B, R // B * L, H, K), k_BSGK, v_BSGK, **kw)
    return out_BNHK.reshape(R, L, H, K)


def _attend_head_major(q_BLHK, k_BSGK, v_BSGK, mask_B1LS, bias_BHLS, logit_softcap, scale, dropout_rate):
    """The explicit attention: heads moved in front once, then two batched matmuls over [B, G]
    with the R = H/G query heads of a group folded into the query rows ([B, G, R*L, K]).

    One leading batch, one row and one contraction dim per operand is the form XLA:CPU runs
    without further transposed copies; `jax.nn.dot_product_attention` contracts
    [B, L, G, R, K] in place and costs the 32M LLaMA step ~20% more attention time on the CPU.
    Also the only path for logit soft-capping (Gemma 2; between the scaled logits and the
    mask) and attention dropout (on the probabilities), which that API cannot express.
    """
    B, L, H, K = q_BLHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    R = H // G
    q_BGQK = q_BLHK.reshape(B, L, G, R, K).transpose(0, 2, 3, 1, 4).reshape(B, G, R * L, K)
    k_BGSK, v_BGSK = k_BSGK.transpose(0, 2, 1, 3), v_BSGK.transpose(0, 2, 1, 3)
    logits_BGQS = jnp.einsum("bgqk,bgsk->bgqs", q_BGQK, k_BGSK, preferred_element_type=jnp.float32) * scale
    logits_BGRLS = softcap(logits_BGQS.reshape(B, G, R, L, S), logit_softcap)
    if bias_BHLS is not None:
        logits_BGRLS = logits_BGRLS + bias_BHLS.reshape(bias_BHLS.shape[0], G, R, L, S)
    big_negative = -0.7 * float(jnp.finfo(jnp.float32).max)
    # the mask as an additive bias (a masked logit becomes big_negative exactly: |logit| is far
    # below its spacing) and the row maximum of gradient-free logits: the backward then keeps
    # neither the masked logits nor a mask broadcast to [B, G, R, L, S], only the exponentials
    logits_BGRLS = logits_BGRLS + jnp.where(mask_B1LS, 0.0, big_negative)[:, :, None]
    # softmax normalised after the product: [.., K] divisions instead of [.., S] (dropout is
    # elementwise, so it commutes with the per-row scale)
    top_BGRL1 = jnp.max(jax.lax.stop_gradient(logits_BGRLS), axis=-1, keepdims=True)
    exp_BGRLS = jnp.exp(logits_BGRLS - top_BGRL1)
    sum_BGRL1 = jnp.sum(exp_BGRLS, axis=-1, keepdims=True)
    probs_BGQS = dropout(exp_BGRLS.astype(v_BSGK.dtype), dropout_rate).reshape(B, G, R * L, S)
    out_BGQK = jnp.einsum("bgqs,bgsk->bgqk", probs_BGQS, v_BGSK, preferred_element_type=jnp.float32)
    out_BGRLK = (out_BGQK.reshape(B, G, R, L, K) / sum_BGRL1).astype(v_BSGK.dtype)
    return out_BGRLK.transpose(0, 3, 1, 2, 4).reshape(B, L, H, K)


class Attention(nnx.Module):
    """q/k/v/o projections + RoPE or ALiBi around ``attend``.

    Parameters: ``q/kernel`` [embed, heads, head_dim], ``k|v/kernel``
    [embed, kv_heads, head_dim] (+ ``bias`` [heads|kv_heads, head_dim] when
    ``qkv_bias``), ``o/kernel`` [heads, head_dim, embed] (+ ``bias`` [embed]).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, G, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        if H % G:
            raise ValueError(f"model.n_kv_heads: {G} must divide model.n_heads={H}")
        if cfg.position == "rope" and K % 2:
            raise ValueError(f"model.head_dim: RoPE needs an even head_dim, got {K}")
        kw = dict(init_std=cfg.init_std, param_dtype=jnp.dtype(cfg.param_dtype),
                  dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.q = Linear((D,), (H, K), in_axes=("embed",), out_axes=("heads", "head_dim"),
                        use_bias=cfg.qkv_bias, **kw)
        self.k = Linear((D,), (G, K), in_axes=("embed",), out_axes=("kv_heads", "head_dim"),
                        use_bias=cfg.qkv_bias, **kw)
        self.v = Linear((D,), (G, K), in_axes=("embed",), out_axes=("kv_heads", "head_dim"),
                        use_bias=cfg.qkv_bias, **kw)
        self.o = Linear((H, K), (D,), in_axes=("heads", "head_dim"), out_axes=("embed",),
                        use_bias=cfg.attn_out_bias, **kw)
        self.n_heads = H
        self.position = cfg.position
        self.logit_softcap = cfg.attn_logit_softcap
        # Gemma 2 scales by query_pre_attn_scalar**-0.5 instead of head_dim**-0.5.
        self.scale = None if cfg.query_pre_attn_scalar is None else float(cfg.query_pre_attn_scalar) ** -0.5
        self.attention_dropout_rate = check_rate("model.attention_dropout", cfg.attention_dropout)
        self.attention_kernel = cfg.attention_kernel
        # Static host constants (tuples, not arrays: NNX modules hold arrays only in Variables).
        inv_freq, self.rope_factor = rope_inv_freq(K, cfg.rope_theta, cfg.rope_scaling)
        self.rope_inv_freq = tuple(float(f) for f in inv_freq)

    def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array, kv_positions_BS: jax.Array,
                 mask_B1LS: jax.Array, cache: KVCache | None = None,
                 index: jax.Array | None = None,
                 rope: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, KVCache | None]:
        """Self-attention of the L tokens x_BLD -> (out_BLD, cache).

        Full forward: no ``cache``; the keys are the L tokens themselves (``kv_positions_BS``
        = ``positions_BL``).  Incremental decoding: the tokens' k/v are written at slot
        ``index`` of ``cache`` and the queries attend to all S cached slots, whose token
        positions are ``kv_positions_BS`` (ALiBi needs them); ``mask_B1LS`` says which count.
        ``rope``: the ``rope_tables`` at ``positions_BL``, computed once by a caller that runs
        several layers (`Decoder.rope_tables`), else here.
        """
        q_BLHK = constrain(self.q(x_BLD), HEADS)
        k_BLGK = constrain(self.k(x_BLD), KV_HEADS)
        v_BLGK = constrain(self.v(x_BLD), KV_HEADS)
        bias_BHLS = None
        if self.position == "rope":
            if rope is None:
                rope = rope_tables(positions_BL, np.asarray(self.rope_inv_freq), self.rope_factor)
            q_BLHK, k_BLGK = rotate(q_BLHK, rope), rotate(k_BLGK, rope)
        elif self.position == "alibi":
            bias_BHLS = alibi_bias(positions_BL, kv_positions_BS, self.n_heads)
        elif self.position != "none":
            raise ValueError(f"model.position: unknown {self.position!r}; known: rope, alibi, none")
        k_BSGK, v_BSGK, cache = through_cache(k_BLGK, v_BLGK, cache, index)
        out_BLHK = attend(q_BLHK, k_BSGK, v_BSGK, mask_B1LS=mask_B1LS, bias_BHLS=bias_BHLS,
                          logit_softcap=self.logit_softcap, scale=self.scale,
                          dropout_rate=self.attention_dropout_rate, kernel=self.attention_kernel)
        return self.o(constrain(out_BLHK, HEADS)), cache
