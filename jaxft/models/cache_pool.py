"""One pool of self-attention keys/values per input for its n decoding rows (beams / samples):
`jaxft.models.cache.DecodeCache.repeat_rows` builds the pools, each layer's attention writes and
reads one through a ``PooledRows``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class PooledRows:
    """A layer's self-attention cache while the n rows of each input (its beams or samples) share
    one pool (`DecodeCache.repeat_rows`): ``slot`` (a ``KVCache`` or a stacked cache's
    ``LayerSlot``) has one row per input and ``prompt`` + n x ``own`` slots: the input's prompt
    (decoder-only), then each of its n rows' own slots, row j's at ``prompt + j * own``.  Row j
    writes there; every row reads the whole pool, the mask saying which slots are its own history
    (`DecodeCache.advance`), so beam search never copies the cache."""

    slot: Any  # a `jaxft.models.cache.KVCache` or `LayerSlot` (not imported: cache.py imports this)
    n: int
    prompt: int
    own: int

    def write(self, k_BLGK: jax.Array, v_BLGK: jax.Array, index: jax.Array) -> PooledRows:
        """Store the L new keys/values of each of the n x B rows at slots ``index ..`` of the
        sequence: row j of an input in its own part of the input's pool."""
        B = k_BLGK.shape[0] // self.n
        k_BNLGK = k_BLGK.reshape((B, self.n) + k_BLGK.shape[1:])
        v_BNLGK = v_BLGK.reshape((B, self.n) + v_BLGK.shape[1:])
        slot = self.slot
        for j in range(self.n):
            slot = slot.write(k_BNLGK[:, j], v_BNLGK[:, j], index + j * self.own)
        return dataclasses.replace(self, slot=slot)

    def kv_BSGK(self) -> tuple[jax.Array, jax.Array]:
        """The pools, [B, prompt + n x own, G, K]."""
        return self.slot.kv_BSGK()
