"""Examples -> token arrays for a decoder-only LM.

    tokens  = [bos] + enc(prompt) + enc(target) + [eos]
    mask    = 0 on bos and the prompt, 1 on the target and eos
    inputs  = tokens[:-1]   targets = tokens[1:]   weights = mask[1:]

so the loss covers exactly the target tokens and eos.  ``bos`` is left out
when the tokenizer defines none.  Prompts per task:

* ``translation``: ``data.prompt_template`` formatted with ``src``,
  ``src_lang``, ``tgt_lang``, ``src_name``, ``tgt_name`` (English names from
  ``jaxft.data.languages``); target ``data.target_template`` with ``tgt``;
* ``prompt``: prompt = the example's ``src``, target = its ``tgt``;
* ``lm``: no prompt; the whole text is target.

The example's length is ``len(inputs)`` = ``len(tokens) - 1``.  Over
``data.seq_len`` (``data.overlong``; the pipeline applies ``skip`` and
``error`` up front, when it is built, from ``Featurizer.lengths``, so in
training nothing is skipped or raised when drawn):

* ``skip``: dropped and counted (``TaskStats.overlong_skipped``);
* ``truncate``: the prompt is cut first (its end: the instruction at its
  start, which names the target language, is kept); if the target alone is
  too long it is cut too, keeping at least one target token, and then has no
  eos (the text did not end there).  Counted in ``TaskStats.truncated``;
* ``error``: ``OverlongError`` naming the source and lengths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxft.data.languages import language_name
from jaxft.data.sources import DataError, Example
from jaxft.data.tokenizer import Tokenizer

FEATURES = ("inputs", "targets", "weights")


class OverlongError(DataError):
    """An example longer than ``data.seq_len`` with ``data.overlong: error``."""


@dataclasses.dataclass
class TaskStats:
    examples: int = 0  # examples turned into arrays
    overlong_skipped: int = 0
    truncated: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


_COUNT_CHUNK = 8192  # texts per tokenizer call while measuring (bounds the memory of batch encoding)


def token_counts(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """``len(tokenizer.encode(t))`` per text (0 for ""), batched when the
    tokenizer has ``encode_batch(texts) -> list[list[int]]``."""
    batch = getattr(tokenizer, "encode_batch", None)
    out = np.zeros(len(texts), np.int64)
    for start in range(0, len(texts), _COUNT_CHUNK):
        chunk = texts[start : start + _COUNT_CHUNK]
        todo = [i for i, t in enumerate(chunk) if t]
        if batch is not None:
            ids = batch([chunk[i] for i in todo])
        else:
            ids = [tokenizer.encode(chunk[i]) for i in todo]
        out[[start + i for i in todo]] = [len(x) for x in ids]
    return out


def render(example: Example, prompt_template: str, target_template: str) -> tuple[str, str]:
    """(prompt, target) strings of one example."""
    if example.task == "lm":
        return "", example.tgt
    if example.task == "prompt":
        return example.src, example.tgt
    if example.task == "translation":
        prompt = prompt_template.format(
            src=example.src, src_lang=example.src_lang, tgt_lang=example.tgt_lang,
            src_name=language_name(example.src_lang), tgt_name=language_name(example.tgt_lang),
        )
        return prompt, target_template.format(tgt=example.tgt)
    raise ValueError(f"unknown task {example.task!r}")


class Featurizer:
    """Callable: Example -> {"inputs","targets","weights"} arrays, or None (skipped).

    One per source, so over-long counts and error messages name the source.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, seq_len: int, prompt_template: str,
        target_template: str, overlong: str, source: str = "?",
    ):
        if overlong not in ("skip", "truncate", "error"):
            raise ValueError(f"data.overlong must be skip, truncate or error, got {overlong!r}")
        if seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {seq_len}")
        if tokenizer.eos_id is None:
            raise ValueError(f"tokenizer {tokenizer.path} defines no eos piece")
        self.tokenizer, self.seq_len, self.overlong, self.source = tokenizer, seq_len, overlong, source
        self.templates = (prompt_template, target_template)
        self.stats = TaskStats()

    @property
    def limits(self) -> tuple[int, ...]:
        """The limits the columns of ``lengths`` are checked against."""
        return (self.seq_len,)

    def lengths(self, examples: Sequence[Example]) -> np.ndarray:
        """``[n, 1]`` int: each example's length as ``tokens`` measures it (before the policy)."""
        rendered = [render(ex, *self.templates) for ex in examples]
        n_bos = 0 if self.tokenizer.bos_id is None else 1
        prompt = token_counts(self.tokenizer, [p for p, _ in rendered])
        target = token_counts(self.tokenizer, [t for _, t in rendered])
        return (n_bos + prompt + target)[:, None]

    def describe(self, lengths: Sequence[int]) -> str:
        """The over-long part of an error message, from one row of ``lengths``."""
        return f"example of {int(lengths[0])} tokens > data.seq_len={self.seq_len}"

    def tokens(self, example: Example) -> tuple[list[int], list[int]] | None:
        """(tokens, loss mask) after the over-long policy; None if skipped."""
        tok = self.tokenizer
        prompt, target = render(example, *self.templates)
        head = ([tok.bos_id] if tok.bos_id is not None else []) + (tok.encode(prompt) if prompt else [])
        body = tok.encode(target)
        eos = [tok.eos_id]
        length = len(head) + len(body) + 1 - 1  # tokens - 1 (``lengths`` must agree)
        if length > self.seq_len:
            if self.overlong == "skip":
                self.stats.overlong_skipped += 1
                return None
            if self.overlong == "error":
                raise OverlongError(f"source {self.source!r}: {self.describe([length])} "
                                    f"(data.overlong: skip or truncate would handle it)")
            self.stats.truncated += 1
            budget = self.seq_len + 1  # tokens that fit
            n_bos = 1 if tok.bos_id is not None else 0
            keep_head = max(n_bos, budget - len(body) - 1)
            head = head[:keep_head]
            if len(head) + len(body) + 1 > budget:
                body, eos = body[: budget - len(head)], []  # >= 1 token: seq_len >= 2
        self.stats.examples += 1
        return head + body + eos, [0] * len(head) + [1] * (len(body) + len(eos))

    def __call__(self, example: Example) -> dict[str, np.ndarray] | None:
        out = self.tokens(example)
        if out is None:
            return None
        tokens, mask = out
        t = np.asarray(tokens, np.int32)
        return {"inputs": t[:-1], "targets": t[1:], "weights": np.asarray(mask[1:], np.float32)}


def pad_row(features: dict[str, Any], seq_len: int) -> dict[str, np.ndarray]:
    """One unpacked example -> a row of ``seq_len`` with segment ids and positions."""
    n = len(features["inputs"])
    row = {}
    for k in FEATURES:
        dtype = np.float32 if k == "weights" else np.int32
        a = np.zeros(seq_len, dtype)
        a[:n] = features[k]
        row[k] = a
    row["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    row["positions"] = np.where(row["segment_ids"] > 0, np.arange(seq_len), 0).astype(np.int32)
    return row
