"""KV caches for incremental decoding: plain pytrees carried through ``lax.while_loop``.

Shapes: B batch, L new tokens, S cache slots, G kv heads, K head_dim, N layers.

Per-layer storage keeps one ``KVCache`` per layer (a tuple); a stack of layers stored stacked
(`jaxft.models.scan.stack_layers`, what training keeps with ``model.scan_layers``) decodes with one
``KVCache`` whose arrays carry a leading layer axis, carried through the scan over the layers, each
layer writing its own slots through a ``LayerSlot`` view (`jaxft.models.scan.run_layers_cached`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxft.models.kernels import platform
from jaxft.models.masks import attention_mask
from jaxft.sharding import constrain

CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")
HEAD_MAJOR_AXES = ("batch", "kv_heads", "length", "head_dim")


def head_major_default() -> bool:
    """Whether new caches store keys/values head-major: on the CPU, where attention contracts
    [B, G, S, K] (`jaxft.models.attention._attend_head_major`), reading a step's keys is then free
    instead of a transposed copy of the whole cache, per layer and step.  Elsewhere the
    [B, S, G, K] layout that `jax.nn.dot_product_attention` and the fused kernels take."""
    return platform() == "cpu"


def _swap(a: jax.Array) -> jax.Array:
    """[.., S, G, K] <-> [.., G, S, K]."""
    return jnp.swapaxes(a, -3, -2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One attention layer's keys and values in the compute dtype, stored k_BSGK / v_BSGK or,
    ``head_major``, k_BGSK / v_BGSK (every layer's of a stacked stack: a leading layer axis N).
    `kv_BSGK` reads them as [B, S, G, K] either way (for head-major storage a transpose that the
    head-major attention's own transpose cancels, so no copy is made).

    A plain pytree (not NNX state): it is carried through ``lax.while_loop`` and
    gathered along the batch axis by beam search.  Sharded by logical axes:
    batch over the data axes, kv heads over ``tensor``.
    """

    k: jax.Array
    v: jax.Array
    head_major: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def zeros(cls, batch: int, length: int, heads: int, head_dim: int, dtype, layers: int | None = None) -> KVCache:
        """Empty, in the platform's layout (`head_major_default`); with ``layers``, for that many
        stacked layers (a leading layer axis)."""
        lead = () if layers is None else (layers,)
        head_major = head_major_default()
        shape = (batch, heads, length, head_dim) if head_major else (batch, length, heads, head_dim)
        zeros = jnp.zeros(lead + shape, dtype)
        return cls.of(zeros, zeros, head_major)

    @classmethod
    def of(cls, k: jax.Array, v: jax.Array, head_major: bool = False) -> KVCache:
        """Stored as given: [.., B, S, G, K], or [.., B, G, S, K] when ``head_major``."""
        axes = HEAD_MAJOR_AXES if head_major else CACHE_AXES
        lead = (None,) * (k.ndim - len(axes))  # a stacked stack's layer axis: replicated
        return cls(constrain(k, lead + axes), constrain(v, lead + axes), head_major)

    @classmethod
    def from_bsgk(cls, k_BSGK: jax.Array, v_BSGK: jax.Array) -> KVCache:
        """Keys/values given as [.., B, S, G, K], stored in the platform's layout (cross-attention's
        projected once from the encoder output)."""
        if head_major_default():
            return cls.of(_swap(k_BSGK), _swap(v_BSGK), True)
        return cls.of(k_BSGK, v_BSGK)

    def kv_BSGK(self) -> tuple[jax.Array, jax.Array]:
        """(k, v) as [.., B, S, G, K]."""
        return (_swap(self.k), _swap(self.v)) if self.head_major else (self.k, self.v)

    def rows(self, fn) -> KVCache:
        """``fn(array, axis)`` applied along the batch axis of k and v (1 when stacked)."""
        axis = self.k.ndim - len(CACHE_AXES)
        return KVCache.of(fn(self.k, axis), fn(self.v, axis), self.head_major)

    def write(self, k_BLGK: jax.Array, v_BLGK: jax.Array, index: jax.Array) -> KVCache:
        """Store L new keys/values at slots ``index .. index + L - 1`` (same slot for every row)."""
        axis = 2 if self.head_major else 1
        new = _swap if self.head_major else (lambda a: a)
        k = jax.lax.dynamic_update_slice_in_dim(self.k, new(k_BLGK).astype(self.k.dtype), index, axis=axis)
        v = jax.lax.dynamic_update_slice_in_dim(self.v, new(v_BLGK).astype(self.v.dtype), index, axis=axis)
        return KVCache.of(k, v, self.head_major)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerSlot:
    """Layer ``layer`` (a traced index) of a stacked ``KVCache``, as the scan over the layers hands
    it to that layer: `kv_BSGK` reads the layer's slice, ``write`` updates the stacked arrays in
    place (they are the scan's carry), so decoding never copies the cache of the other layers."""

    stack: KVCache
    layer: jax.Array

    def kv_BSGK(self) -> tuple[jax.Array, jax.Array]:
        one = lambda a: jax.lax.dynamic_index_in_dim(a, self.layer, 0, keepdims=False)  # noqa: E731
        return KVCache(one(self.stack.k), one(self.stack.v), self.stack.head_major).kv_BSGK()

    def write(self, k_BLGK: jax.Array, v_BLGK: jax.Array, index: jax.Array) -> LayerSlot:
        """Store L new keys/values of this layer at slots ``index .. index + L - 1``."""
        stack = self.stack
        if stack.head_major:
            at, k_BLGK, v_BLGK = (self.layer, 0, 0, index, 0), _swap(k_BLGK), _swap(v_BLGK)
        else:
            at = (self.layer, 0, index, 0, 0)
        k = jax.lax.dynamic_update_slice(stack.k, k_BLGK[None].astype(stack.k.dtype), at)
        v = jax.lax.dynamic_update_slice(stack.v, v_BLGK[None].astype(stack.v.dtype), at)
        return LayerSlot(KVCache.of(k, v, stack.head_major), self.layer)


def through_cache(k_BLGK: jax.Array, v_BLGK: jax.Array, cache: KVCache | LayerSlot | None,
                  index: jax.Array | None) -> tuple[jax.Array, jax.Array, KVCache | LayerSlot | None]:
    """Self-attention keys/values (k_BSGK, v_BSGK, cache): the L new tokens' own without a
    cache (full forward); with one, written at slot ``index`` and read back from all S slots."""
    if cache is None:
        return k_BLGK, v_BLGK, None
    cache = cache.write(k_BLGK, v_BLGK, index)
    return (*cache.kv_BSGK(), cache)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCache:
    """Everything a model needs to decode one more token, for every layer.

    - ``layers``: self-attention ``KVCache`` per decoder layer, S = max total length (stacked
      layers: one ``KVCache`` with a leading layer axis; ``cross`` likewise);
    - ``segment_ids_BS``: 1 where a slot holds a real token, 0 for an empty slot or
      (decoder-only) a left-padding slot of the prompt; ``positions_BS``: each
      slot's token position (RoPE is applied before caching; ALiBi and T5's
      relative bias are functions of query and key positions);
    - ``index``: int32 scalar, the next slot to write; all rows write the same
      slot, so prompts are left-aligned to a common end (see ``jaxft.eval.cache``);
    - encoder-decoder only: ``cross`` (cross-attention k/v per layer, projected once
      from the encoder output) and ``enc_segment_ids_BS`` (0 = source padding).
    """

    layers: tuple[KVCache, ...] | KVCache
    segment_ids_BS: jax.Array
    positions_BS: jax.Array
    index: jax.Array
    cross: tuple[KVCache, ...] | KVCache = ()
    enc_segment_ids_BS: jax.Array | None = None

    @classmethod
    def empty(cls, layers: tuple[KVCache, ...] | KVCache, batch: int, length: int, **cross) -> DecodeCache:
        zeros_BS = constrain(jnp.zeros((batch, length), jnp.int32), ("batch", "length"))
        return cls(_kv(layers), zeros_BS, zeros_BS, jnp.zeros((), jnp.int32), **cross)

    def advance(self, positions_BL: jax.Array,
                segment_ids_BL: jax.Array) -> tuple[DecodeCache, jax.Array, jax.Array]:
        """Record L new tokens at ``index``; returns (cache with index += L, the self-attention
        mask_B1LS of the new queries over all slots, kv_positions_BS).

        The layers' k/v are written by the caller (the attention modules), at the
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

    def with_layers(self, layers: list[KVCache] | tuple[KVCache, ...] | KVCache) -> DecodeCache:
        return dataclasses.replace(self, layers=_kv(layers))

    def gather_rows(self, rows_B: jax.Array) -> DecodeCache:
        """Reorder the batch rows of the self-attention state (beam search).  ``cross`` and
        ``enc_segment_ids_BS`` are left alone: beams only move within their own input."""
        take = lambda a, axis=0: jnp.take(a, rows_B, axis=axis)  # noqa: E731
        return dataclasses.replace(self, layers=_rows(self.layers, take), segment_ids_BS=take(self.segment_ids_BS),
                                   positions_BS=take(self.positions_BS))

    def repeat_rows(self, n: int) -> DecodeCache:
        """Each row n times in a row (``jnp.repeat``): one copy per beam / sample."""
        rep = lambda a, axis=0: None if a is None else jnp.repeat(a, n, axis=axis)  # noqa: E731
        return dataclasses.replace(self, layers=_rows(self.layers, rep), segment_ids_BS=rep(self.segment_ids_BS),
                                   positions_BS=rep(self.positions_BS), cross=_rows(self.cross, rep),
                                   enc_segment_ids_BS=rep(self.enc_segment_ids_BS))


def _kv(layers: list[KVCache] | tuple[KVCache, ...] | KVCache) -> tuple[KVCache, ...] | KVCache:
    return layers if isinstance(layers, KVCache) else tuple(layers)


def _rows(layers: tuple[KVCache, ...] | KVCache, fn) -> tuple[KVCache, ...] | KVCache:
    """``fn(array, batch_axis)`` over the k/v of per-layer caches or of a stacked one."""
    return layers.rows(fn) if isinstance(layers, KVCache) else tuple(c.rows(fn) for c in layers)


def self_attention_caches(n_layers: int, stacked: bool, batch: int, length: int, heads: int, head_dim: int,
                          dtype) -> tuple[KVCache, ...] | KVCache:
    """Empty self-attention caches of a stack: one per layer, or one with a leading layer axis
    for stacked layers."""
    if stacked:
        return KVCache.zeros(batch, length, heads, head_dim, dtype, layers=n_layers)
    return tuple(KVCache.zeros(batch, length, heads, head_dim, dtype) for _ in range(n_layers))


def encoder_decoder_cache(layers, cross_kv: list[tuple[jax.Array, jax.Array]] | tuple[jax.Array, jax.Array],
                          enc_segment_ids_BS: jax.Array, max_len: int, dtype) -> DecodeCache:
    """Empty self-attention cache for ``max_len`` decoder tokens over the decoder ``layers``, with
    the cross-attention k/v each layer projected once from the encoder output (T5 and BART):
    ``cross_kv`` is a list of (k_BSHK, v_BSHK), one per layer, or for stacked layers one pair
    (k_NBSHK, v_NBSHK) (`jaxft.models.scan.map_layers` gives either)."""
    B = enc_segment_ids_BS.shape[0]
    _, H, K = layers[0].attn.k.kernel.shape
    stacked = not isinstance(cross_kv, list)
    self_kv = self_attention_caches(len(layers), stacked, B, max_len, H, K, dtype)
    cross = KVCache.from_bsgk(*cross_kv) if stacked else tuple(KVCache.from_bsgk(k, v) for k, v in cross_kv)
    return DecodeCache.empty(self_kv, B, max_len, cross=cross, enc_segment_ids_BS=enc_segment_ids_BS.astype(jnp.int32))
