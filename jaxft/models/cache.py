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

from jaxft.models.cache_pool import PooledRows
from jaxft.models.kernels import materialized, platform
from jaxft.models.masks import attention_mask
from jaxft.sharding import constrain

CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")
HEAD_MAJOR_AXES = ("batch", "kv_heads", "length", "head_dim")
KEYS_LAST_AXES = ("batch", "kv_heads", "head_dim", "length")  # head-major keys, slots last


def head_major_default() -> bool:
    """Whether new caches are stored head-major ([B, G, ., .]): on the CPU, where attention
    contracts head-major operands (`jaxft.models.attention._attend_head_major`), a step then reads
    the cache as it is instead of a transposed copy of the whole cache, per layer and step.
    Elsewhere the [B, S, G, K] layout that `jax.nn.dot_product_attention` and the fused kernels
    take."""
    return platform() == "cpu"


def keys_last_default(group: int) -> bool:
    """Whether head-major keys are stored [B, G, K, S] (slots last) rather than [B, G, S, K]: on
    the CPU, for grouped-query attention (``group`` = query heads per kv head >= 2).  A step's
    query . keys product then contracts the keys' second-minor dim, which XLA:CPU runs 3-4x
    faster than contracting the minor one (8 rows, 4 kv heads x 2, 640 slots, head_dim 32: 78
    against 291 us).  With one query head per kv head the product is a matrix-vector one, for
    which XLA:CPU transposes [B, G, K, S] keys back every step (measured on mT5): [B, G, S, K]."""
    return head_major_default() and group >= 2


def _swap(a: jax.Array) -> jax.Array:
    """[.., S, G, K] <-> [.., G, S, K]."""
    return jnp.swapaxes(a, -3, -2)


def _keys_in(a: jax.Array, keys_last: bool) -> jax.Array:
    """Head-major keys from [.., S, G, K]: [.., G, K, S] when ``keys_last``, else [.., G, S, K]."""
    return jnp.moveaxis(a, -3, -1) if keys_last else _swap(a)


def _keys_out(a: jax.Array, keys_last: bool) -> jax.Array:
    """Head-major keys back to [.., S, G, K]."""
    return jnp.moveaxis(a, -1, -3) if keys_last else _swap(a)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One attention layer's keys and values in the compute dtype, stored k_BSGK / v_BSGK or,
    ``head_major``, k_BGSK / v_BGSK, or k_BGKS / v_BGSK when also ``keys_last`` (every layer's
    of a stacked stack: a leading layer axis N).  `kv_BSGK` reads them as [B, S, G, K] in every
    layout (for head-major storage transposes that the head-major attention's own transposes
    cancel, so no copy is made).

    A plain pytree (not NNX state): it is carried through ``lax.while_loop`` and
    gathered along the batch axis by beam search.  Sharded by logical axes:
    batch over the data axes, kv heads over ``tensor``.
    """

    k: jax.Array
    v: jax.Array
    head_major: bool = dataclasses.field(default=False, metadata=dict(static=True))
    keys_last: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def zeros(cls, batch: int, length: int, heads: int, head_dim: int, dtype, layers: int | None = None,
              group: int = 1) -> KVCache:
        """Empty, in the platform's layout (`head_major_default`, `keys_last_default` for
        ``group`` query heads per kv head); with ``layers``, for that many stacked layers (a
        leading layer axis)."""
        lead = () if layers is None else (layers,)
        zeros_BSGK = jnp.zeros(lead + (batch, length, heads, head_dim), dtype)
        if head_major_default():
            keys_last = keys_last_default(group)
            return cls.of(_keys_in(zeros_BSGK, keys_last), _swap(zeros_BSGK), True, keys_last)
        return cls.of(zeros_BSGK, zeros_BSGK)

    @classmethod
    def of(cls, k: jax.Array, v: jax.Array, head_major: bool = False, keys_last: bool = False) -> KVCache:
        """Stored as given: [.., B, S, G, K], or when ``head_major`` [.., B, G, S, K] (keys
        [.., B, G, K, S] when ``keys_last``)."""
        if keys_last and not head_major:
            raise ValueError("KVCache: keys_last is a head-major layout")
        v_axes = HEAD_MAJOR_AXES if head_major else CACHE_AXES
        k_axes = KEYS_LAST_AXES if keys_last else v_axes
        lead = (None,) * (k.ndim - len(CACHE_AXES))  # a stacked stack's layer axis: replicated
        return cls(constrain(k, lead + k_axes), constrain(v, lead + v_axes), head_major, keys_last)

    @classmethod
    def from_bsgk(cls, k_BSGK: jax.Array, v_BSGK: jax.Array) -> KVCache:
        """Keys/values given as [.., B, S, G, K], stored in the platform's layout (cross-attention's
        projected once from the encoder output: T5 and BART, one query head per kv head)."""
        if head_major_default():
            return cls.of(_swap(k_BSGK), _swap(v_BSGK), True)
        return cls.of(k_BSGK, v_BSGK)

    def kv_BSGK(self) -> tuple[jax.Array, jax.Array]:
        """(k, v) as [.., B, S, G, K]."""
        if not self.head_major:
            return self.k, self.v
        return _keys_out(self.k, self.keys_last), _swap(self.v)

    def rows(self, fn) -> KVCache:
        """``fn(array, axis)`` applied along the batch axis of k and v (1 when stacked)."""
        axis = self.k.ndim - len(CACHE_AXES)
        return KVCache.of(fn(self.k, axis), fn(self.v, axis), self.head_major, self.keys_last)

    def slot_axes(self) -> tuple[int, int]:
        """The slot axis of k and of v, counted from the end (the same for a stacked cache's arrays)."""
        if not self.head_major:
            return -3, -3
        return -1 if self.keys_last else -2, -2

    def pooled(self, n: int, prompt: int) -> KVCache:
        """Slots ``0 .. prompt-1``, then the slots after them n times (`PooledRows`' layout).
        Head-major keys become slots-last: a pool is read by n >= 2 query rows, the case
        `keys_last_default` stores them so for."""
        def pool(a: jax.Array, axis: int) -> jax.Array:
            axis += a.ndim
            own = jax.lax.slice_in_dim(a, prompt, a.shape[axis], axis=axis)
            return jnp.concatenate([jax.lax.slice_in_dim(a, 0, prompt, axis=axis)] + [own] * n, axis=axis)

        k_axis, v_axis = self.slot_axes()
        k = pool(self.k, k_axis)
        if self.head_major and not self.keys_last:  # [.., G, S, K] -> [.., G, K, S]
            k = jnp.swapaxes(k, -1, -2)
        return KVCache.of(k, pool(self.v, v_axis), self.head_major, self.head_major)

    def stored(self, k_BLGK: jax.Array, v_BLGK: jax.Array) -> tuple[jax.Array, jax.Array, int, int]:
        """New keys/values in this cache's layout and dtype, and the slot axis of each (counted
        from the end, so the same for a stacked cache's arrays)."""
        k, v = k_BLGK.astype(self.k.dtype), v_BLGK.astype(self.v.dtype)
        if self.head_major:
            k, v = _keys_in(k, self.keys_last), _swap(v)
        return k, v, *self.slot_axes()

    def write(self, k_BLGK: jax.Array, v_BLGK: jax.Array, index: jax.Array) -> KVCache:
        """Store L new keys/values at slots ``index .. index + L - 1`` (same slot for every row)."""
        k_new, v_new, k_axis, v_axis = self.stored(k_BLGK, v_BLGK)
        k = jax.lax.dynamic_update_slice_in_dim(self.k, k_new, index, axis=self.k.ndim + k_axis)
        v = jax.lax.dynamic_update_slice_in_dim(self.v, v_new, index, axis=self.v.ndim + v_axis)
        return KVCache.of(k, v, self.head_major, self.keys_last)


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
        return KVCache(one(self.stack.k), one(self.stack.v), self.stack.head_major, self.stack.keys_last).kv_BSGK()

    def write(self, k_BLGK: jax.Array, v_BLGK: jax.Array, index: jax.Array) -> LayerSlot:
        """Store L new keys/values of this layer at slots ``index .. index + L - 1``."""
        stack = self.stack
        k_new, v_new, k_axis, v_axis = stack.stored(k_BLGK, v_BLGK)

        def at(a: jax.Array, axis: int) -> tuple:
            starts = [0] * a.ndim
            starts[0], starts[a.ndim + axis] = self.layer, index
            return tuple(starts)

        k = jax.lax.dynamic_update_slice(stack.k, k_new[None], at(stack.k, k_axis))
        v = jax.lax.dynamic_update_slice(stack.v, v_new[None], at(stack.v, v_axis))
        return LayerSlot(KVCache.of(k, v, stack.head_major, stack.keys_last), self.layer)


@dataclasses.dataclass(frozen=True)
class Prefill:
    """A layer's cache while a prompt is written into it from empty (slot 0 on): ``write`` stores
    the prompt's keys/values in ``slot`` (a ``KVCache`` or ``LayerSlot``), and attention reads back
    only those L tokens, not all S slots.  The empty slots would be masked anyway; reading them
    made the prefill's attention scores [B, H, L, S] instead of [B, H, L, L] (S = prompt + new
    tokens) and kept it off the fused kernels, which take the full forward's masks."""

    slot: KVCache | LayerSlot
    k_BLGK: jax.Array | None = None
    v_BLGK: jax.Array | None = None

    def write(self, k_BLGK: jax.Array, v_BLGK: jax.Array, index: jax.Array) -> Prefill:
        return Prefill(self.slot.write(k_BLGK, v_BLGK, index), k_BLGK, v_BLGK)

    def kv_BSGK(self) -> tuple[jax.Array, jax.Array]:
        """The written tokens' own keys/values, in the cache's dtype (as a read would give them)."""
        dtype = self.slot.stack.k.dtype if isinstance(self.slot, LayerSlot) else self.slot.k.dtype
        return self.k_BLGK.astype(dtype), self.v_BLGK.astype(dtype)


def through_cache(k_BLGK: jax.Array, v_BLGK: jax.Array, cache: KVCache | LayerSlot | Prefill | None,
                  index: jax.Array | None) -> tuple[jax.Array, jax.Array, KVCache | LayerSlot | Prefill | None]:
    """Self-attention keys/values (k_BSGK, v_BSGK, cache): the L new tokens' own without a
    cache (full forward); with one, written at slot ``index`` and read back from all S slots
    (a ``Prefill``: from the L written ones)."""
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
      from the encoder output) and ``enc_segment_ids_BS`` (0 = source padding);
    - beams / samples (``repeat_rows``: ``pool`` = n rows per input): ``layers`` hold one pool
      per input (`PooledRows`), and ``ancestry_RT`` says which of its input's n rows holds each
      own slot of a row's history; ``segment_ids_BS``, ``positions_BS`` and ``index`` stay per
      row over the S = ``prompt_slots`` + T slots of its sequence.
    """

    layers: tuple[KVCache, ...] | KVCache
    segment_ids_BS: jax.Array
    positions_BS: jax.Array
    index: jax.Array
    cross: tuple[KVCache, ...] | KVCache = ()
    enc_segment_ids_BS: jax.Array | None = None
    # int32 [R, T] after ``repeat_rows``: for each row and slot after the prompt, the row of its
    # input (0 .. n-1) whose part of the pool holds that slot of this row's history
    ancestry_RT: jax.Array | None = None
    # decoder-only: the leading slots the prefill wrote (the prompt), the same for an input's rows
    prompt_slots: int = dataclasses.field(default=0, metadata=dict(static=True))
    pool: int = dataclasses.field(default=0, metadata=dict(static=True))  # n rows per input's pool; 0: none

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
        if not self.pool:
            return new, mask_B1LS, pos_BS
        return new._pooled_view(mask_B1LS, L)

    def _pooled_view(self, mask_R1LS: jax.Array, L: int) -> tuple[DecodeCache, jax.Array, jax.Array]:
        """After ``advance`` of a pooled cache: record that each row's L new slots are in its own
        part of the pool, and give the mask and key positions over the pools, [B, 1, n x L, P + n x T]
        and [B, P + n x T] (queries folded as `jaxft.models.attention.attend` folds them)."""
        n, P = self.pool, self.prompt_slots
        R, T = self.ancestry_RT.shape
        B = R // n
        row_R = jnp.arange(R, dtype=jnp.int32) % n
        ancestry_RT = jax.lax.dynamic_update_slice_in_dim(
            self.ancestry_RT, jnp.broadcast_to(row_R[:, None], (R, L)), self.index - L - P, axis=1)
        holds_RNT = ancestry_RT[:, None, :] == jnp.arange(n, dtype=jnp.int32)[None, :, None]
        own_R1LNT = mask_R1LS[:, :, :, None, P:] & holds_RNT[:, None, None]
        pooled_R1LS = jnp.concatenate([mask_R1LS[..., :P], own_R1LNT.reshape(R, 1, L, n * T)], axis=-1)
        mask_B1QS = pooled_R1LS.reshape(B, n, 1, L, -1).transpose(0, 2, 1, 3, 4).reshape(B, 1, n * L, -1)
        pos_BS = jnp.concatenate([self.positions_BS[::n, :P], self.positions_BS[:, P:].reshape(B, n * T)], axis=1)
        # every layer reads the mask: computed once, not in each layer's softmax (`materialized`)
        return dataclasses.replace(self, ancestry_RT=ancestry_RT), materialized(mask_B1QS), pos_BS

    def layer_view(self, layer_cache: KVCache | LayerSlot) -> KVCache | LayerSlot | PooledRows:
        """What a layer's attention writes and reads: its cache, or over a pool a `PooledRows`
        (the decode step hands its ``slot`` back)."""
        if not self.pool:
            return layer_cache
        P, n = self.prompt_slots, self.pool
        return PooledRows(layer_cache, n, P, self.ancestry_RT.shape[1])

    def with_layers(self, layers: list[KVCache] | tuple[KVCache, ...] | KVCache) -> DecodeCache:
        return dataclasses.replace(self, layers=_kv(layers))

    def gather_rows(self, rows_B: jax.Array) -> DecodeCache:
        """Reorder the batch rows of the self-attention state (beam search): rows move only
        within their own input.  ``cross`` and ``enc_segment_ids_BS`` are left alone; over pools
        (``repeat_rows``) so are the layers' k/v: only the rows' ancestry moves, [R, T] int32
        instead of every layer's cache."""
        take = lambda a, axis=0: jnp.take(a, rows_B, axis=axis)  # noqa: E731
        if self.pool:
            return dataclasses.replace(self, ancestry_RT=take(self.ancestry_RT),
                                       segment_ids_BS=take(self.segment_ids_BS), positions_BS=take(self.positions_BS))
        return dataclasses.replace(self, layers=_rows(self.layers, take), segment_ids_BS=take(self.segment_ids_BS),
                                   positions_BS=take(self.positions_BS))

    def repeat_rows(self, n: int) -> DecodeCache:
        """n rows per input (``jnp.repeat`` order): one per beam / sample.  The self-attention k/v
        become one pool per input (`PooledRows`: its prompt once, then n copies of the slots after
        it) that its n rows read together; beam search then reorders rows by their ancestry
        (``gather_rows``) instead of copying every layer's cache per step.  The encoder's k/v
        (``cross``) also stay one per input.  `jaxft.models.attention.attend` folds the n rows'
        queries into one row for both."""
        if n == 1:
            return self
        if self.pool:
            raise ValueError("DecodeCache.repeat_rows: the rows are pooled already")
        rep = lambda a, axis=0: jnp.repeat(a, n, axis=axis)  # noqa: E731
        P = self.prompt_slots
        T = self.segment_ids_BS.shape[1] - P
        R = self.segment_ids_BS.shape[0] * n
        ancestry_RT = jnp.broadcast_to((jnp.arange(R, dtype=jnp.int32) % n)[:, None], (R, T))
        return dataclasses.replace(self, layers=_each(self.layers, lambda c: c.pooled(n, P)),
                                   segment_ids_BS=rep(self.segment_ids_BS), positions_BS=rep(self.positions_BS),
                                   ancestry_RT=constrain(ancestry_RT, ("batch", None)), pool=n)


def _kv(layers: list[KVCache] | tuple[KVCache, ...] | KVCache) -> tuple[KVCache, ...] | KVCache:
    return layers if isinstance(layers, KVCache) else tuple(layers)


def _each(layers: tuple[KVCache, ...] | KVCache, fn) -> tuple[KVCache, ...] | KVCache:
    """``fn(cache)`` for per-layer caches or a stacked one."""
    return fn(layers) if isinstance(layers, KVCache) else tuple(fn(c) for c in layers)


def _rows(layers: tuple[KVCache, ...] | KVCache, fn) -> tuple[KVCache, ...] | KVCache:
    """``fn(array, batch_axis)`` over the k/v of per-layer caches or of a stacked one."""
    return _each(layers, lambda c: c.rows(fn))


def self_attention_caches(n_layers: int, stacked: bool, batch: int, length: int, heads: int, head_dim: int,
                          dtype, group: int = 1) -> tuple[KVCache, ...] | KVCache:
    """Empty self-attention caches of a stack (``heads`` kv heads, each shared by ``group`` query
    heads): one per layer, or one with a leading layer axis for stacked layers."""
    if stacked:
        return KVCache.zeros(batch, length, heads, head_dim, dtype, layers=n_layers, group=group)
    return tuple(KVCache.zeros(batch, length, heads, head_dim, dtype, group=group) for _ in range(n_layers))


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
