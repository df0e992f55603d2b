"""Boolean attention masks from segment ids and token indices / positions.

Segment ids: 1..n for packed examples within a row, 0 for padding.  Every mask
is mask_B1LS (B batch, L queries, S keys); no row is ever fully masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.models.kernels import SegmentMask


def fold_rows(q_BL: jax.Array, rows: int) -> jax.Array:
    """Per-query values of n x ``rows`` query rows (an input's beams / samples, in order) against
    ``rows`` key rows: each input's rows folded into its query length, [rows, n x L], as
    `jaxft.models.attention.attend` folds their queries.  Unchanged when the rows match."""
    return q_BL if q_BL.shape[0] == rows else q_BL.reshape(rows, -1)


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


def causal_segment_mask(segment_ids_BL: jax.Array) -> jax.Array:
    """Training-time mask over a full (packed) sequence: mask_B1LL."""
    idx_BL = jnp.broadcast_to(jnp.arange(segment_ids_BL.shape[1]), segment_ids_BL.shape)
    return attention_mask(segment_ids_BL, segment_ids_BL, idx_BL, idx_BL)


def causal_segments(segment_ids_BL: jax.Array) -> SegmentMask:
    """``causal_segment_mask`` with its segment ids, for a fused attention kernel."""
    return SegmentMask(causal_segment_mask(segment_ids_BL), segment_ids_BL, segment_ids_BL, causal=True)


def bidirectional_segments(segment_ids_BS: jax.Array) -> SegmentMask:
    """``bidirectional_segment_mask`` with its segment ids, for a fused attention kernel."""
    return SegmentMask(bidirectional_segment_mask(segment_ids_BS), segment_ids_BS, segment_ids_BS, causal=False)


def bidirectional_segment_mask(segment_ids_BS: jax.Array) -> jax.Array:
    """Encoder self-attention mask_B1SS: token i sees token j iff both share a segment id.

    Padding (segment 0) sees only padding, never a real token, and no row is
    fully masked (the diagonal is always allowed), so no NaNs and no leakage.
    """
    return (segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :])[:, None, :, :]


def cross_attention_mask(dec_segment_ids_BL: jax.Array, enc_segment_ids_BS: jax.Array) -> jax.Array:
    """mask_B1LS for encoder-decoder cross-attention over packed rows.

    A real decoder token (segment k > 0) sees exactly the encoder tokens of
    segment k.  A decoder padding token (segment 0) sees every encoder token:
    its output has zero loss weight and no real token attends to it, so this
    only keeps its softmax row from being fully masked.

    n decoder rows per encoder row (beams / samples of one input sharing its encoder k/v, in
    order): each input's rows are folded into its query length, [B, 1, n x L, S] (as
    `jaxft.models.attention.attend` folds their queries).
    """
    dec_segment_ids_BL = fold_rows(dec_segment_ids_BL, enc_segment_ids_BS.shape[0])
    same_BLS = (dec_segment_ids_BL[:, :, None] == enc_segment_ids_BS[:, None, :]) & (
        enc_segment_ids_BS[:, None, :] > 0)
    pad_BL1 = (dec_segment_ids_BL == 0)[:, :, None]
    return (same_BLS | pad_BL1)[:, None, :, :]


def sliding_window_mask(mask_B1LS: jax.Array, q_positions_BL: jax.Array, kv_positions_BS: jax.Array,
                        window: int) -> jax.Array:
    """Restrict ``mask_B1LS`` to keys less than ``window`` positions back (Gemma 2 local layers).

    Works on positions, so it composes with the causal + segment mask of packed
    rows (positions restart per segment); the diagonal stays allowed.  n query rows per key
    row: folded (`fold_rows`), as ``mask_B1LS`` is then.
    """
    q_positions_BL = fold_rows(q_positions_BL, kv_positions_BS.shape[0])
    near_BLS = (q_positions_BL[:, :, None] - kv_positions_BS[:, None, :]) < window
    return mask_B1LS & near_BLS[:, None, :, :]


def is_local_layer(layer: int, window: int | None, pattern: int) -> bool:
    """Sliding-window layers: every layer but each ``pattern``-th (HF Gemma 2: the even ones)."""
    return window is not None and (layer + 1) % pattern != 0
