"""T5 / mT5 / umT5 encoder-decoder by config switches (``family: t5``).

Pre-norm residual blocks with the T5 layer norm (RMSNorm, no bias, eps 1e-6),
no attention scaling (T5 folds 1/sqrt(d) into the init), and a bucketed
relative position bias added to the self-attention logits.  Switches:

- ``activation``: ``relu`` (T5 v1.0: ``up``, ``down``) or ``geglu`` (v1.1/mT5/umT5
  gated tanh-GELU: ``gate`` = HF ``wi_0``, ``up`` = ``wi_1``, ``down`` = ``wo``);
- ``relative_bias_per_layer``: umT5 gives every self-attention its own bias
  table; T5/mT5 have one table per stack, shared by all its layers;
- ``tie_embeddings``: T5 v1.0 ties the head to the embedding and scales the
  decoder output by ``d_model ** -0.5`` first (HF ``scale_decoder_outputs``);
- ``init_std`` is T5's ``initializer_factor`` (presets: 1.0), a multiplier on
  the scaled stds below.

Dropout (`jaxft.models.dropout`, train step only), where HF T5 applies its
``dropout_rate``: ``model.dropout`` on each stack's input embeddings, on every
sublayer output before its residual add and after each stack's final norm;
``attention_dropout`` on the attention probabilities; ``activation_dropout``
on the MLP hidden after the activation.

Parameter paths (stable; the HF converter maps onto them)::

    embed/embedding                              [vocab, embed]    (HF shared)
    {encoder,decoder}/rel_bias/embedding         [buckets, heads]  (T5/mT5: one per stack)
    {encoder,decoder}/layers/{i}/attn/rel_bias/embedding           (umT5: one per layer)
    {encoder,decoder}/layers/{i}/attn_norm/scale [embed]
    {encoder,decoder}/layers/{i}/attn/{q,k,v}/kernel  [embed, heads, head_dim]
    {encoder,decoder}/layers/{i}/attn/o/kernel   [heads, head_dim, embed]
    decoder/layers/{i}/cross_norm/scale          [embed]
    decoder/layers/{i}/cross/{q,k,v,o}/kernel    (as attn)
    {encoder,decoder}/layers/{i}/mlp_norm/scale  [embed]
    {encoder,decoder}/layers/{i}/mlp/{gate,up}/kernel  [embed, mlp]  (gate: geglu only)
    {encoder,decoder}/layers/{i}/mlp/down/kernel [mlp, embed]
    {encoder,decoder}/final_norm/scale           [embed]
    lm_head/kernel                               [embed, vocab]    (unless tie_embeddings)

Pieces are separable for a KV cache: ``T5Attention.kv`` projects keys/values
(once per source for cross-attention), ``T5Attention.attend`` attends a query
stream to given keys/values, ``T5Attention.__call__`` is self-attention with or
without a cache, and ``RelativeBias`` is a function of query and key
*positions* (``rel = k_pos - q_pos``), so it serves packed rows and
one-token-at-a-time decoding alike.
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
from jaxft.models.layers import (ACT, HEADS, MLP, Embed, Linear, check_remat, default_positions,
                                 default_segment_ids, norm_from_config, normal_param)
from jaxft.models.masks import bidirectional_segment_mask, causal_segment_mask, cross_attention_mask, fold_rows
from jaxft.models.scan import map_layers, run_layers, run_layers_cached
from jaxft.sharding import constrain

# --------------------------------------------------------------------------- buckets


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
    """T5's bucket (int32 in [0, num_buckets)) of ``relative = key_pos - query_pos``.

    As mesh-tf ``_relative_position_bucket`` (and HF): bidirectional gives half of
    the buckets to keys after the query (``rel > 0``); unidirectional (causal)
    maps every ``rel > 0`` to 0.  Distances below ``max_exact`` (half of the
    buckets left) get one bucket each, larger ones log-spaced buckets up to
    ``max_distance``, beyond which they share the last bucket.  The log is taken
    in float32, as in the original, so boundary cases round the same way.
    """
    rel = jnp.asarray(relative_position, jnp.int32)
    bucket = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).astype(jnp.int32) * num_buckets
        dist = jnp.abs(rel)
    else:
        dist = jnp.maximum(-rel, 0)
    max_exact = num_buckets // 2
    # max(dist, 1): log(0) would be -inf; those entries take the exact branch anyway.
    log_ratio = jnp.log(jnp.maximum(dist, 1).astype(jnp.float32) / max_exact)
    large = max_exact + (log_ratio / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(dist < max_exact, dist, large)


class RelativeBias(nnx.Module):
    """Bucketed relative position bias: ``embedding`` [buckets, heads] -> bias_BHLS (float32)."""

    def __init__(self, cfg: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
        # HF T5PreTrainedModel._init_weights: normal, std factor * d_model**-0.5.
        self.embedding = normal_param(rngs, (cfg.relative_buckets, cfg.n_heads), (None, "heads"),
                                      cfg.init_std * cfg.d_model ** -0.5, jnp.dtype(cfg.param_dtype))
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance

    def __call__(self, q_positions_BL: jax.Array, k_positions_BS: jax.Array) -> jax.Array:
        """bias_BHLS; n query rows per key row (beams / samples of one input): folded, [B, H, n x L, S]."""
        q_positions_BL = fold_rows(q_positions_BL, k_positions_BS.shape[0])
        rel_BLS = k_positions_BS[:, None, :] - q_positions_BL[:, :, None]
        bucket_BLS = relative_position_bucket(rel_BLS, bidirectional=self.bidirectional,
                                              num_buckets=self.num_buckets, max_distance=self.max_distance)
        table_NH = self.embedding[...].astype(jnp.float32)
        bias_BLSH = jnp.take(table_NH, bucket_BLS, axis=0)
        return constrain(jnp.transpose(bias_BLSH, (0, 3, 1, 2)), ("batch", "heads", "length", None))


# --------------------------------------------------------------------------- blocks


class T5Attention(nnx.Module):
    """Unscaled multi-head attention; self- (optionally with its own ``rel_bias``) or cross-.

    Init (mesh-tf / HF ``_init_weights``, times ``init_std`` = initializer_factor):
    q ``(d_model * head_dim)**-0.5``, k and v ``d_model**-0.5``, o ``(heads * head_dim)**-0.5``.
    """

    def __init__(self, cfg: ModelConfig, *, rel_bias: bool = False, bidirectional: bool = True,
                 rngs: nnx.Rngs):
        D, H, K, f = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.init_std
        kw = dict(param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        into = dict(in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
        self.q = Linear((D,), (H, K), init_std=f * (D * K) ** -0.5, **into)
        self.k = Linear((D,), (H, K), init_std=f * D ** -0.5, **into)
        self.v = Linear((D,), (H, K), init_std=f * D ** -0.5, **into)
        self.o = Linear((H, K), (D,), in_axes=("heads", "head_dim"), out_axes=("embed",),
                        init_std=f * (H * K) ** -0.5, **kw)
        self.rel_bias = RelativeBias(cfg, bidirectional=bidirectional, rngs=rngs) if rel_bias else None
        self.attention_dropout_rate = check_rate("model.attention_dropout", cfg.attention_dropout)
        self.attention_kernel = cfg.attention_kernel

    def kv(self, x_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values k_BSHK, v_BSHK of a stream (what a KV cache stores)."""
        return constrain(self.k(x_BSD), HEADS), constrain(self.v(x_BSD), HEADS)

    def attend(self, x_BLD: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array, mask_B1LS: jax.Array,
               bias_BHLS: jax.Array | None = None) -> jax.Array:
        """Queries from x_BLD attend to the given keys/values; returns out_BLD."""
        q_BLHK = constrain(self.q(x_BLD), HEADS)
        out_BLHK = attend(q_BLHK, k_BSHK, v_BSHK, mask_B1LS=mask_B1LS, bias_BHLS=bias_BHLS, scale=1.0,
                          dropout_rate=self.attention_dropout_rate, kernel=self.attention_kernel)
        return self.o(constrain(out_BLHK, HEADS))

    def __call__(self, x_BLD: jax.Array, mask_B1LS: jax.Array, bias_BHLS: jax.Array | None = None,
                 cache: KVCache | None = None, index: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Self-attention of x_BLD -> (out_BLD, cache).  Full forward: no ``cache``, the keys
        are x's own.  Decoding: x's k/v are written at slot ``index`` of ``cache`` and the
        queries attend to all its slots."""
        k_BSHK, v_BSHK, cache = through_cache(*self.kv(x_BLD), cache, index)
        return self.attend(x_BLD, k_BSHK, v_BSHK, mask_B1LS, bias_BHLS), cache


def _mlp(cfg: ModelConfig, rngs: nnx.Rngs) -> MLP:
    """T5 MLP; init: in (gate/up) ``d_model**-0.5``, out (down) ``mlp_dim**-0.5`` (HF/mesh-tf)."""
    mlp = MLP(cfg.d_model, cfg.mlp_dim, activation=cfg.activation, use_bias=False,
              init_std=cfg.init_std * cfg.d_model ** -0.5, param_dtype=jnp.dtype(cfg.param_dtype),
              dtype=jnp.dtype(cfg.dtype), rngs=rngs, activation_dropout=cfg.activation_dropout)
    # layers.MLP takes one std: rescale the draw of ``down`` to its own std.
    down = mlp.down.kernel
    down.set_value((down[...] * (cfg.d_model / cfg.mlp_dim) ** 0.5).astype(down[...].dtype))
    return mlp


class T5Block(nnx.Module):
    """``x + attn(norm x)`` [``+ cross(norm x, enc)``] ``+ mlp(norm x)``."""

    def __init__(self, cfg: ModelConfig, *, decoder: bool, rngs: nnx.Rngs):
        self.attn_norm = norm_from_config(cfg)
        self.attn = T5Attention(cfg, rel_bias=cfg.relative_bias_per_layer, bidirectional=not decoder,
                                rngs=rngs)
        self.cross_norm = norm_from_config(cfg) if decoder else None
        self.cross = T5Attention(cfg, rngs=rngs) if decoder else None
        self.mlp_norm = norm_from_config(cfg)
        self.mlp = _mlp(cfg, rngs)
        self.dropout_rate = check_rate("model.dropout", cfg.dropout)

    def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array, kv_positions_BS: jax.Array,
                 mask_B1LS: jax.Array, bias_BHLS: jax.Array | None, enc_BSD: jax.Array | None = None,
                 cross_mask_B1LS: jax.Array | None = None, cache: KVCache | None = None,
                 index: jax.Array | None = None, cross: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """The residual block -> (x_BLD, cache).  Full forward: no ``cache`` (``kv_positions_BS``
        = ``positions_BL``), cross-attention projects k/v from ``enc_BSD``.  Incremental decoding:
        self-attention writes/reads ``cache``, cross-attention reads the encoder k/v ``cross``."""
        if self.attn.rel_bias is not None:  # umT5: this layer's own table
            bias_BHLS = self.attn.rel_bias(positions_BL, kv_positions_BS)
        rate = self.dropout_rate
        h_BLD, cache = self.attn(self.attn_norm(x_BLD), mask_B1LS, bias_BHLS, cache, index)
        x_BLD = constrain(x_BLD + dropout(h_BLD, rate), ACT)
        if self.cross is not None:
            k_BSHK, v_BSHK = self.cross.kv(enc_BSD) if cross is None else cross.kv_BSGK()
            h_BLD = self.cross.attend(self.cross_norm(x_BLD), k_BSHK, v_BSHK, cross_mask_B1LS)
            x_BLD = constrain(x_BLD + dropout(h_BLD, rate), ACT)
        return constrain(x_BLD + dropout(self.mlp(self.mlp_norm(x_BLD)), rate), ACT), cache


def _block_call(block: T5Block, *args):
    return block(*args)[0]


class T5Stack(nnx.Module):
    """Encoder (bidirectional) or decoder (causal, with cross-attention) layers + final norm."""

    def __init__(self, cfg: ModelConfig, *, decoder: bool, rngs: nnx.Rngs):
        n = (cfg.n_decoder_layers or cfg.n_layers) if decoder else cfg.n_layers
        shared = not cfg.relative_bias_per_layer
        self.rel_bias = RelativeBias(cfg, bidirectional=not decoder, rngs=rngs) if shared else None
        self.layers = build_layers(n, lambda r: T5Block(cfg, decoder=decoder, rngs=r), rngs)
        self.final_norm = norm_from_config(cfg)
        self.remat, self.scan_layers = cfg.remat, cfg.scan_layers
        self.dropout_rate = check_rate("model.dropout", cfg.dropout)

    def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array, mask_B1LL: jax.Array,
                 enc_BSD: jax.Array | None = None, cross_mask_B1LS: jax.Array | None = None) -> jax.Array:
        """Embedded tokens -> final-normed states (dropout on the input and the output, as HF)."""
        bias_BHLL = None if self.rel_bias is None else self.rel_bias(positions_BL, positions_BL)
        x_BLD = dropout(x_BLD, self.dropout_rate)
        x_BLD = run_layers(self.layers, _block_call, x_BLD, positions_BL, positions_BL, mask_B1LL, bias_BHLL,
                           enc_BSD, cross_mask_B1LS, remat=self.remat, scan=self.scan_layers)
        return dropout(self.final_norm(x_BLD), self.dropout_rate)

    def extend(self, x_BLD: jax.Array, positions_BL: jax.Array, cache: DecodeCache,
               segment_ids_BL: jax.Array) -> tuple[jax.Array, DecodeCache]:
        """Decoder stack over L new tokens with a KV cache -> (final-normed x_BLD, cache)."""
        index = cache.index
        cache, mask_B1LS, kv_positions_BS = cache.advance(positions_BL, segment_ids_BL)
        cross_mask_B1LS = cross_attention_mask(segment_ids_BL, cache.enc_segment_ids_BS)
        bias_BHLS = None if self.rel_bias is None else self.rel_bias(positions_BL, kv_positions_BS)

        def call(layer, x_BLD, layer_cache, cross):
            x_BLD, layer_cache = layer(x_BLD, positions_BL, kv_positions_BS, mask_B1LS, bias_BHLS, None,
                                       cross_mask_B1LS, cache.layer_view(layer_cache), index, cross)
            return x_BLD, layer_cache.slot if cache.pool else layer_cache

        x_BLD, layers = run_layers_cached(self.layers, call, dropout(x_BLD, self.dropout_rate), cache.layers,
                                          cache.cross)
        return dropout(self.final_norm(x_BLD), self.dropout_rate), cache.with_layers(layers)


# --------------------------------------------------------------------------- model


class T5(nnx.Module):
    """``model(enc_inputs_BS, enc_positions_BS, enc_segment_ids_BS, inputs_BL, positions_BL,
    segment_ids_BL) -> logits_BLV`` (float32).

    ``inputs`` are decoder inputs (targets shifted right behind ``decoder_start_id``).
    Segment ids: 1..n per packed example, 0 = padding; positions restart at 0 per
    segment.  Positions / segment ids may be None: one example per row.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        check_remat(cfg.remat)
        if cfg.position != "relative":
            raise ValueError(f"model.position: family t5 needs 'relative', got {cfg.position!r}")
        if cfg.activation not in ("relu", "geglu"):
            raise ValueError(f"model.activation: family t5 supports relu (T5 v1.0) and geglu "
                             f"(v1.1/mT5/umT5), got {cfg.activation!r}")
        if cfg.n_kv_heads not in (None, cfg.n_heads):
            raise ValueError(f"model.n_kv_heads: family t5 is multi-head attention, got {cfg.n_kv_heads}")
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        # Embedding std 1.0 (times the factor), as mesh-tf / HF.
        self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, param_dtype=pdt,
                           dtype=dt, rngs=rngs)
        self.encoder = T5Stack(cfg, decoder=False, rngs=rngs)
        self.decoder = T5Stack(cfg, decoder=True, rngs=rngs)
        # Untied head: t5x's fan-in std d_model**-0.5 (HF uses 1.0) -> O(1) logits at init.
        self.lm_head = None if cfg.tie_embeddings else Linear(
            (cfg.d_model,), (cfg.vocab_size,), in_axes=("embed",), out_axes=("vocab",),
            init_std=cfg.init_std * cfg.d_model ** -0.5, param_dtype=pdt, dtype=dt,
            out_dtype=jnp.float32, rngs=rngs)
        self.tied_scale = cfg.d_model ** -0.5
        self.dtype = dt

    def encode(self, enc_inputs_BS: jax.Array, enc_positions_BS: jax.Array | None = None,
               enc_segment_ids_BS: jax.Array | None = None) -> jax.Array:
        """Source token ids -> encoder output enc_BSD (after the final norm)."""
        return self.encode_embedded(self.embed(enc_inputs_BS), enc_positions_BS, enc_segment_ids_BS)

    def encode_embedded(self, x_BSD: jax.Array, positions_BS: jax.Array | None = None,
                        segment_ids_BS: jax.Array | None = None) -> jax.Array:
        """``encode`` from already-embedded source tokens x_BSD (soft prompts, gradient tests)."""
        positions_BS, segment_ids_BS = default_positions(x_BSD.shape, positions_BS, segment_ids_BS)
        return self.encoder(constrain(x_BSD, ACT), positions_BS, bidirectional_segment_mask(segment_ids_BS))

    def decode(self, inputs_BL: jax.Array, positions_BL: jax.Array | None, segment_ids_BL: jax.Array | None,
               enc_BSD: jax.Array, enc_segment_ids_BS: jax.Array | None = None) -> jax.Array:
        """Decoder input ids + encoder output -> float32 logits_BLV."""
        return self.decode_embedded(self.embed(inputs_BL), positions_BL, segment_ids_BL, enc_BSD,
                                    enc_segment_ids_BS)

    def decode_embedded(self, x_BLD: jax.Array, positions_BL: jax.Array | None,
                        segment_ids_BL: jax.Array | None, enc_BSD: jax.Array,
                        enc_segment_ids_BS: jax.Array | None = None) -> jax.Array:
        """``decode`` from already-embedded decoder inputs x_BLD."""
        return self.logits(self.decode_hidden(x_BLD, positions_BL, segment_ids_BL, enc_BSD, enc_segment_ids_BS))

    def decode_hidden(self, x_BLD: jax.Array, positions_BL: jax.Array | None,
                      segment_ids_BL: jax.Array | None, enc_BSD: jax.Array,
                      enc_segment_ids_BS: jax.Array | None = None) -> jax.Array:
        """Embedded decoder inputs -> decoder output h_BLD (after the final norm; input of ``logits``)."""
        positions_BL, segment_ids_BL = default_positions(x_BLD.shape, positions_BL, segment_ids_BL)
        enc_segment_ids_BS = default_segment_ids(enc_BSD.shape, enc_segment_ids_BS)
        return self.decoder(constrain(x_BLD, ACT), positions_BL, causal_segment_mask(segment_ids_BL),
                            enc_BSD, cross_attention_mask(segment_ids_BL, enc_segment_ids_BS))

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        """The head alone: decoder output [B, L, D] (after final norm) -> float32 logits_BLV."""
        if self.lm_head is None:  # T5 v1.0: tied head on d_model**-0.5-scaled outputs
            logits_BLV = self.embed.attend(x_BLD * jnp.asarray(self.tied_scale, x_BLD.dtype))
        else:
            logits_BLV = self.lm_head(x_BLD)
        return constrain(logits_BLV.astype(jnp.float32), ("batch", "length", "vocab"))

    def hidden(self, enc_inputs_BS: jax.Array, enc_positions_BS: jax.Array | None,
               enc_segment_ids_BS: jax.Array | None, inputs_BL: jax.Array,
               positions_BL: jax.Array | None = None, segment_ids_BL: jax.Array | None = None) -> jax.Array:
        """``__call__`` without the head: decoder output h_BLD, ``logits(hidden(...)) == __call__(...)``."""
        enc_BSD = self.encode(enc_inputs_BS, enc_positions_BS, enc_segment_ids_BS)
        enc_segment_ids_BS = default_segment_ids(enc_inputs_BS.shape, enc_segment_ids_BS)
        return self.decode_hidden(self.embed(inputs_BL), positions_BL, segment_ids_BL, enc_BSD, enc_segment_ids_BS)

    def __call__(self, enc_inputs_BS: jax.Array, enc_positions_BS: jax.Array | None,
                 enc_segment_ids_BS: jax.Array | None, inputs_BL: jax.Array,
                 positions_BL: jax.Array | None = None, segment_ids_BL: jax.Array | None = None) -> jax.Array:
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
        """L new decoder tokens against the cache -> (float32 logits_BLV, updated cache)."""
        segment_ids_BL = default_segment_ids(inputs_BL.shape, segment_ids_BL)
        x_BLD, cache = self.decoder.extend(constrain(self.embed(inputs_BL), ACT), positions_BL, cache,
                                           segment_ids_BL)
        return self.logits(x_BLD), cache
