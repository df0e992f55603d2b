"""Decoding: greedy, beam search and sampling over a KV cache, one compiled loop each.

Public API::

    cfg = DecodeConfig(strategy="beam", beam_size=4, length_penalty=0.6, max_len=128,
                       eos_id=1, pad_id=0, decoder_start_id=0)
    out = generate(model, enc_inputs=src_BS, config=cfg)          # encoder-decoder
    out = generate(model, inputs=prompt_BP, config=cfg, rng=key)  # decoder-only
    out.tokens [B, n, max_len], out.scores [B, n], out.lengths [B, n]

``DecodeConfig`` is ``jaxft.config.schema.DecodeConfig`` (the ``eval.decode`` config
section, re-exported here); ``DecodeOutput`` lives in ``jaxft.eval.types``.

Inputs are right-padded with ``pad_id`` (lengths counted from it, or passed as
``lengths`` / ``enc_lengths``).  ``tokens`` holds only generated tokens: forced
ids first, then the output, the EOS (when one was produced, counted in
``lengths``), then ``pad_id``.  ``scores`` are summed model log-probs (forced
tokens add 0) divided by the length penalty ``lp(lengths)``, for every strategy.

- greedy: argmax each step; n = 1.
- beam: see ``jaxft.eval.beam``; n = ``n_best`` hypotheses, best first.
- sample: temperature, top-k, top-p (``jaxft.eval.sampling``), seeded by ``rng``;
  n = ``n_best`` independent samples per input.

``repetition_penalty`` and ``no_repeat_ngram_size`` are HF's anti-repetition
processors (``jaxft.eval.sampling``): the sequence so far is the prompt plus the
generated tokens (decoder-only) or the decoder start id plus the generated tokens
(encoder-decoder), per row / per beam; greedy and sample penalise logits, beam
log-probs, as HF does, so scores are sums of the processed log-probs.

``max_len`` counts generated tokens (HF ``max_new_tokens``); EOS is masked until
``min_len`` tokens have been generated (HF ``min_new_tokens``).  ``forced_ids``
(e.g. the target-language code of mBART / NLLB) are the first output tokens of
every row; ``generate(..., forced=forced_BF)`` sets them per row (-1 = free).

``length_sorted_batches`` / ``restore_order`` / ``decode_all`` batch a corpus by
length (fewer pad tokens, one compile per length bucket) and put the outputs back
in corpus order.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.config.schema import DecodeConfig
from jaxft.eval import cache as cache_lib
from jaxft.eval.beam import beam_search
from jaxft.eval.sampling import (first_argmax, is_stop, length_penalty, no_repeat_ngram, process_log_probs,
                                 repetition_penalty, sample)
from jaxft.eval.types import DecodeOutput, SplitModel, split_model
from jaxft.models.precast import compute_dtype_states
from jaxft.models.scan import merged
from jaxft.sharding import constrain

__all__ = ["DecodeConfig", "DecodeOutput", "LengthBatch", "decode_all", "generate", "length_sorted_batches",
           "restore_order", "strip"]


def _greedy_or_sample(model, start: cache_lib.DecodeStart, forced_BF: jax.Array, rng: jax.Array,
                      cfg: DecodeConfig) -> DecodeOutput:
    """One token per row per step until every row has produced EOS or ``max_len`` tokens."""
    n = cfg.n_best if cfg.strategy == "sample" else 1
    B, L = start.token_B.shape[0], cfg.max_len
    R = B * n
    if n > 1:
        start = start.repeat_rows(n)
        forced_BF = jnp.repeat(forced_BF, n, axis=0)
    greedy = cfg.strategy == "greedy" or cfg.temperature == 0.0
    state = dict(t=jnp.zeros((), jnp.int32), cache=start.cache, token_R=start.token_B,
                 position_R=start.position_B, seq_RL=jnp.full((R, L), cfg.pad_id, jnp.int32),
                 logp_R=jnp.zeros((R,), jnp.float32), len_R=jnp.zeros((R,), jnp.int32),
                 done_R=jnp.zeros((R,), bool))

    def cond(s):
        return (s["t"] < L) & ~jnp.all(s["done_R"])

    def choose(s, logits_RV, cache):
        """One token per row from its next-token logits; the state after it."""
        t, done_R = s["t"], s["done_R"]
        hist_RH, cur = jnp.concatenate([start.history_BH, s["seq_RL"]], axis=1), start.history_BH.shape[1] + t
        logits_RV = repetition_penalty(logits_RV, hist_RH, cur, cfg.repetition_penalty)  # HF: on raw logits
        logp_RV = no_repeat_ngram(jax.nn.log_softmax(logits_RV, axis=-1), hist_RH, cur, cfg.no_repeat_ngram_size)
        logp_RV = process_log_probs(logp_RV, t, forced_BF=forced_BF, min_len=cfg.min_len, stops=cfg.stops)
        if greedy:
            token_R = first_argmax(logp_RV)
        else:
            token_R = sample(jax.random.fold_in(rng, t), logp_RV, temperature=cfg.temperature,
                             top_k=cfg.top_k, top_p=cfg.top_p)
        token_R = constrain(jnp.where(done_R, cfg.pad_id, token_R), ("batch",))
        token_logp_R = jnp.take_along_axis(logp_RV, token_R[:, None], axis=-1)[:, 0]
        new_done_R = done_R | is_stop(token_R, cfg.stops)
        return dict(t=t + 1, cache=cache, token_R=token_R, position_R=s["position_R"] + 1,
                    seq_RL=jax.lax.dynamic_update_index_in_dim(s["seq_RL"], token_R, t, axis=1),
                    logp_R=s["logp_R"] + jnp.where(done_R, 0.0, token_logp_R),
                    len_R=s["len_R"] + (~done_R).astype(jnp.int32), done_R=new_done_R)

    def body(s):
        return choose(s, *cache_lib.step(model, s["token_R"], s["position_R"], s["cache"]))

    if start.logits_BV is not None:  # decoder-only: the first token from the prefill's logits
        state = choose(state, start.logits_BV, state["cache"])
    s = jax.lax.while_loop(cond, body, state)
    scores_R = s["logp_R"] / length_penalty(s["len_R"], cfg.length_penalty, cfg.length_penalty_mode)
    return DecodeOutput(tokens=s["seq_RL"].reshape(B, n, L), scores=scores_R.reshape(B, n),
                        lengths=s["len_R"].reshape(B, n))


def _generate(model, inputs, lengths, enc_inputs, enc_lengths, forced_BF, rng, *, config: DecodeConfig):
    start = cache_lib.start(model, max_len=config.max_len, pad_id=config.pad_id, inputs=inputs,
                            lengths=lengths, enc_inputs=enc_inputs, enc_lengths=enc_lengths,
                            decoder_start_id=config.decoder_start_id)
    if config.strategy == "beam":
        return beam_search(model, start, forced_BF, config)
    return _greedy_or_sample(model, start, forced_BF, rng, config)


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def _generate_jit(graphdef, states, inputs, lengths, enc_inputs, enc_lengths, forced_BF, rng, *, config: DecodeConfig):
    # jax.jit over the split model: nnx.jit re-traverses the module graph on every call (about
    # 3-4 ms of host time per batch for a small model; nnx.split + jax.jit is about 1 ms)
    # the weights cast to the compute dtype once, not inside the loop at every token
    states = compute_dtype_states(graphdef, states)
    with merged(graphdef, *states) as model:  # stacked layers decode by a scan over the stored arrays
        return _generate(model, inputs, lengths, enc_inputs, enc_lengths, forced_BF, rng, config=config)


def generate(model: nnx.Module | SplitModel, *, config: DecodeConfig, inputs: Any = None, lengths: Any = None,
             enc_inputs: Any = None, enc_lengths: Any = None, forced: Any = None,
             rng: jax.Array | None = None) -> DecodeOutput:
    """Decode a batch with ``config`` (see the module docstring); compiled once per config and shape.

    ``inputs`` [B, P]: decoder-only prompts; ``enc_inputs`` [B, S]: encoder-decoder
    sources; both right-padded with ``config.pad_id`` (or give ``lengths`` /
    ``enc_lengths``).  ``forced`` [B, F]: per-row forced first tokens (-1 = free),
    overriding ``config.forced_ids``.  ``rng``: sampling key (default key 0).
    Runs under the active mesh (``jaxft.sharding.use_mesh``), if any: rows are
    sharded over the data axes, heads (and the cache's kv heads) over ``tensor``.
    """
    src = enc_inputs if enc_inputs is not None else inputs
    if src is None:
        raise ValueError("generate: pass inputs (decoder-only) or enc_inputs (encoder-decoder)")
    B = np.shape(src)[0]
    if forced is None:
        forced = np.broadcast_to(np.asarray(config.forced_ids, np.int32).reshape(1, -1),
                                 (B, len(config.forced_ids)))
    forced = jnp.asarray(forced, jnp.int32)
    if forced.ndim != 2 or forced.shape[0] != B or forced.shape[1] > config.max_len:
        raise ValueError(f"generate: forced must be [batch={B}, F <= max_len], got {forced.shape}")
    rng = jax.random.key(0) if rng is None else rng
    as_int = lambda a: None if a is None else jnp.asarray(a, jnp.int32)  # noqa: E731
    graphdef, states = split_model(model)
    return _generate_jit(graphdef, states, as_int(inputs), as_int(lengths), as_int(enc_inputs), as_int(enc_lengths),
                         forced, rng, config=config)


# --------------------------------------------------------------------------- corpus decoding


@dataclasses.dataclass(frozen=True)
class LengthBatch:
    indices: np.ndarray  # [b] corpus positions of this batch's real rows (b <= batch_size)
    ids: np.ndarray  # [batch_size, L] int32, right-padded; rows b.. are one-pad-token fillers
    lengths: np.ndarray  # [batch_size] int32


# Batches wider than LONG_WIDTH are padded to a multiple of LONG_MULTIPLE columns: at most a quarter
# more columns, fewer shapes to compile, and the block of the TPU's fused attention kernel, so a long
# prompt's prefill (or a long source's encoder) can take it.
LONG_WIDTH, LONG_MULTIPLE = 512, 128


def length_sorted_batches(seqs: Sequence[Sequence[int]], batch_size: int, *, pad_id: int = 0,
                          length_multiple: int = 8) -> list[LengthBatch]:
    """Sort by length (longest first) into batches of ``batch_size`` rows, each padded to a
    multiple of ``length_multiple`` columns (of ``LONG_MULTIPLE`` above ``LONG_WIDTH``): little
    padding, few distinct shapes to compile."""
    if batch_size < 1 or length_multiple < 1:
        raise ValueError(f"length_sorted_batches: batch_size ({batch_size}) and length_multiple "
                         f"({length_multiple}) must be >= 1")
    lens = np.array([len(s) for s in seqs], np.int64)
    order = np.argsort(-lens, kind="stable")
    batches = []
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        width = max(1, int(-(-max(lens[idx].max(), 1) // length_multiple) * length_multiple))
        if width > LONG_WIDTH:
            width = -(-width // LONG_MULTIPLE) * LONG_MULTIPLE
        ids = np.full((batch_size, width), pad_id, np.int32)
        lengths = np.ones((batch_size,), np.int32)
        for row, i in enumerate(idx):
            ids[row, :lens[i]] = seqs[i]
            lengths[row] = max(lens[i], 1)
        batches.append(LengthBatch(idx, ids, lengths))
    return batches


def restore_order(batches: Sequence[LengthBatch], results: Sequence[Sequence[Any]]) -> list[Any]:
    """``results[i][row]`` belongs to ``batches[i].indices[row]``: back to corpus order (fillers dropped)."""
    n = sum(len(b.indices) for b in batches)
    out: list[Any] = [None] * n
    for batch, res in zip(batches, results):
        for row, i in enumerate(batch.indices):
            out[int(i)] = res[row]
    return out


def strip(tokens: Sequence[int], length: int, stops: int | None | tuple[int, ...]) -> list[int]:
    """The first ``length`` tokens without a final stop token (EOS, or any of ``stops``)."""
    stops = (stops,) if isinstance(stops, int) else stops or ()
    toks = [int(t) for t in tokens[:int(length)]]
    return toks[:-1] if toks and toks[-1] in stops else toks


def decode_all(model: nnx.Module | SplitModel, seqs: Sequence[Sequence[int]], *, config: DecodeConfig,
               batch_size: int, encoder_decoder: bool | None = None,
               forced: Sequence[Sequence[int]] | None = None, rng: jax.Array | None = None,
               length_multiple: int = 8,
               on_batch: Callable[[int], object] | None = None) -> list[list[tuple[list[int], float]]]:
    """Decode a corpus in length-sorted batches; per input, its n (tokens without EOS, score)
    in corpus order.  ``forced``: per-input forced first tokens (e.g. per-direction language
    codes), all of the same length.  ``on_batch(n)`` after each batch of n inputs (a progress bar)."""
    if encoder_decoder is None:
        encoder_decoder = cache_lib.model_is_encoder_decoder(model)
    rng = jax.random.key(0) if rng is None else rng
    model = SplitModel(*split_model(model))  # once: splitting a module walks its graph (ms per batch)
    results = []
    batches = length_sorted_batches(seqs, batch_size, pad_id=config.pad_id, length_multiple=length_multiple)
    for i, batch in enumerate(batches):
        forced_BF = None
        if forced is not None:
            F = len(forced[0]) if len(forced) else 0
            forced_BF = np.full((batch_size, F), -1, np.int32)
            for row, j in enumerate(batch.indices):
                forced_BF[row] = forced[j]
        key = "enc_inputs" if encoder_decoder else "inputs"
        out = generate(model, config=config, forced=forced_BF, rng=jax.random.fold_in(rng, i),
                       **{key: batch.ids, key.replace("inputs", "lengths"): batch.lengths})
        tokens, scores, lengths = (np.asarray(x) for x in (out.tokens, out.scores, out.lengths))
        results.append([[(strip(tokens[r, j], lengths[r, j], config.stops), float(scores[r, j]))
                         for j in range(tokens.shape[1])] for r in range(len(batch.indices))])
        if on_batch is not None:
            on_batch(len(batch.indices))
    return restore_order(batches, results)
