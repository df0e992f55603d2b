"""Examples -> token arrays for an encoder-decoder model.

For every task the model sees ``enc_inputs`` = source tokens, decoder
``inputs`` = ``[decoder_start_id] + target[:-1]``, ``targets`` = target and
``weights`` = 1 on every target token (the loss is on targets by
construction, the language code of ``lang_code`` included, as in HF).
Source and target by ``data.lang_tokens`` (``S`` = source language, ``T`` =
target language; monolingual tasks use the text's language for both)::

    none       translation / prompt   src = enc(x) + [eos]             tgt = enc(y) + [eos]
    t5_tag     translation            src = [<2T>] + enc(x) + [eos]    tgt = enc(y) + [eos]
    lang_code  translation            src = [code(S)] + enc(x) + [eos] tgt = [code(T)] + enc(y) + [eos]
    any        span_corruption        src = corrupted + [eos]          tgt = sentinels/spans + [eos]
    none       infilling              src = noised + [eos]             tgt = enc(text) + [eos]
    t5_tag     infilling              src = [<2T>] + noised + [eos]    tgt = enc(text) + [eos]
    lang_code  infilling              src = [code] + noised + [eos]    tgt = [code] + enc(text) + [eos]

``prompt`` (xP3 / mT0) and ``span_corruption`` never get language tokens.
``<2T>`` is ``<2{tgt_lang}>`` with the code as configured; ``code(.)`` is
the FLORES-200 code (``lang_code_style: flores``, NLLB) or the mBART-50 code
(``mbart50``) from ``jaxft.data.langcodes``.  Every such token must be one
vocabulary piece (``jaxft.data.vocab.extend_tokenizer`` adds missing ones).

Over-long (source > ``data.encoder_seq_len`` (None -> ``seq_len``) or
target > ``data.seq_len`` tokens), by ``data.overlong``: ``skip`` (counted),
``truncate`` (each side cut to its length, language token and eos kept;
noise tasks cut the text before noising so both sides fit) or ``error``.
The pipeline applies ``skip`` / ``error`` up front from ``lengths``, which
must agree with ``tokens``: exact for translation and prompt, and for
span corruption (its lengths depend only on the text's token count, not on
where the noise falls); for infilling the source is measured un-noised, an
upper bound of the noised source (the noise never lengthens it: each masked
span of >= 1 token becomes one ``<mask>``, and the permuted text's tokens are
cut to the original's count), so an example is over-long exactly when
``truncate`` would cut it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxft.config.schema import DataConfig, SourceConfig
from jaxft.data import noise
from jaxft.data.langcodes import LangCodeError, lang_code_token, t5_tag
from jaxft.data.mixture import derive_seed
from jaxft.data.readers import DataError, Example
from jaxft.data.tasks import OverlongError, TaskStats, token_counts
from jaxft.data.tokenizer import Tokenizer

SEQ2SEQ_TASKS = ("translation", "prompt", "span_corruption", "infilling")
FEATURES = ("enc_inputs", "inputs", "targets", "weights")
ROW_KEYS = ("enc_inputs", "enc_segment_ids", "enc_positions",
            "inputs", "targets", "weights", "segment_ids", "positions")
NOISE_STREAM = 3  # derive_seed(data.seed, NOISE_STREAM, index): the noise of stream example `index`


@functools.lru_cache(maxsize=65536)
def span_corruption_lengths(n: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(source, target) token counts, without eos, of span corruption of ``n`` tokens: the noise
    and span counts depend on ``n`` only, not on the generator."""
    mask = noise.random_spans_noise_mask(n, noise_density, mean_noise_span_length, np.random.default_rng(0))
    n_noise = int(mask.sum())
    spans = int(mask[0]) + int(np.sum(mask[1:] & ~mask[:-1])) if n else 0
    return n - n_noise + spans, n_noise + spans


class Seq2SeqFeaturizer:
    """Callable: ``(Example, index) -> {enc_inputs, inputs, targets, weights}`` or None (skipped).

    One per source.  ``index`` (the example's position in the stream) seeds
    the noise of ``span_corruption`` / ``infilling`` together with ``seed``.
    """

    def __init__(self, tokenizer: Tokenizer, cfg: DataConfig, source: SourceConfig, *,
                 decoder_start_id: int, key: str = "?", seed: int | None = None):
        if cfg.overlong not in ("skip", "truncate", "error"):
            raise ValueError(f"data.overlong must be skip, truncate or error, got {cfg.overlong!r}")
        if source.task not in SEQ2SEQ_TASKS:
            raise DataError(f"{key}.task: {source.task!r} is not an encoder-decoder task "
                            f"({', '.join(SEQ2SEQ_TASKS)}); lm is causal LM for decoder-only models")
        if tokenizer.eos_id is None:
            raise ValueError(f"tokenizer {tokenizer.path} defines no eos piece")
        self.tokenizer, self.cfg, self.task, self.key = tokenizer, cfg, source.task, key
        self.source = f"{source.name} ({key})"
        self.enc_len = cfg.encoder_seq_len or cfg.seq_len
        self.dec_len = cfg.seq_len
        if self.enc_len < 2 or self.dec_len < 2:
            raise ValueError(f"data.seq_len and data.encoder_seq_len must be >= 2 ({key})")
        self.decoder_start_id = int(decoder_start_id)
        self.seed = cfg.seed if seed is None else seed
        self.stats = TaskStats()
        self.src_prefix, self.tgt_prefix = self._prefixes(source)
        if self.task == "span_corruption":
            self.sentinels = noise.sentinel_ids(tokenizer)
        if self.task == "infilling":
            self.mask_id = noise.mask_id(tokenizer)

    # -------------------------------------------------------------- tokens

    def _piece(self, piece: str, what: str) -> int:
        i = self.tokenizer.piece_id(piece)
        if i is None:
            raise DataError(
                f"data.lang_tokens: {self.cfg.lang_tokens}: {what} {piece!r} is not a piece of tokenizer "
                f"{self.tokenizer.path} ({self.key}); add it with jaxft.data.vocab.extend_tokenizer "
                f"and grow the model with jaxft.models.embedding_resize.extend_embeddings")
        return i

    def _prefixes(self, source: SourceConfig) -> tuple[list[int], list[int]]:
        mode = self.cfg.lang_tokens
        if mode == "none" or self.task in ("prompt", "span_corruption"):
            return [], []
        if mode not in ("t5_tag", "lang_code"):
            raise ValueError(f"data.lang_tokens must be none, t5_tag or lang_code, got {mode!r}")
        mono = self.task == "infilling"
        src_lang = (source.src_lang or source.tgt_lang) if mono else source.src_lang
        tgt_lang = (source.tgt_lang or source.src_lang) if mono else source.tgt_lang
        if not (src_lang and tgt_lang):
            raise DataError(f"{self.key}: data.lang_tokens: {mode} needs the source's language "
                            f"(src_lang / tgt_lang)")
        if mode == "t5_tag":
            return [self._piece(t5_tag(tgt_lang), "target-language tag")], []
        try:
            codes = [lang_code_token(c, self.cfg.lang_code_style) for c in (src_lang, tgt_lang)]
        except LangCodeError as e:
            raise DataError(f"{self.key}: data.lang_code_style: {self.cfg.lang_code_style}: {e}") from None
        return [self._piece(codes[0], "language code")], [self._piece(codes[1], "language code")]

    # ------------------------------------------------------------ lengths

    @property
    def limits(self) -> tuple[int, ...]:
        """The limits the columns of ``lengths`` are checked against: (source, target)."""
        return (self.enc_len, self.dec_len)

    def lengths(self, examples: Sequence[Example]) -> np.ndarray:
        """``[n, 2]`` int: (source, target) lengths as ``tokens`` measures them before the
        policy (infilling: the un-noised source, see the module docstring)."""
        tok, eos = self.tokenizer, 1
        if self.task == "span_corruption":
            n = token_counts(tok, [ex.tgt for ex in examples])
            d, m = self.cfg.noise_density, self.cfg.mean_noise_span_length
            pairs = np.asarray([span_corruption_lengths(int(k), d, m) for k in n], np.int64).reshape(-1, 2)
            src, tgt = pairs[:, 0], pairs[:, 1]
        elif self.task == "infilling":
            src = tgt = token_counts(tok, [ex.tgt for ex in examples])
        else:
            src, tgt = token_counts(tok, [ex.src for ex in examples]), token_counts(tok, [ex.tgt for ex in examples])
        return np.stack([len(self.src_prefix) + src + eos, len(self.tgt_prefix) + tgt + eos], axis=1)

    def describe(self, lengths: Sequence[int]) -> str:
        """The over-long part of an error message, from one row of ``lengths``."""
        return (f"example of {int(lengths[0])} source tokens (data.encoder_seq_len={self.enc_len}) and "
                f"{int(lengths[1])} target tokens (data.seq_len={self.dec_len}) is too long")

    def _overlong(self, n_src: int, n_tgt: int) -> bool:
        """Applies the policy; True if the example is skipped."""
        if n_src <= self.enc_len and n_tgt <= self.dec_len:
            return False
        if self.cfg.overlong == "skip":
            self.stats.overlong_skipped += 1
            return True
        if self.cfg.overlong == "error":
            raise OverlongError(f"source {self.source!r}: {self.describe([n_src, n_tgt])} "
                                f"(data.overlong: skip or truncate would handle it)")
        self.stats.truncated += 1
        return False

    def _noised(self, text: str, index: int) -> tuple[list[int], list[int]] | None:
        tok, rng = self.tokenizer, np.random.default_rng(derive_seed(self.seed, NOISE_STREAM, int(index)))
        extra = len(self.src_prefix) + 1
        budget = min(self.enc_len, self.dec_len) - extra
        cut = self.cfg.overlong == "truncate"
        ids = original = tok.encode(text)
        if cut and len(ids) > budget:  # cut the text, then noise it: both sides fit
            self.stats.truncated += 1
            ids = original = ids[:budget]
            text = tok.decode(ids)
        if self.task == "infilling":  # re-tokenizing at sentence joins can add a piece: keep the count
            ids = tok.encode(noise.permute_sentences(text, rng))[: budget if cut else len(original)]
        if self.task == "span_corruption":
            mask = noise.random_spans_noise_mask(len(ids), self.cfg.noise_density,
                                                 self.cfg.mean_noise_span_length, rng)
            return noise.span_corruption(ids, mask, self.sentinels)
        spans = noise.infilling_spans(len(ids), self.cfg.infilling_ratio,
                                      self.cfg.infilling_poisson_lambda, rng)
        return noise.text_infilling(ids, spans, self.mask_id), original

    def tokens(self, example: Example, index: int = 0) -> tuple[list[int], list[int]] | None:
        """(source, target) with language tokens and eos, after the over-long policy."""
        tok, eos = self.tokenizer, [self.tokenizer.eos_id]
        if self.task in ("span_corruption", "infilling"):
            body_src, body_tgt = self._noised(example.tgt, index)
        else:
            body_src, body_tgt = tok.encode(example.src), tok.encode(example.tgt)
        src = self.src_prefix + body_src + eos
        tgt = self.tgt_prefix + body_tgt + eos
        if self._overlong(len(src), len(tgt)):
            return None
        if len(src) > self.enc_len:
            src = src[: self.enc_len - 1] + eos
        if len(tgt) > self.dec_len:
            tgt = tgt[: self.dec_len - 1] + eos
        self.stats.examples += 1
        return src, tgt

    def __call__(self, example: Example, index: int = 0) -> dict[str, np.ndarray] | None:
        out = self.tokens(example, index)
        if out is None:
            return None
        src, tgt = out
        t = np.asarray(tgt, np.int32)
        return {
            "enc_inputs": np.asarray(src, np.int32),
            "inputs": np.concatenate([np.asarray([self.decoder_start_id], np.int32), t[:-1]]),
            "targets": t,
            "weights": np.ones(len(t), np.float32),
        }


# ------------------------------------------------------------------- rows


def length_struct(encoder_seq_len: int, seq_len: int) -> dict[str, int]:
    """Per-feature lengths for grain's packer: both sides packed together."""
    return {"enc_inputs": encoder_seq_len, "inputs": seq_len, "targets": seq_len, "weights": seq_len}


def _side(tokens: Any, length: int, dtype=np.int32) -> np.ndarray:
    a = np.zeros(length, dtype)
    a[: len(tokens)] = tokens
    return a


def pad_seq2seq_row(features: dict[str, Any], encoder_seq_len: int, seq_len: int) -> dict[str, np.ndarray]:
    """One unpacked example -> a row: segment 1 on both sides, padding 0."""
    n_src, n_tgt = len(features["enc_inputs"]), len(features["inputs"])
    row = {"enc_inputs": _side(features["enc_inputs"], encoder_seq_len)}
    row["enc_segment_ids"] = (np.arange(encoder_seq_len) < n_src).astype(np.int32)
    row["enc_positions"] = np.where(row["enc_segment_ids"] > 0, np.arange(encoder_seq_len), 0).astype(np.int32)
    for k in ("inputs", "targets"):
        row[k] = _side(features[k], seq_len)
    row["weights"] = _side(features["weights"], seq_len, np.float32)
    row["segment_ids"] = (np.arange(seq_len) < n_tgt).astype(np.int32)
    row["positions"] = np.where(row["segment_ids"] > 0, np.arange(seq_len), 0).astype(np.int32)
    return row


def packed_seq2seq_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain packer output -> row keys (segment k is example k on both sides)."""
    return {
        "enc_inputs": row["enc_inputs"], "enc_segment_ids": row["enc_inputs_segment_ids"],
        "enc_positions": row["enc_inputs_positions"],
        "inputs": row["inputs"], "targets": row["targets"], "weights": row["weights"],
        "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"],
    }
