"""Start and advance cached decoding for either model family.

The model side of decoding, independent of the search strategy:

- ``start`` builds the ``DecodeCache``.
  Decoder-only: prompts arrive right-padded (as the data pipeline writes
  them) with per-row lengths; they are *left-aligned* here so every row ends
  at the same slot, and the whole prompt is prefilled in one pass (left
  padding is segment 0, positions start at 0 at each row's first real token),
  which also gives the logits of the first generated token (``logits_BV``):
  the search takes its first token from them, and ``step`` is fed generated
  tokens only.  Every row then writes the same cache slot each step (one
  scalar index, ``dynamic_update_slice``), which keeps all shapes static.
  Encoder-decoder: the encoder runs once, each decoder layer projects its
  cross-attention k/v once, and the first token fed to ``step`` is the decoder
  start id (no ``logits_BV``).
- ``step`` feeds one token per row and returns next-token logits.
- ``DecodeStart.history_BH`` is what HF's repetition processors count as the
  sequence so far (``jaxft.eval.sampling.repetition_penalty`` / ``no_repeat_ngram``).

Cache length: decoder-only ``P + max_len`` slots (P = padded prompt length; the last
generated token is never fed, so one slot stays free), encoder-decoder ``max_len``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxft.eval.types import SplitModel
from jaxft.models.attention import DecodeCache
from jaxft.models.scan import merged
from jaxft.sharding import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeStart:
    cache: DecodeCache
    token_B: jax.Array  # int32: the next token to feed to ``step`` (decoder-only: the last prompt token, fed already)
    position_B: jax.Array  # int32: its position
    # int32 [B, H]: the tokens before the first generated one as HF's logits processors see them
    # (decoder-only: the left-aligned prompt; encoder-decoder: the decoder start id); -1 = padding
    history_BH: jax.Array
    # float32 [B, V]: decoder-only, the next-token logits after the prompt (the prefill's last
    # position): the first search step uses them instead of feeding ``token_B`` to ``step``
    logits_BV: jax.Array | None = None

    def repeat_rows(self, n: int) -> DecodeStart:
        """Each row n times in a row: one copy per beam / sample."""
        rep = lambda a: None if a is None else jnp.repeat(a, n, axis=0)  # noqa: E731
        return DecodeStart(self.cache.repeat_rows(n), rep(self.token_B), rep(self.position_B), rep(self.history_BH),
                           rep(self.logits_BV))


def model_is_encoder_decoder(model) -> bool:
    """Whether a built model (or a `SplitModel`) has an encoder (``jaxft.models.registry.is_encoder_decoder``
    asks its config)."""
    if isinstance(model, SplitModel):
        with merged(model.graphdef, *model.states) as module:  # shapes only: nothing computed
            return hasattr(module, "encode")
    return hasattr(model, "encode")


def lengths_or_count(ids_BL: jax.Array, lengths_B: jax.Array | None, pad_id: int) -> jax.Array:
    """Per-row lengths of right-padded rows: given, or the number of non-pad tokens."""
    if lengths_B is None:
        lengths_B = jnp.sum(ids_BL != pad_id, axis=1)
    return jnp.asarray(lengths_B, jnp.int32)


def left_align(ids_BP: jax.Array, lengths_B: jax.Array,
               pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Right-padded prompts -> (left-aligned ids_BP, segment_ids_BP, positions_BP).

    Row b's ``lengths[b]`` tokens end at column P-1; the columns before are padding
    (segment 0, position 0); real tokens have segment 1 and positions 0..len-1.
    """
    B, P = ids_BP.shape
    shift_B1 = (P - lengths_B)[:, None]
    src_BP = jnp.arange(P, dtype=jnp.int32)[None, :] - shift_B1
    real_BP = src_BP >= 0
    ids_BP = jnp.where(real_BP, jnp.take_along_axis(ids_BP, jnp.maximum(src_BP, 0), axis=1), pad_id)
    return ids_BP.astype(jnp.int32), real_BP.astype(jnp.int32), jnp.maximum(src_BP, 0)


def start(model, *, max_len: int, pad_id: int, inputs: jax.Array | None = None,
          lengths: jax.Array | None = None, enc_inputs: jax.Array | None = None,
          enc_lengths: jax.Array | None = None, decoder_start_id: int | None = None) -> DecodeStart:
    """Prefill / encode; room for ``max_len`` generated tokens.  See the module docstring."""
    if enc_inputs is not None:
        if not model_is_encoder_decoder(model):
            raise ValueError("generate: enc_inputs given, but the model is decoder-only (pass inputs)")
        if decoder_start_id is None:
            raise ValueError("generate: encoder-decoder decoding needs decoder_start_id "
                             "(T5: the pad id 0, mBART/NLLB: the eos id 2; model.decoder_start_id)")
        enc_inputs = jnp.asarray(enc_inputs, jnp.int32)
        B, S = enc_inputs.shape
        enc_len_B = lengths_or_count(enc_inputs, enc_lengths, pad_id)
        enc_seg_BS = (jnp.arange(S, dtype=jnp.int32)[None, :] < enc_len_B[:, None]).astype(jnp.int32)
        enc_BSD = model.encode(constrain(enc_inputs, ("batch", "length")), None, enc_seg_BS)
        cache = model.init_cache(enc_BSD, enc_seg_BS, max_len)
        start_B = jnp.full((B,), decoder_start_id, jnp.int32)
        return DecodeStart(cache, start_B, jnp.zeros((B,), jnp.int32), start_B[:, None])
    if inputs is None:
        raise ValueError("generate: pass inputs (decoder-only prompts) or enc_inputs (encoder-decoder)")
    if model_is_encoder_decoder(model):
        raise ValueError("generate: the model is encoder-decoder; pass the source as enc_inputs")
    inputs = jnp.asarray(inputs, jnp.int32)
    B, P = inputs.shape
    len_B = jnp.maximum(lengths_or_count(inputs, lengths, pad_id), 1)
    ids_BP, seg_BP, pos_BP = left_align(inputs, len_B, pad_id)
    cache = model.init_cache(B, P + max_len)
    logits_B1V, cache = model.decode_step(ids_BP, pos_BP, cache, seg_BP, prefill=True)
    cache = dataclasses.replace(cache, prompt_slots=P)  # kept once per input by repeat_rows
    return DecodeStart(cache, ids_BP[:, -1], pos_BP[:, -1], jnp.where(seg_BP == 1, ids_BP, -1), logits_B1V[:, 0])


def step(model, token_B: jax.Array, position_B: jax.Array,
         cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
    """Feed one token per row: (float32 next-token logits_BV, updated cache)."""
    logits_B1V, cache = model.decode_step(token_B[:, None], position_B[:, None], cache)
    return logits_B1V[:, 0], cache
