"""Self-attention: masks, RoPE (plain / linear / llama3 / yarn), ALiBi, GQA.

The pieces are split so a KV cache slots in between them:

- ``Attention`` (module) projects x to q/k/v, applies RoPE, calls ``attend``
  and projects back;
- ``attend(q, k, v, mask, bias)`` is the pure attention function;
- ``attention_mask(...)`` builds the boolean mask from segment ids and token
  indices (causal + same segment).

- ``KVCache`` / ``DecodeCache`` hold keys and values for incremental decoding
  (``Attention.extend`` writes the new tokens' k/v and attends to the cache).

Shapes: B batch, L query length, S key length, H query heads, G kv heads,
R = H // G heads per kv group, K head_dim, D d_model.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.config.schema import ModelConfig, RopeScalingConfig
from jaxft.models.layers import Linear, softcap
from jaxft.sharding import constrain

# --------------------------------------------------------------------------- masks


def attention_mask(q_segment_ids_BL: jax.Array, kv_segment_ids_BS: jax.Array,
                   q_index_BL: jax.Array, kv_index_BS: jax.Array) -> jax.Array:
    """mask_B1LS: query i sees key j iff j <= i (by index) and both share a segment id.

    Padding (segment 0) is just one more segment: a padding token sees only
    earlier padding, never a real token, and no row is ever fully masked
    (the diagonal is always allowed), so no NaNs and no leakage.
    """
    same_BLS = q_segment_ids_BL[:, :, None] == kv_segment_ids_BS[:, None, :]
    causal_BLS = q_index_BL[:, :, None] >= kv_index_BS[:, None, :]
    return (same_BLS & causal_BLS)[:, None, :, :]


def cross_attention_mask(dec_segment_ids_BL: jax.Array, enc_segment_ids_BS: jax.Array) -> jax.Array:
    """mask_B1LS for encoder-decoder cross-attention over packed rows.

    A real decoder token (segment k > 0) sees exactly the encoder tokens of
    segment k.  A decoder padding token (segment 0) sees every encoder token:
    its output has zero loss weight and no real token attends to it, so this
    only keeps its softmax row from being fully masked.
    """
    same_BLS = (dec_segment_ids_BL[:, :, None] == enc_segment_ids_BS[:, None, :]) & (
        enc_segment_ids_BS[:, None, :] > 0)
    pad_BL1 = (dec_segment_ids_BL == 0)[:, :, None]
    return (same_BLS | pad_BL1)[:, None, :, :]


def causal_segment_mask(segment_ids_BL: jax.Array) -> jax.Array:
    """Training-time mask over a full (packed) sequence: mask_B1LL."""
    idx_BL = jnp.broadcast_to(jnp.arange(segment_ids_BL.shape[1]), segment_ids_BL.shape)
    return attention_mask(segment_ids_BL, segment_ids_BL, idx_BL, idx_BL)


def sliding_window_mask(mask_B1LS: jax.Array, q_positions_BL: jax.Array, kv_positions_BS: jax.Array,
                        window: int) -> jax.Array:
    """Restrict ``mask_B1LS`` to keys less than ``window`` positions back (Gemma 2 local layers).

    Works on positions, so it composes with the causal + segment mask of packed
    rows (positions restart per segment); the diagonal stays allowed.
    """
    near_BLS = (q_positions_BL[:, :, None] - kv_positions_BS[:, None, :]) < window
    return mask_B1LS & near_BLS[:, None, :, :]


def is_local_layer(layer: int, window: int | None, pattern: int) -> bool:
    """Sliding-window layers: every layer but each ``pattern``-th (HF Gemma 2: the even ones)."""
    return window is not None and (layer + 1) % pattern != 0


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


def apply_rope(x_BLHK: jax.Array, positions_BL: jax.Array, inv_freq: np.ndarray,
               attention_factor: float = 1.0) -> jax.Array:
    """Rotate-half RoPE (HF LLaMA/Gemma layout: the two halves of head_dim pair up)."""
    angles_BLk = positions_BL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    sin = (jnp.sin(angles_BLk) * attention_factor)[:, :, None, :]
    cos = (jnp.cos(angles_BLk) * attention_factor)[:, :, None, :]
    x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHK.dtype)


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
    softmax ignores.
    """
    rel_BLS = (kv_positions_BS[:, None, :] - q_positions_BL[:, :, None]).astype(jnp.float32)
    slopes_H = jnp.asarray(alibi_slopes(n_heads), jnp.float32)
    return slopes_H[None, :, None, None] * rel_BLS[:, None, :, :]


# --------------------------------------------------------------------------- attention


def attend(q_BLHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, *, mask_B1LS: jax.Array,
           bias_BHLS: jax.Array | None = None, logit_softcap: float | None = None,
           scale: float | None = None) -> jax.Array:
    """Grouped-query attention; logits and softmax in float32. Returns out_BLHK.

    Uses ``jax.nn.dot_product_attention`` (native GQA, boolean mask, additive
    bias for ALiBi).  Logit soft-capping (Gemma 2) must act between the scaled
    logits and the mask, which that API cannot express, so it takes the
    explicit einsum path, written to match the XLA implementation otherwise.
    """
    B, L, H, K = q_BLHK.shape
    scale = K ** -0.5 if scale is None else scale
    if logit_softcap is None:
        return jax.nn.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, bias=bias_BHLS, mask=mask_B1LS,
                                            scale=scale, implementation=None)
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    q_BLGRK = q_BLHK.reshape(B, L, G, H // G, K)
    logits_BGRLS = jnp.einsum("blgrk,bsgk->bgrls", q_BLGRK, k_BSGK,
                              preferred_element_type=jnp.float32) * scale
    logits_BGRLS = softcap(logits_BGRLS, logit_softcap)
    if bias_BHLS is not None:
        logits_BGRLS = logits_BGRLS + bias_BHLS.reshape(bias_BHLS.shape[0], G, H // G, L, S)
    big_negative = -0.7 * float(jnp.finfo(jnp.float32).max)
    logits_BGRLS = jnp.where(mask_B1LS[:, :, None], logits_BGRLS, big_negative)
    probs_BGRLS = jax.nn.softmax(logits_BGRLS, axis=-1).astype(v_BSGK.dtype)
    out_BLGRK = jnp.einsum("bgrls,bsgk->blgrk", probs_BGRLS, v_BSGK)
    return out_BLGRK.reshape(B, L, H, K)


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
        # Static host constants (tuples, not arrays: NNX modules hold arrays only in Variables).
        inv_freq, self.rope_factor = rope_inv_freq(K, cfg.rope_theta, cfg.rope_scaling)
        self.rope_inv_freq = tuple(float(f) for f in inv_freq)

    def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array, mask_B1LL: jax.Array) -> jax.Array:
        q_BLHK = constrain(self.q(x_BLD), ("batch", "length", "heads", "head_dim"))
        k_BLGK = constrain(self.k(x_BLD), ("batch", "length", "kv_heads", "head_dim"))
        v_BLGK = constrain(self.v(x_BLD), ("batch", "length", "kv_heads", "head_dim"))
        bias_BHLL = None
        if self.position == "rope":
            inv_freq = np.asarray(self.rope_inv_freq)
            q_BLHK = apply_rope(q_BLHK, positions_BL, inv_freq, self.rope_factor)
            k_BLGK = apply_rope(k_BLGK, positions_BL, inv_freq, self.rope_factor)
        elif self.position == "alibi":
            bias_BHLL = alibi_bias(positions_BL, positions_BL, self.n_heads)
        elif self.position != "none":
            raise ValueError(f"model.position: unknown {self.position!r}; known: rope, alibi, none")
        out_BLHK = attend(q_BLHK, k_BLGK, v_BLGK, mask_B1LS=mask_B1LL, bias_BHLS=bias_BHLL,
                          logit_softcap=self.logit_softcap, scale=self.scale)
        out_BLHK = constrain(out_BLHK, ("batch", "length", "heads", "head_dim"))
        return self.o(out_BLHK)

    def extend(self, x_BLD: jax.Array, positions_BL: jax.Array, kv_positions_BS: jax.Array,
               mask_B1LS: jax.Array, cache: KVCache, index: jax.Array) -> tuple[jax.Array, KVCache]:
        """Incremental decoding: write the L new tokens' k/v at slot ``index`` of ``cache``,
        then attend their queries to all S cached slots (``mask_B1LS`` says which count).

        ``kv_positions_BS`` are the token positions of the cache slots (ALiBi needs them).
        """
        q_BLHK = constrain(self.q(x_BLD), ("batch", "length", "heads", "head_dim"))
        k_BLGK = constrain(self.k(x_BLD), ("batch", "length", "kv_heads", "head_dim"))
        v_BLGK = constrain(self.v(x_BLD), ("batch", "length", "kv_heads", "head_dim"))
        bias_BHLS = None
        if self.position == "rope":
            inv_freq = np.asarray(self.rope_inv_freq)
            q_BLHK = apply_rope(q_BLHK, positions_BL, inv_freq, self.rope_factor)
            k_BLGK = apply_rope(k_BLGK, positions_BL, inv_freq, self.rope_factor)
        elif self.position == "alibi":
            bias_BHLS = alibi_bias(positions_BL, kv_positions_BS, self.n_heads)
        cache = cache.write(k_BLGK, v_BLGK, index)
        out_BLHK = attend(q_BLHK, cache.k, cache.v, mask_B1LS=mask_B1LS, bias_BHLS=bias_BHLS,
                          logit_softcap=self.logit_softcap, scale=self.scale)
        out_BLHK = constrain(out_BLHK, ("batch", "length", "heads", "head_dim"))
        return self.o(out_BLHK), cache


# --------------------------------------------------------------------------- KV cache

CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One attention layer's keys and values, k_BSGK / v_BSGK, in the compute dtype.

    A plain pytree (not NNX state): it is carried through ``lax.while_loop`` and
    gathered along the batch axis by beam search.  Sharded by logical axes:
    batch over the data axes, kv heads over ``tensor``.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, batch: int, length: int, heads: int, head_dim: int, dtype) -> KVCache:
        zeros = constrain(jnp.zeros((batch, length, heads, head_dim), dtype), CACHE_AXES)
        return cls(zeros, zeros)

    @classmethod
    def of(cls, k_BSGK: jax.Array, v_BSGK: jax.Array) -> KVCache:
        return cls(constrain(k_BSGK, CACHE_AXES), constrain(v_BSGK, CACHE_AXES))

    def write(self, k_BLGK: jax.Array, v_BLGK: jax.Array, index: jax.Array) -> KVCache:
        """Store L new keys/values at slots ``index .. index + L - 1`` (same slot for every row)."""
        k = jax.lax.dynamic_update_slice_in_dim(self.k, k_BLGK.astype(self.k.dtype), index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(self.v, v_BLGK.astype(self.v.dtype), index, axis=1)
        return KVCache.of(k, v)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCache:
    """Everything a model needs to decode one more token, for every layer.

    - ``layers``: self-attention ``KVCache`` per decoder layer, S = max total length;
    - ``segment_ids_BS``: 1 where a slot holds a real token, 0 for an empty slot or
      (decoder-only) a left-padding slot of the prompt; ``positions_BS``: each
      slot's token position (RoPE is applied before caching; ALiBi and T5's
      relative bias are functions of query and key positions);
    - ``index``: int32 scalar, the next slot to write; all rows write the same
      slot, so prompts are left-aligned to a common end (see ``jaxft.eval.cache``);
    - encoder-decoder only: ``cross`` (cross-attention k/v per layer, projected once
      from the encoder output) and ``enc_segment_ids_BS`` (0 = source padding).
    """

    layers: tuple[KVCache, ...]
    segment_ids_BS: jax.Array
    positions_BS: jax.Array
    index: jax.Array
    cross: tuple[KVCache, ...] = ()
    enc_segment_ids_BS: jax.Array | None = None

    @classmethod
    def empty(cls, layers: tuple[KVCache, ...], batch: int, length: int, **cross) -> DecodeCache:
        zeros_BS = constrain(jnp.zeros((batch, length), jnp.int32), ("batch", "length"))
        return cls(tuple(layers), zeros_BS, zeros_BS, jnp.zeros((), jnp.int32), **cross)

    def advance(self, positions_BL: jax.Array,
                segment_ids_BL: jax.Array) -> tuple[DecodeCache, jax.Array, jax.Array]:
        """Record L new tokens at ``index``; returns (cache with index += L, the self-attention
        mask_B1LS of the new queries over all slots, kv_positions_BS).

        The layers' k/v are written by the caller (``Attention.extend`` and friends), at the
        *old* ``index``.  Causality is by slot, so empty slots ahead are never seen.
        """
        L, S = positions_BL.shape[1], self.positions_BS.shape[1]
        seg_BS = jax.lax.dynamic_update_slice_in_dim(
            self.segment_ids_BS, segment_ids_BL.astype(jnp.int32), self.index, axis=1)
        pos_BS = jax.lax.dynamic_update_slice_in_dim(
            self.positions_BS, positions_BL.astype(jnp.int32), self.index, axis=1)
        q_slot_BL = jnp.broadcast_to(self.index + jnp.arange(L, dtype=jnp.int32), positions_BL.shape)
        kv_slot_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), pos_BS.shape)
        mask_B1LS = attention_mask(segment_ids_BL, seg_BS, q_slot_BL, kv_slot_BS)
        new = dataclasses.replace(self, segment_ids_BS=seg_BS, positions_BS=pos_BS, index=self.index + L)
        return new, mask_B1LS, pos_BS

    def with_layers(self, layers: list[KVCache] | tuple[KVCache, ...]) -> DecodeCache:
        return dataclasses.replace(self, layers=tuple(layers))

    def gather_rows(self, rows_B: jax.Array) -> DecodeCache:
        """Reorder the batch rows of the self-attention state (beam search).  ``cross`` and
        ``enc_segment_ids_BS`` are left alone: beams only move within their own input."""
        take = lambda a: jnp.take(a, rows_B, axis=0)  # noqa: E731
        layers = tuple(KVCache.of(take(c.k), take(c.v)) for c in self.layers)
        return dataclasses.replace(self, layers=layers, segment_ids_BS=take(self.segment_ids_BS),
                                   positions_BS=take(self.positions_BS))

    def repeat_rows(self, n: int) -> DecodeCache:
        """Each row n times in a row (``jnp.repeat``): one copy per beam / sample."""
        rep = lambda a: None if a is None else jnp.repeat(a, n, axis=0)  # noqa: E731
        kv = lambda cs: tuple(KVCache.of(rep(c.k), rep(c.v)) for c in cs)  # noqa: E731
        return dataclasses.replace(self, layers=kv(self.layers), segment_ids_BS=rep(self.segment_ids_BS),
                                   positions_BS=rep(self.positions_BS), cross=kv(self.cross),
                                   enc_segment_ids_BS=rep(self.enc_segment_ids_BS))


def encoder_decoder_cache(layers, enc_BSD: jax.Array, enc_segment_ids_BS: jax.Array, max_len: int, dtype,
                          project_kv) -> DecodeCache:
    """Empty self-attention cache for ``max_len`` decoder tokens over the decoder
    ``layers``, plus each layer's cross-attention k/v projected once from the
    encoder output by ``project_kv(layer, enc_BSD) -> (k, v)`` (T5 and BART)."""
    B = enc_BSD.shape[0]
    _, H, K = layers[0].attn.k.kernel.shape
    self_kv = tuple(KVCache.zeros(B, max_len, H, K, dtype) for _ in layers)
    cross = tuple(KVCache.of(*project_kv(layer, enc_BSD)) for layer in layers)
    return DecodeCache.empty(self_kv, B, max_len, cross=cross, enc_segment_ids_BS=enc_segment_ids_BS.astype(jnp.int32))
