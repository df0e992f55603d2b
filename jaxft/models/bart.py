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
from jaxft.models.attention import (DecodeCache, KVCache, attend, causal_segment_mask, cross_attention_mask,
                                    encoder_decoder_cache)
from jaxft.models.layers import MLP, Embed, Linear, make_norm, normal_param
from jaxft.sharding import constrain

ACT = ("batch", "length", "embed")
HEADS = ("batch", "length", "heads", "head_dim")
POSITIONS = ("learned", "sinusoidal")
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _norm(cfg: ModelConfig):
    return make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, plus_one=cfg.norm_plus_one,
                     param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype))


# --------------------------------------------------------------------------- masks and positions


def bidirectional_segment_mask(segment_ids_BS: jax.Array) -> jax.Array:
    """Encoder self-attention mask_B1SS: token i sees token j iff they share a segment id.

    Padding (segment 0) sees only padding, never a real token, so no row is
    fully masked (no NaNs) and no real token sees padding.
    """
    return (segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :])[:, None, :, :]


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

    Split into ``project_q`` / ``project_kv`` / ``attend_out`` so a KV cache can
    store k/v (self: per step; cross: once per encoder output).
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

    def project_q(self, x_BLD: jax.Array) -> jax.Array:
        return constrain(self.q(x_BLD), HEADS)

    def project_kv(self, x_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
        return constrain(self.k(x_BSD), HEADS), constrain(self.v(x_BSD), HEADS)

    def attend_out(self, q_BLHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array,
                   mask_B1LS: jax.Array) -> jax.Array:
        # HF scales q by head_dim**-0.5 before q @ k^T: attend's default scale, same math.
        out_BLHK = constrain(attend(q_BLHK, k_BSHK, v_BSHK, mask_B1LS=mask_B1LS), HEADS)
        return constrain(self.o(out_BLHK), ACT)

    def __call__(self, x_BLD: jax.Array, kv_BSD: jax.Array, mask_B1LS: jax.Array) -> jax.Array:
        k_BSHK, v_BSHK = self.project_kv(kv_BSD)
        return self.attend_out(self.project_q(x_BLD), k_BSHK, v_BSHK, mask_B1LS)


def _mlp(cfg: ModelConfig, rngs: nnx.Rngs) -> MLP:
    return MLP(cfg.d_model, cfg.mlp_dim, activation=cfg.activation, use_bias=cfg.mlp_bias,
               init_std=cfg.init_std, param_dtype=jnp.dtype(cfg.param_dtype),
               dtype=jnp.dtype(cfg.dtype), rngs=rngs)


# --------------------------------------------------------------------------- layers


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = _norm(cfg)
        self.attn = MultiHeadAttention(cfg, rngs=rngs)
        self.mlp_norm = _norm(cfg)
        self.mlp = _mlp(cfg, rngs)

    def __call__(self, x_BSD: jax.Array, mask_B1SS: jax.Array) -> jax.Array:
        h_BSD = self.attn_norm(x_BSD)
        x_BSD = constrain(x_BSD + self.attn(h_BSD, h_BSD, mask_B1SS), ACT)
        return constrain(x_BSD + self.mlp(self.mlp_norm(x_BSD)), ACT)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = _norm(cfg)
        self.attn = MultiHeadAttention(cfg, rngs=rngs)
        self.cross_norm = _norm(cfg)
        self.cross = MultiHeadAttention(cfg, rngs=rngs)
        self.mlp_norm = _norm(cfg)
        self.mlp = _mlp(cfg, rngs)

    def __call__(self, x_BLD: jax.Array, mask_B1LL: jax.Array, enc_BSD: jax.Array,
                 cross_mask_B1LS: jax.Array) -> jax.Array:
        h_BLD = self.attn_norm(x_BLD)
        x_BLD = constrain(x_BLD + self.attn(h_BLD, h_BLD, mask_B1LL), ACT)
        x_BLD = constrain(x_BLD + self.cross(self.cross_norm(x_BLD), enc_BSD, cross_mask_B1LS), ACT)
        return constrain(x_BLD + self.mlp(self.mlp_norm(x_BLD)), ACT)

    def extend(self, x_BLD: jax.Array, mask_B1LS: jax.Array, cache: KVCache, index: jax.Array,
               cross: KVCache, cross_mask_B1LS: jax.Array) -> tuple[jax.Array, KVCache]:
        """Incremental decoding: self-attention writes/reads ``cache``; cross-attention reads
        the encoder k/v ``cross`` projected once."""
        h_BLD = self.attn_norm(x_BLD)
        cache = cache.write(*self.attn.project_kv(h_BLD), index)
        x_BLD = constrain(x_BLD + self.attn.attend_out(self.attn.project_q(h_BLD), cache.k, cache.v,
                                                       mask_B1LS), ACT)
        q_BLHK = self.cross.project_q(self.cross_norm(x_BLD))
        x_BLD = constrain(x_BLD + self.cross.attend_out(q_BLHK, cross.k, cross.v, cross_mask_B1LS), ACT)
        return constrain(x_BLD + self.mlp(self.mlp_norm(x_BLD)), ACT), cache


def _layer_call(layer, x, *args):
    return layer(x, *args)


class Stack(nnx.Module):
    """Positions + (embed_norm) + layers + final_norm: the encoder or the decoder."""

    def __init__(self, cfg: ModelConfig, layer_cls: type, n_layers: int, *, rngs: nnx.Rngs):
        self.pos_embed = LearnedPositions(cfg, rngs=rngs) if cfg.position == "learned" else None
        self.embed_norm = _norm(cfg) if cfg.embed_norm else None
        self.layers = nnx.List([layer_cls(cfg, rngs=rngs) for _ in range(n_layers)])
        self.final_norm = _norm(cfg)
        self.position_offset, self.d_model = cfg.position_offset, cfg.d_model
        self.remat, self.dtype = cfg.remat, jnp.dtype(cfg.dtype)

    def positions(self, positions_BL: jax.Array) -> jax.Array:
        """Position embeddings pos_BLD at explicit positions (0-based per segment)."""
        if self.pos_embed is not None:
            return self.pos_embed(positions_BL)
        pos_BLD = sinusoidal_positions(positions_BL, self.d_model, self.position_offset)
        return constrain(pos_BLD.astype(self.dtype), ACT)

    def embed(self, tokens_BLD: jax.Array, positions_BL: jax.Array) -> jax.Array:
        """Scaled token embeddings -> first residual stream (+ positions, embed_norm)."""
        x_BLD = tokens_BLD + self.positions(positions_BL)
        if self.embed_norm is not None:
            x_BLD = self.embed_norm(x_BLD)
        return constrain(x_BLD, ACT)

    def __call__(self, x_BLD: jax.Array, *layer_args) -> jax.Array:
        layer_call = _layer_call
        if self.remat != "none":
            layer_call = nnx.remat(_layer_call, policy=REMAT_POLICIES[self.remat])
        for layer in self.layers:
            x_BLD = layer_call(layer, x_BLD, *layer_args)
        return constrain(self.final_norm(x_BLD), ACT)


# --------------------------------------------------------------------------- model


def _default_positions(ids_BL: jax.Array, positions_BL, segment_ids_BL):
    B, L = ids_BL.shape
    if positions_BL is None:
        positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    if segment_ids_BL is None:
        segment_ids_BL = jnp.ones((B, L), jnp.int32)
    return positions_BL, segment_ids_BL


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
        if cfg.remat != "none" and cfg.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat: unknown {cfg.remat!r}; known: none, {', '.join(REMAT_POLICIES)}")
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, param_dtype=pdt,
                           dtype=dt, rngs=rngs)
        self.encoder = Stack(cfg, EncoderLayer, cfg.n_layers, rngs=rngs)
        n_dec = cfg.n_layers if cfg.n_decoder_layers is None else cfg.n_decoder_layers
        self.decoder = Stack(cfg, DecoderLayer, n_dec, rngs=rngs)
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
        return self.encoder(x_BSD, bidirectional_segment_mask(enc_segment_ids_BS))

    def decode_embedded(self, tok_BLD: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array,
                        enc_BSD: jax.Array, enc_segment_ids_BS: jax.Array) -> jax.Array:
        x_BLD = self.decoder.embed(tok_BLD, positions_BL)
        x_BLD = self.decoder(x_BLD, causal_segment_mask(segment_ids_BL), enc_BSD,
                             cross_attention_mask(segment_ids_BL, enc_segment_ids_BS))
        return self.logits(x_BLD)

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        """Final decoder states -> float32 logits_BLV (tied head or ``lm_head``)."""
        if self.lm_head is None:
            logits_BLV = self.embed.attend(x_BLD)
        else:
            logits_BLV = self.lm_head(x_BLD)
        return constrain(logits_BLV.astype(jnp.float32), ("batch", "length", "vocab"))

    def encode(self, enc_inputs_BS: jax.Array, enc_positions_BS: jax.Array | None = None,
               enc_segment_ids_BS: jax.Array | None = None) -> jax.Array:
        """Source ids -> encoder output enc_BSD (after the encoder's final norm)."""
        enc_positions_BS, enc_segment_ids_BS = _default_positions(
            enc_inputs_BS, enc_positions_BS, enc_segment_ids_BS)
        return self.encode_embedded(self.embed_tokens(enc_inputs_BS), enc_positions_BS,
                                    enc_segment_ids_BS)

    def decode(self, inputs_BL: jax.Array, positions_BL: jax.Array | None, segment_ids_BL: jax.Array | None,
               enc_BSD: jax.Array, enc_segment_ids_BS: jax.Array | None = None) -> jax.Array:
        """Decoder inputs + encoder output -> float32 logits_BLV."""
        positions_BL, segment_ids_BL = _default_positions(inputs_BL, positions_BL, segment_ids_BL)
        if enc_segment_ids_BS is None:
            enc_segment_ids_BS = jnp.ones(enc_BSD.shape[:2], jnp.int32)
        return self.decode_embedded(self.embed_tokens(inputs_BL), positions_BL, segment_ids_BL,
                                    enc_BSD, enc_segment_ids_BS)

    def __call__(self, enc_inputs_BS: jax.Array, enc_positions_BS: jax.Array | None,
                 enc_segment_ids_BS: jax.Array | None, inputs_BL: jax.Array,
                 positions_BL: jax.Array | None = None,
                 segment_ids_BL: jax.Array | None = None) -> jax.Array:
        enc_positions_BS, enc_segment_ids_BS = _default_positions(
            enc_inputs_BS, enc_positions_BS, enc_segment_ids_BS)
        enc_BSD = self.encode(enc_inputs_BS, enc_positions_BS, enc_segment_ids_BS)
        return self.decode(inputs_BL, positions_BL, segment_ids_BL, enc_BSD, enc_segment_ids_BS)

    # ----------------------------------------------------------------- incremental decoding

    def init_cache(self, enc_BSD: jax.Array, enc_segment_ids_BS: jax.Array, max_len: int) -> DecodeCache:
        """Empty self-attention cache for ``max_len`` decoder tokens, plus every layer's
        cross-attention k/v projected once from the encoder output."""
        return encoder_decoder_cache(self.decoder.layers, enc_BSD, enc_segment_ids_BS, max_len, self.dtype,
                                     lambda layer, e: layer.cross.project_kv(e))

    def decode_step(self, inputs_BL: jax.Array, positions_BL: jax.Array, cache: DecodeCache,
                    segment_ids_BL: jax.Array | None = None) -> tuple[jax.Array, DecodeCache]:
        """L new decoder tokens against the cache -> (float32 logits_BLV, updated cache).

        Positions are explicit, so learned and sinusoidal tables are read at the new
        tokens' positions."""
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones(inputs_BL.shape, jnp.int32)
        index = cache.index
        cache, mask_B1LS, _ = cache.advance(positions_BL, segment_ids_BL)
        cross_mask_B1LS = cross_attention_mask(segment_ids_BL, cache.enc_segment_ids_BS)
        x_BLD = self.decoder.embed(self.embed_tokens(inputs_BL), positions_BL)
        layers = []
        for layer, layer_cache, cross in zip(self.decoder.layers, cache.layers, cache.cross):
            x_BLD, layer_cache = layer.extend(x_BLD, mask_B1LS, layer_cache, index, cross, cross_mask_B1LS)
            layers.append(layer_cache)
        x_BLD = constrain(self.decoder.final_norm(x_BLD), ACT)
        return self.logits(x_BLD), cache.with_layers(layers)
