"""Types shared by the decoding modules (``decode`` -> ``beam`` -> here), so imports go one way."""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeOutput:
    tokens: jax.Array  # [B, n, max_len] int32
    scores: jax.Array  # [B, n] float32, best first for beam search
    lengths: jax.Array  # [B, n] int32: generated tokens incl. forced ids and EOS
