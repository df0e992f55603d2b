"""Decoder-only transformer: LLaMA / Qwen2 / Gemma / BLOOM by config switches.

Pre-norm residual blocks ``x + attn(norm(x))``, ``x + mlp(norm(x))``.  Dropout
(`jaxft.models.dropout`, train step only): ``model.dropout`` on each branch output
before its residual add (BLOOM's ``hidden_dropout``), ``attention_dropout`` on the
attention probabilities, ``activation_dropout`` on the MLP hidden.  The
architecture switches live in ``ModelConfig``; presets are data in
``configs/models/*.yaml``.

Parameter paths (stable; the HF converter maps onto them)::

    embed/embedding                     [vocab, embed]
    embed_norm/{scale,bias}             [embed]           (embed_norm, BLOOM)
    layers/{i}/attn_norm/scale(,bias)   [embed]
    layers/{i}/attn/{q,k,v}/kernel      [embed, heads|kv_heads, head_dim]
    layers/{i}/attn/{q,k,v}/bias        [heads|kv_heads, head_dim]  (qkv_bias)
    layers/{i}/attn/o/kernel            [heads, head_dim, embed]
    layers/{i}/attn/o/bias              [embed]           (attn_out_bias)
    layers/{i}/mlp_norm/scale(,bias)    [embed]
    layers/{i}/mlp/{gate,up}/kernel     [embed, mlp]      (gate only for swiglu/geglu)
    layers/{i}/mlp/down/kernel          [mlp, embed]      (+ bias when mlp_bias)
    layers/{i}/post_attn_norm/scale     [embed]           (post_norms, Gemma 2)
    layers/{i}/post_mlp_norm/scale      [embed]           (post_norms, Gemma 2)
    final_norm/scale(,bias)             [embed]
    lm_head/kernel                      [embed, vocab]    (unless tie_embeddings)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.config.schema import ModelConfig
from jaxft.models.attention import Attention, rope_inv_freq, rope_tables
from jaxft.models import kernels
from jaxft.models.cache import DecodeCache, KVCache, Prefill, self_attention_caches
from jaxft.models.dropout import check_rate, dropout
from jaxft.models.layer_init import build_layers
from jaxft.models.layers import (ACT, Embed, Linear, check_remat, default_positions, default_segment_ids,
                                 mlp_from_config, norm_from_config, softcap)
from jaxft.models.masks import causal_segment_mask, causal_segments, is_local_layer, sliding_window_mask
from jaxft.models.scan import is_stacked, run_layers, run_layers_cached
from jaxft.sharding import constrain


class DecoderLayer(nnx.Module):
    """One block; a sliding-window (Gemma 2 local) layer differs only in the mask ``Decoder``
    hands it, so every layer has the same structure (one scan body, `jaxft.models.scan`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = norm_from_config(cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = norm_from_config(cfg)
        self.mlp = mlp_from_config(cfg, rngs)
        # Gemma 2 sandwich norms: x + post_norm(f(pre_norm(x))).
        self.post_attn_norm = norm_from_config(cfg) if cfg.post_norms else None
        self.post_mlp_norm = norm_from_config(cfg) if cfg.post_norms else None
        self.dropout_rate = check_rate("model.dropout", cfg.dropout)

    def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array, kv_positions_BS: jax.Array,
                 mask_B1LS: jax.Array, cache: KVCache | None = None,
                 index: jax.Array | None = None,
                 rope: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, KVCache | None]:
        """The residual block -> (x_BLD, cache); attention as ``Attention.__call__`` (with a
        ``cache`` for incremental decoding, none for the full forward; ``rope``: the model's
        tables at ``positions_BL``, shared by all layers)."""
        h_BLD, cache = self.attn(self.attn_norm(x_BLD), positions_BL, kv_positions_BS, mask_B1LS, cache, index,
                                 rope=rope)
        if self.post_attn_norm is not None:
            h_BLD = self.post_attn_norm(h_BLD)
        x_BLD = constrain(x_BLD + dropout(h_BLD, self.dropout_rate), ACT)
        h_BLD = self.mlp(self.mlp_norm(x_BLD))
        if self.post_mlp_norm is not None:
            h_BLD = self.post_mlp_norm(h_BLD)
        return constrain(x_BLD + dropout(h_BLD, self.dropout_rate), ACT), cache


def _layer_call(layer: DecoderLayer, x_BLD, positions_BL, mask_B1LL, local_mask_B1LL, rope, local):
    if local_mask_B1LL is not None:  # Gemma 2: this layer's mask by its (traced) local flag
        mask_B1LL = jnp.where(local, local_mask_B1LL, mask_B1LL)
    return layer(x_BLD, positions_BL, positions_BL, mask_B1LL, rope=rope)[0]


class Decoder(nnx.Module):
    """``model(inputs_BL, positions_BL, segment_ids_BL) -> logits_BLV`` (float32).

    ``segment_ids``: 1..n for packed examples within a row, 0 for padding;
    attention is causal and within one segment.  ``positions`` restart at 0 per
    segment.  Both default to a single unpacked example.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        check_remat(cfg.remat)
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, param_dtype=pdt,
                           dtype=dt, rngs=rngs)
        self.embed_norm = norm_from_config(cfg) if cfg.embed_norm else None
        if cfg.sliding_window is not None and (cfg.sliding_window < 1 or cfg.sliding_window_pattern < 1):
            raise ValueError(f"model.sliding_window: must be >= 1 (and sliding_window_pattern >= 1), got "
                             f"{cfg.sliding_window} / {cfg.sliding_window_pattern}")
        self.layers = build_layers(cfg.n_layers, lambda r: DecoderLayer(cfg, rngs=r), rngs)
        self.local_layers = tuple(is_local_layer(i, cfg.sliding_window, cfg.sliding_window_pattern)
                                  for i in range(cfg.n_layers))
        self.sliding_window = cfg.sliding_window
        self.final_norm = norm_from_config(cfg)
        self.lm_head = None if cfg.tie_embeddings else Linear(
            (cfg.d_model,), (cfg.vocab_size,), in_axes=("embed",), out_axes=("vocab",),
            init_std=cfg.init_std, param_dtype=pdt, dtype=dt, out_dtype=jnp.float32, rngs=rngs)
        self.embed_multiplier = math.sqrt(cfg.d_model) if cfg.embed_scale else None
        self.final_logit_softcap = cfg.final_logit_softcap
        self.remat, self.scan_layers = cfg.remat, cfg.scan_layers
        self.dtype = dt
        # RoPE's tables are computed once per forward for all layers (`rope_tables`), from static
        # host constants (a model may have no layers: `jaxft plan` builds such stubs)
        inv_freq, self.rope_factor = rope_inv_freq(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
        self.rope_inv_freq = tuple(float(f) for f in inv_freq) if cfg.position == "rope" else None

    def rope_tables(self, positions_BL: jax.Array) -> tuple[jax.Array, jax.Array] | None:
        """RoPE's (cos, sin) at ``positions_BL`` for every layer (None without RoPE)."""
        if self.rope_inv_freq is None:
            return None
        return rope_tables(positions_BL, np.asarray(self.rope_inv_freq), self.rope_factor)

    def embed_tokens(self, inputs_BL: jax.Array) -> jax.Array:
        """Token ids -> first residual stream x_BLD (scaled / normed as configured)."""
        x_BLD = self.embed(inputs_BL)
        if self.embed_multiplier is not None:  # Gemma: multiply in the compute dtype, as HF does
            x_BLD = x_BLD * jnp.asarray(self.embed_multiplier, self.dtype)
        if self.embed_norm is not None:
            x_BLD = self.embed_norm(x_BLD)
        return constrain(x_BLD, ACT)

    def decode(self, x_BLD: jax.Array, positions_BL: jax.Array | None = None,
               segment_ids_BL: jax.Array | None = None) -> jax.Array:
        """Residual stream after embedding -> float32 logits_BLV."""
        return self.logits(self.decode_hidden(x_BLD, positions_BL, segment_ids_BL))

    def decode_hidden(self, x_BLD: jax.Array, positions_BL: jax.Array | None = None,
                      segment_ids_BL: jax.Array | None = None) -> jax.Array:
        """Residual stream after embedding -> final-normed states h_BLD (input of ``logits``)."""
        positions_BL, segment_ids_BL = default_positions(x_BLD.shape, positions_BL, segment_ids_BL)
        mask_B1LL = causal_segments(segment_ids_BL)  # a fused kernel takes the segment ids
        local_mask_B1LL = None
        if self.sliding_window is not None:  # Gemma 2: local / global masks chosen per layer, dense
            mask_B1LL = causal_segment_mask(segment_ids_BL)
            local_mask_B1LL = sliding_window_mask(mask_B1LL, positions_BL, positions_BL, self.sliding_window)
        rope = self.rope_tables(positions_BL)  # once, for every layer
        x_BLD = run_layers(self.layers, _layer_call, x_BLD, positions_BL, mask_B1LL, local_mask_B1LL, rope,
                           remat=self.remat, scan=self.scan_layers, per_layer=(np.array(self.local_layers),))
        return self.final_norm(x_BLD)

    def head_logits(self, x_BLD: jax.Array) -> jax.Array:
        """Last residual stream (before the final norm) -> float32 logits_BLV."""
        return self.logits(self.final_norm(x_BLD))

    def logits(self, h_BLD: jax.Array) -> jax.Array:
        """The head alone: final-normed states [B, L, D] -> float32 logits_BLV (tied or
        ``lm_head``, then the final softcap).  The chunked loss calls it per sequence chunk."""
        if self.lm_head is None:
            logits_BLV = self.embed.attend(h_BLD)
        else:
            logits_BLV = self.lm_head(h_BLD)
        logits_BLV = softcap(logits_BLV.astype(jnp.float32), self.final_logit_softcap)
        return constrain(logits_BLV, ("batch", "length", "vocab"))

    def hidden(self, inputs_BL: jax.Array, positions_BL: jax.Array | None = None,
               segment_ids_BL: jax.Array | None = None) -> jax.Array:
        """``__call__`` without the head: final-normed h_BLD, ``logits(hidden(...)) == __call__(...)``."""
        return self.decode_hidden(self.embed_tokens(inputs_BL), positions_BL, segment_ids_BL)

    def __call__(self, inputs_BL: jax.Array, positions_BL: jax.Array | None = None,
                 segment_ids_BL: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden(inputs_BL, positions_BL, segment_ids_BL))

    # ----------------------------------------------------------------- incremental decoding

    def init_cache(self, batch: int, max_len: int) -> DecodeCache:
        """An empty cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated)."""
        _, G, K = self.layers[0].attn.k.kernel.shape
        # stacked layers: one cache with a leading layer axis, carried by the scan
        layers = self_attention_caches(len(self.layers), is_stacked(self.layers), batch, max_len, G, K, self.dtype,
                                       group=self.layers[0].attn.n_heads // G)
        return DecodeCache.empty(layers, batch, max_len)

    def decode_step(self, inputs_BL: jax.Array, positions_BL: jax.Array, cache: DecodeCache,
                    segment_ids_BL: jax.Array | None = None, *, prefill: bool = False) -> tuple[jax.Array, DecodeCache]:
        """Run L new tokens against the cache: (float32 logits_BLV, updated cache).

        L = prompt length for the prefill, 1 per step after.  ``segment_ids_BL``: 1 for
        real tokens (default), 0 for prompt left-padding.  Computes what ``__call__``
        computes for these positions of the whole sequence.  ``prefill``: the cache is empty
        (``init_cache``), so the L tokens attend only among themselves, with the full forward's
        masks (and its fused attention kernel where the platform has one), while their
        keys/values are written to slots 0..L-1; the logits are then the last token's alone
        ([B, 1, V]: the next token after the prompt).
        """
        segment_ids_BL = default_segment_ids(inputs_BL.shape, segment_ids_BL)
        index = cache.index
        cache, mask_B1LS, kv_positions_BS = cache.advance(positions_BL, segment_ids_BL)
        if prefill:
            mask_B1LS, kv_positions_BS = causal_segments(segment_ids_BL), positions_BL
        local_mask_B1LS, rope = None, self.rope_tables(positions_BL)
        if self.sliding_window is not None:
            mask_B1LS = kernels.dense_mask(mask_B1LS)  # local / global chosen per layer: dense masks
            local_mask_B1LS = sliding_window_mask(mask_B1LS, positions_BL, kv_positions_BS, self.sliding_window)

        def call(layer, x_BLD, layer_cache, _, local):
            mask = mask_B1LS if local_mask_B1LS is None else jnp.where(local, local_mask_B1LS, mask_B1LS)
            x_BLD, layer_cache = layer(x_BLD, positions_BL, kv_positions_BS, mask,
                                       Prefill(layer_cache) if prefill else cache.layer_view(layer_cache), index,
                                       rope=rope)
            return x_BLD, layer_cache.slot if prefill or cache.pool else layer_cache

        x_BLD, layers = run_layers_cached(self.layers, call, self.embed_tokens(inputs_BL), cache.layers,
                                          per_layer=(np.array(self.local_layers),))
        return self.head_logits(x_BLD[:, -1:] if prefill else x_BLD), cache.with_layers(layers)
