"""Beam search over a KV cache in one ``lax.while_loop`` (fairseq / HF / T5X semantics).

Per input: ``k`` alive hypotheses (the model runs on B*k rows, cache included)
and a pool of the ``k`` best finished ones.  Each step:

1. every alive beam's log-probs (after the repetition penalty, no-repeat n-gram,
   min-length and forced processors, each on the beam's own history) are
   added to its running log-prob, giving k*V candidates; the best 2k are taken
   (at most k of them can end in EOS, so at least k can go on);
2. a candidate *ends* when its token is EOS or it reaches ``max_len`` tokens; an
   ending candidate ranked within the first k joins the finished pool with score
   ``logp / lp(length)`` (``length`` counts forced tokens and the EOS), and the
   pool keeps its k best;
3. the k best candidates that do not end become the new alive beams; the cache
   rows are gathered to follow their parents.

Early stopping, per input (``DecodeConfig.early_stopping``):

- ``"bound"`` (default): stop once the pool is full and no alive beam can still
  beat its worst member.  Log-probs only fall as tokens are added, so an alive
  beam's best reachable score is ``logp / max(lp(next length), lp(max_len))``;
  the n-best list is then the one running to ``max_len`` would give.
  (HF: ``early_stopping="never"``; exact for any alpha >= 0.)
- ``"full"``: stop as soon as k hypotheses have finished (HF ``early_stopping=True``).

A stopped input takes no more finished hypotheses; the loop ends when every
input has stopped or ``max_len`` tokens were generated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.config.schema import DecodeConfig
from jaxft.eval.cache import DecodeStart, step
from jaxft.eval.sampling import (NEG_INF, is_stop, length_penalty, no_repeat_ngram, process_log_probs,
                                 repetition_penalty)
from jaxft.eval.types import DecodeOutput
from jaxft.models.topk import top_k
from jaxft.sharding import constrain


def _gather_beams(x_BK, idx_BN):
    """x_BK... gathered along the beam axis (1) by idx_BN."""
    idx = idx_BN.reshape(idx_BN.shape + (1,) * (x_BK.ndim - 2))
    return jnp.take_along_axis(x_BK, idx, axis=1)


def beam_search(model, start: DecodeStart, forced_BF: jax.Array, cfg: DecodeConfig) -> DecodeOutput:
    k, L = cfg.beam_size, cfg.max_len
    B = start.token_B.shape[0]
    R = B * k
    lp = lambda n: length_penalty(n, cfg.length_penalty, cfg.length_penalty_mode)  # noqa: E731
    forced_RF = jnp.repeat(forced_BF, k, axis=0)
    history_RP = jnp.repeat(start.history_BH, k, axis=0)
    beam_K = jnp.arange(k)
    state = dict(
        t=jnp.zeros((), jnp.int32),
        cache=start.cache.repeat_rows(k),
        token_R=jnp.repeat(start.token_B, k, axis=0),
        position_R=jnp.repeat(start.position_B, k, axis=0),
        # only beam 0 is live at first: its k copies would otherwise fill the beam with duplicates
        alive_logp_BK=jnp.where(beam_K[None, :] == 0, 0.0, NEG_INF) * jnp.ones((B, 1), jnp.float32),
        alive_seq_BKL=jnp.full((B, k, L), cfg.pad_id, jnp.int32),
        fin_score_BK=jnp.full((B, k), NEG_INF, jnp.float32),
        fin_seq_BKL=jnp.full((B, k, L), cfg.pad_id, jnp.int32),
        fin_len_BK=jnp.zeros((B, k), jnp.int32),
        done_B=jnp.zeros((B,), bool),
    )

    def cond(s):
        return (s["t"] < L) & ~jnp.all(s["done_B"])

    def choose(s, logits_RV, cache):
        """The k best continuations of each input from every beam's next-token logits."""
        t = s["t"]
        # HF: the processors see each beam's own history and act on log-probs
        hist_RH = jnp.concatenate([history_RP, s["alive_seq_BKL"].reshape(R, L)], axis=1)
        cur = history_RP.shape[1] + t
        logp_RV = repetition_penalty(jax.nn.log_softmax(logits_RV, axis=-1), hist_RH, cur, cfg.repetition_penalty)
        logp_RV = process_log_probs(no_repeat_ngram(logp_RV, hist_RH, cur, cfg.no_repeat_ngram_size), t,
                                    forced_BF=forced_RF, min_len=cfg.min_len, stops=cfg.stops)
        V = logp_RV.shape[-1]
        cand_BN = (s["alive_logp_BK"][:, :, None] + logp_RV.reshape(B, k, V)).reshape(B, k * V)
        top_logp_BC, top_idx_BC = top_k(cand_BN, 2 * k)  # C = 2k candidates, best first
        parent_BC, token_BC = top_idx_BC // V, (top_idx_BC % V).astype(jnp.int32)
        seq_BCL = _gather_beams(s["alive_seq_BKL"], parent_BC)
        seq_BCL = jax.lax.dynamic_update_index_in_dim(seq_BCL, token_BC, t, axis=2)
        ends_BC = (t == L - 1) | is_stop(token_BC, cfg.stops)

        # finished pool: ending candidates ranked within the first k, for inputs still running
        joins_BC = ends_BC & (jnp.arange(2 * k) < k)[None, :] & ~s["done_B"][:, None]
        new_score_BC = jnp.where(joins_BC, top_logp_BC / lp(t + 1), NEG_INF)
        pool_score = jnp.concatenate([s["fin_score_BK"], new_score_BC], axis=1)
        pool_seq = jnp.concatenate([s["fin_seq_BKL"], seq_BCL], axis=1)
        pool_len = jnp.concatenate([s["fin_len_BK"], jnp.full((B, 2 * k), t + 1, jnp.int32)], axis=1)
        fin_score_BK, keep_BK = jax.lax.top_k(pool_score, k)
        fin_seq_BKL, fin_len_BK = _gather_beams(pool_seq, keep_BK), _gather_beams(pool_len, keep_BK)

        # alive beams: the k best candidates that go on
        alive_logp_BK, pick_BK = jax.lax.top_k(jnp.where(ends_BC, NEG_INF, top_logp_BC), k)
        alive_seq_BKL = _gather_beams(seq_BCL, pick_BK)
        rows_R = (jnp.arange(B)[:, None] * k + _gather_beams(parent_BC, pick_BK)).reshape(R)
        cache = cache.gather_rows(rows_R)

        full_B = jnp.all(fin_score_BK > NEG_INF, axis=1)
        if cfg.early_stopping == "full":
            stop_B = full_B
        else:
            best_reachable_B = alive_logp_BK[:, 0] / jnp.maximum(lp(t + 2), lp(L))
            stop_B = full_B & (best_reachable_B <= fin_score_BK[:, -1])
        stop_B = stop_B | (alive_logp_BK[:, 0] == NEG_INF)
        return dict(
            t=t + 1, cache=cache,
            token_R=constrain(_gather_beams(token_BC, pick_BK).reshape(R), ("batch",)),
            position_R=s["position_R"] + 1,
            alive_logp_BK=alive_logp_BK, alive_seq_BKL=alive_seq_BKL,
            fin_score_BK=fin_score_BK, fin_seq_BKL=fin_seq_BKL, fin_len_BK=fin_len_BK,
            done_B=s["done_B"] | stop_B,
        )

    def body(s):
        return choose(s, *step(model, s["token_R"], s["position_R"], s["cache"]))

    if start.logits_BV is not None:  # decoder-only: the first step from the prefill's logits
        state = choose(state, jnp.repeat(start.logits_BV, k, axis=0), state["cache"])
    s = jax.lax.while_loop(cond, body, state)
    n = cfg.n_best
    return DecodeOutput(tokens=s["fin_seq_BKL"][:, :n], scores=s["fin_score_BK"][:, :n],
                        lengths=s["fin_len_BK"][:, :n])
