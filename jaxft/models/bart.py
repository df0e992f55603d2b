"""mBART / NLLB / M2M100 encoder-decoder by config switches (``family: bart``).

Pre-LN residual blocks with a final LayerNorm on both stacks (mBART and NLLB
as released): encoder ``x + attn(norm(x))``, ``x + mlp(norm(x))``; the decoder
adds ``x + cross(norm(x), enc)`` between the two.  Switches (``ModelConfig``):

- ``position: learned`` (mBART): a table [max_seq_len + position_offset, embed]
  per stack, read at ``position + position_offset`` (HF offset 2);
  ``position: sinusoidal`` (M2M100 / NLLB): fairseq sinusoids, sin and cos
  halves concatenated, read at ``position + position_offset`` (HF uses
  ``padding_idx + 1 + index``, so ``position_offset`` = padding_idx + 1 = 2).
- ``embed_scale``: token embeddings * sqrt(d_model) (``scale_embedding``);
  ``embed_norm``: mBART's ``layernorm_embedding`` after tokens + positions.
- ``activation``: ``gelu_exact`` (mBART) or ``relu`` (M2M100 / NLLB).

Dropout (`jaxft.models.dropout`, train step only), as HF: ``model.dropout`` on
the embedded input of each stack (tokens + positions [+ embed_norm]) and on
every sublayer output before its residual add; ``attention_dropout`` on the
attention probabilities; ``activation_dropout`` after the FFN activation.

Positions are explicit and restart at 0 per packed segment, so a packed
example gets the embeddings it would get alone.  mBART's ``final_logits_bias``
is dropped: it is a non-trainable buffer, all zeros in the released
checkpoints (a converter should check that it is zero).

Parameter paths (stable; the HF converter maps onto them)::

    embed/embedding                            [vocab, embed]   (shared: encoder, decoder, tied head)
    {encoder,decoder}/pos_embed/embedding      [max_seq_len + offset, embed]   (learned only)
    {encoder,decoder}/embed_norm/{scale,bias}  [embed]          (embed_norm)
    encoder/layers/{i}/attn_norm/{scale,bias}  [embed]
    encoder/layers/{i}/attn/{q,k,v}/kernel     [embed, heads, head_dim]
    encoder/layers/{i}/attn/{q,k,v}/bias       [heads, head_dim]
    encoder/layers/{i}/attn/o/kernel           [heads, head_dim, embed]  (+ bias [embed])
    encoder/layers/{i}/mlp_norm/{scale,bias}   [embed]
    encoder/layers/{i}/mlp/up/{kernel,bias}    [embed, mlp] / [mlp]
    encoder/layers/{i}/mlp/down/{kernel,bias}  [mlp, embed] / [embed]
    encoder/final_norm/{scale,bias}            [embed]
    decoder/layers/{i}/...                     as the encoder, plus
    decoder/layers/{i}/cross_norm/{scale,bias} [embed]
    decoder/layers/{i}/cross/{q,k,v,o}/...     as attn
    decoder/final_norm/{scale,bias}            [embed]
    lm_head/kernel                             [embed, vocab]   (unless tie_embeddings)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.config.schema import ModelConfig
from jaxft.models.attention import attend
from jaxft.models.cache import DecodeCache, KVCache, encoder_decoder_cache, through_cache
from jaxft.models.dropout import check_rate, dropout
from jaxft.models.layer_init import build_layers
from jaxft.models.layers import (ACT, HEADS, Embed, Linear, check_remat, default_positions, default_segment_ids,
                                 mlp_from_config, norm_from_config, normal_param)
from jaxft.models.masks import bidirectional_segments, causal_segments, cross_attention_mask
from jaxft.models.scan import map_layers, run_layers, run_layers_cached
from jaxft.sharding import constrain

POSITIONS = ("learned", "sinusoidal")

# --------------------------------------------------------------------------- positions


def sinusoidal_positions(positions_BL: jax.Array, features: int, offset: int) -> jax.Array:
    """fairseq / HF ``M2M100SinusoidalPositionalEmbedding`` rows at ``positions + offset``: float32.

    ``[sin(p * f_i), cos(p * f_i)]`` with ``f_i = exp(-i * ln(10000) / (half - 1))``,
    zero-padded to an odd ``features``; computed in float32 like HF's table.
    """
    half = features // 2
    step = math.log(10000.0) / (half - 1)
    inv_freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -step)
    angles_BLh = (positions_BL + offset).astype(jnp.float32)[..., None] * inv_freq
    out = jnp.concatenate([jnp.sin(angles_BLh), jnp.cos(angles_BLh)], axis=-1)
    if features % 2:
        out = jnp.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, 1)])
    return out


class LearnedPositions(nnx.Module):
    """mBART's learned table ``embedding`` [max_seq_len + offset, embed], read at position + offset."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.embedding = normal_param(rngs, (cfg.max_seq_len + cfg.position_offset, cfg.d_model),
                                      (None, "embed"), cfg.init_std, jnp.dtype(cfg.param_dtype))
        self.offset, self.dtype = cfg.position_offset, jnp.dtype(cfg.dtype)

    def __call__(self, positions_BL: jax.Array) -> jax.Array:
        table_PD = constrain(self.embedding[...].astype(self.dtype), (None, None))
        return constrain(jnp.take(table_PD, positions_BL + self.offset, axis=0), ACT)


# --------------------------------------------------------------------------- attention


class MultiHeadAttention(nnx.Module):
    """q/k/v/o projections around ``attend``; self- or cross-attention.

    ``kv`` projects keys/values (cross: once per encoder output), ``attend``
    attends a query stream to given keys/values, ``__call__`` is self-attention
    with or without a KV cache.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, K = cfg.d_model, cfg.n_heads, cfg.dim_per_head
        kw = dict(init_std=cfg.init_std, param_dtype=jnp.dtype(cfg.param_dtype),
                  dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        proj = dict(in_axes=("embed",), out_axes=("heads", "head_dim"), use_bias=cfg.qkv_bias, **kw)
        self.q = Linear((D,), (H, K), **proj)
        self.k = Linear((D,), (H, K), **proj)
        self.v = Linear((D,), (H, K), **proj)
        self.o = Linear((H, K), (D,), in_axes=("heads", "head_dim"), out_axes=("embed",),
                        use_bias=cfg.attn_out_bias, **kw)
        self.attention_dropout_rate = check_rate("model.attention_dropout", cfg.attention_dropout)
        self.attention_kernel = cfg.attention_kernel

    def kv(self, x_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values k_BSHK, v_BSHK of a stream (what a KV cache stores)."""
        return constrain(self.k(x_BSD), HEADS), constrain(self.v(x_BSD), HEADS)

    def attend(self, x_BLD: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array, mask_B1LS: jax.Array) -> jax.Array:
        """Queries from x_BLD attend to the given keys/values; returns out_BLD."""
        q_BLHK = constrain(self.q(x_BLD), HEADS)
        # HF scales q by head_dim**-0.5 before q @ k^T: attend's default scale, same math.
        out_BLHK = constrain(attend(q_BLHK, k_BSHK, v_BSHK, mask_B1LS=mask_B1LS,
                                    dropout_rate=self.attention_dropout_rate, kernel=self.attention_kernel), HEADS)
        return constrain(self.o(out_BLHK), ACT)

    def __call__(self, x_BLD: jax.Array, mask_B1LS: jax.Array, cache: KVCache | None = None,
                 index: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Self-attention of x_BLD -> (out_BLD, cache).  Full forward: no ``cache``, the keys
        are x's own.  Decoding: x's k/v are written at slot ``index`` of ``cache`` and the
        queries attend to all its slots."""
        k_BSHK, v_BSHK, cache = through_cache(*self.kv(x_BLD), cache, index)
        return self.attend(x_BLD, k_BSHK, v_BSHK, mask_B1LS), cache


# --------------------------------------------------------------------------- layers


class Layer(nnx.Module):
    """``x + attn(norm x)`` [``+ cross(norm x, enc)``, decoder] ``+ mlp(norm x)``."""

    def __init__(self, cfg: ModelConfig, *, decoder: bool, rngs: nnx.Rngs):
        self.attn_norm = norm_from_config(cfg)
        self.attn = MultiHeadAttention(cfg, rngs=rngs)
        self.cross_norm = norm_from_config(cfg) if decoder else None
        self.cross = MultiHeadAttention(cfg, rngs=rngs) if decoder else None
        self.mlp_norm = norm_from_config(cfg)
        self.mlp = mlp_from_config(cfg, rngs)
        self.dropout_rate = check_rate("model.dropout", cfg.dropout)

    def __call__(self, x_BLD: jax.Array, mask_B1LS: jax.Array, enc_BSD: jax.Array | None = None,
                 cross_mask_B1LS: jax.Array | None = None, cache: KVCache | None = None,
                 index: jax.Array | None = None, cross: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """The residual block -> (x_BLD, cache).  Full forward: no ``cache``, cross-attention
        projects k/v from ``enc_BSD``.  Incremental decoding: self-attention writes/reads
        ``cache``, cross-attention reads the encoder k/v ``cross`` projected once."""
        rate = self.dropout_rate
        h_BLD, cache = self.attn(self.attn_norm(x_BLD), mask_B1LS, cache, index)
        x_BLD = constrain(x_BLD + dropout(h_BLD, rate), ACT)
        if self.cross is not None:
            k_BSHK, v_BSHK = self.cross.kv(enc_BSD) if cross is None else cross.kv_BSGK()
            h_BLD = self.cross.attend(self.cross_norm(x_BLD), k_BSHK, v_BSHK, cross_mask_B1LS)
            x_BLD = constrain(x_BLD + dropout(h_BLD, rate), ACT)
        return constrain(x_BLD + dropout(self.mlp(self.mlp_norm(x_BLD)), rate), ACT), cache


def _layer_call(layer: Layer, x_BLD: jax.Array, *args) -> jax.Array:
    return layer(x_BLD, *args)[0]


class Stack(nnx.Module):
    """Positions + (embed_norm) + layers + final_norm: the encoder or the decoder."""

    def __init__(self, cfg: ModelConfig, n_layers: int, *, decoder: bool, rngs: nnx.Rngs):
        self.pos_embed = LearnedPositions(cfg, rngs=rngs) if cfg.position == "learned" else None
        self.embed_norm = norm_from_config(cfg) if cfg.embed_norm else None
        self.layers = build_layers(n_layers, lambda r: Layer(cfg, decoder=decoder, rngs=r), rngs)
        self.final_norm = norm_from_config(cfg)
        self.position_offset, self.d_model = cfg.position_offset, cfg.d_model
        self.remat, self.scan_layers, self.dtype = cfg.remat, cfg.scan_layers, jnp.dtype(cfg.dtype)
        self.dropout_rate = check_rate("model.dropout", cfg.dropout)

    def positions(self, positions_BL: jax.Array) -> jax.Array:
        """Position embeddings pos_BLD at explicit positions (0-based per segment)."""
        if self.pos_embed is not None:
            return self.pos_embed(positions_BL)
        pos_BLD = sinusoidal_positions(positions_BL, self.d_model, self.position_offset)
        return constrain(pos_BLD.astype(self.dtype), ACT)

    def embed(self, tokens_BLD: jax.Array, positions_BL: jax.Array) -> jax.Array:
        """Scaled token embeddings -> first residual stream (+ positions, embed_norm, dropout)."""
        x_BLD = tokens_BLD + self.positions(positions_BL)
        if self.embed_norm is not None:
            x_BLD = self.embed_norm(x_BLD)
        return constrain(dropout(x_BLD, self.dropout_rate), ACT)

    def __call__(self, x_BLD: jax.Array, *layer_args) -> jax.Array:
        x_BLD = run_layers(self.layers, _layer_call, x_BLD, *layer_args, remat=self.remat, scan=self.scan_layers)
        return constrain(self.final_norm(x_BLD), ACT)


# --------------------------------------------------------------------------- model


class Bart(nnx.Module):
    """``model(enc_inputs_BS, enc_positions_BS, enc_segment_ids_BS, inputs_BL, positions_BL,
    segment_ids_BL) -> logits_BLV`` (float32).

    ``inputs`` are decoder inputs (targets shifted right behind ``decoder_start_id``).
    Segment ids are 1..n per packed example, 0 for padding; positions restart
    at 0 per segment.  Encoder attention is bidirectional within a segment,
    decoder self-attention causal within a segment, cross-attention from a
    decoder segment to the encoder tokens of the same segment.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.position not in POSITIONS:
            raise ValueError(f"model.position: {cfg.position!r} is not a bart position; known: "
                             f"{', '.join(POSITIONS)}")
        if cfg.n_kv_heads not in (None, cfg.n_heads):
            raise ValueError(f"model.n_kv_heads: bart is multi-head attention; got {cfg.n_kv_heads} "
                             f"for n_heads={cfg.n_heads}")
        if cfg.dim_per_head * cfg.n_heads != cfg.d_model:
            raise ValueError(f"model.head_dim: bart needs n_heads * head_dim == d_model, got "
                             f"{cfg.n_heads} * {cfg.dim_per_head} != {cfg.d_model}")
        check_remat(cfg.remat)
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, param_dtype=pdt,
                           dtype=dt, rngs=rngs)
        self.encoder = Stack(cfg, cfg.n_layers, decoder=False, rngs=rngs)
        n_dec = cfg.n_layers if cfg.n_decoder_layers is None else cfg.n_decoder_layers
        self.decoder = Stack(cfg, n_dec, decoder=True, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else Linear(
            (cfg.d_model,), (cfg.vocab_size,), in_axes=("embed",), out_axes=("vocab",),
            init_std=cfg.init_std, param_dtype=pdt, dtype=dt, out_dtype=jnp.float32, rngs=rngs)
        self.embed_multiplier = math.sqrt(cfg.d_model) if cfg.embed_scale else None
        self.dtype = dt

    def embed_tokens(self, ids_BL: jax.Array) -> jax.Array:
        """Token ids -> scaled token embeddings (no positions): tok_BLD."""
        tok_BLD = self.embed(ids_BL)
        if self.embed_multiplier is not None:
            tok_BLD = tok_BLD * jnp.asarray(self.embed_multiplier, self.dtype)
        return constrain(tok_BLD, ACT)

    def encode_embedded(self, tok_BSD: jax.Array, enc_positions_BS: jax.Array,
                        enc_segment_ids_BS: jax.Array) -> jax.Array:
        x_BSD = self.encoder.embed(tok_BSD, enc_positions_BS)
        return self.encoder(x_BSD, bidirectional_segments(enc_segment_ids_BS))

    def decode_embedded(self, tok_BLD: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array,
                        enc_BSD: jax.Array, enc_segment_ids_BS: jax.Array) -> jax.Array:
        return self.logits(self.decode_hidden(tok_BLD, positions_BL, segment_ids_BL, enc_BSD, enc_segment_ids_BS))

    def decode_hidden(self, tok_BLD: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array,
                      enc_BSD: jax.Array, enc_segment_ids_BS: jax.Array) -> jax.Array:
        """Embedded decoder tokens -> final decoder states h_BLD (after the final norm)."""
        x_BLD = self.decoder.embed(tok_BLD, positions_BL)
        return self.decoder(x_BLD, causal_segments(segment_ids_BL), enc_BSD,
                            cross_attention_mask(segment_ids_BL, enc_segment_ids_BS))

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        """The head alone: final decoder states [B, L, D] -> float32 logits_BLV (tied head or
        ``lm_head``)."""
        if self.lm_head is None:
            logits_BLV = self.embed.attend(x_BLD)
        else:
            logits_BLV = self.lm_head(x_BLD)
        return constrain(logits_BLV.astype(jnp.float32), ("batch", "length", "vocab"))

    def encode(self, enc_inputs_BS: jax.Array, enc_positions_BS: jax.Array | None = None,
               enc_segment_ids_BS: jax.Array | None = None) -> jax.Array:
        """Source ids -> encoder output enc_BSD (after the encoder's final norm)."""
        enc_positions_BS, enc_segment_ids_BS = default_positions(
            enc_inputs_BS.shape, enc_positions_BS, enc_segment_ids_BS)
        return self.encode_embedded(self.embed_tokens(enc_inputs_BS), enc_positions_BS,
                                    enc_segment_ids_BS)

    def decode(self, inputs_BL: jax.Array, positions_BL: jax.Array | None, segment_ids_BL: jax.Array | None,
               enc_BSD: jax.Array, enc_segment_ids_BS: jax.Array | None = None) -> jax.Array:
        """Decoder inputs + encoder output -> float32 logits_BLV."""
        positions_BL, segment_ids_BL = default_positions(inputs_BL.shape, positions_BL, segment_ids_BL)
        enc_segment_ids_BS = default_segment_ids(enc_BSD.shape, enc_segment_ids_BS)
        return self.decode_embedded(self.embed_tokens(inputs_BL), positions_BL, segment_ids_BL,
                                    enc_BSD, enc_segment_ids_BS)

    def hidden(self, enc_inputs_BS: jax.Array, enc_positions_BS: jax.Array | None,
               enc_segment_ids_BS: jax.Array | None, inputs_BL: jax.Array,
               positions_BL: jax.Array | None = None, segment_ids_BL: jax.Array | None = None) -> jax.Array:
        """``__call__`` without the head: h_BLD, ``logits(hidden(...)) == __call__(...)``."""
        enc_positions_BS, enc_segment_ids_BS = default_positions(
            enc_inputs_BS.shape, enc_positions_BS, enc_segment_ids_BS)
        enc_BSD = self.encode(enc_inputs_BS, enc_positions_BS, enc_segment_ids_BS)
        positions_BL, segment_ids_BL = default_positions(inputs_BL.shape, positions_BL, segment_ids_BL)
        return self.decode_hidden(self.embed_tokens(inputs_BL), positions_BL, segment_ids_BL,
                                  enc_BSD, enc_segment_ids_BS)

    def __call__(self, enc_inputs_BS: jax.Array, enc_positions_BS: jax.Array | None,
                 enc_segment_ids_BS: jax.Array | None, inputs_BL: jax.Array,
                 positions_BL: jax.Array | None = None,
                 segment_ids_BL: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden(enc_inputs_BS, enc_positions_BS, enc_segment_ids_BS, inputs_BL,
                                       positions_BL, segment_ids_BL))

    # ----------------------------------------------------------------- incremental decoding

    def init_cache(self, enc_BSD: jax.Array, enc_segment_ids_BS: jax.Array, max_len: int) -> DecodeCache:
        """Empty self-attention cache for ``max_len`` decoder tokens, plus every layer's
        cross-attention k/v projected once from the encoder output."""
        layers = self.decoder.layers
        return encoder_decoder_cache(layers, map_layers(layers, lambda layer: layer.cross.kv(enc_BSD)),
                                     enc_segment_ids_BS, max_len, self.dtype)

    def decode_step(self, inputs_BL: jax.Array, positions_BL: jax.Array, cache: DecodeCache,
                    segment_ids_BL: jax.Array | None = None) -> tuple[jax.Array, DecodeCache]:
        """L new decoder tokens against the cache -> (float32 logits_BLV, updated cache).

        Positions are explicit, so learned and sinusoidal tables are read at the new
        tokens' positions."""
        segment_ids_BL = default_segment_ids(inputs_BL.shape, segment_ids_BL)
        index = cache.index
        cache, mask_B1LS, _ = cache.advance(positions_BL, segment_ids_BL)
        cross_mask_B1LS = cross_attention_mask(segment_ids_BL, cache.enc_segment_ids_BS)
        x_BLD = self.decoder.embed(self.embed_tokens(inputs_BL), positions_BL)

        def call(layer, x_BLD, layer_cache, cross):
            x_BLD, layer_cache = layer(x_BLD, mask_B1LS, None, cross_mask_B1LS, cache.layer_view(layer_cache), index,
                                       cross)
            return x_BLD, layer_cache.slot if cache.pool else layer_cache

        x_BLD, layers = run_layers_cached(self.decoder.layers, call, x_BLD, cache.layers, cache.cross)
        x_BLD = constrain(self.decoder.final_norm(x_BLD), ACT)
        return self.logits(x_BLD), cache.with_layers(layers)
