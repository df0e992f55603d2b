"""Denoising objectives on monolingual text for encoder-decoder models.

Every function takes a ``numpy.random.Generator``; the pipeline seeds it from
``(data.seed, stream index)`` so the noise of an example is a pure function of
its position in the stream and resuming reproduces it exactly.

**Span corruption** (T5, ``SourceConfig.task: span_corruption``).
``random_spans_noise_mask`` follows T5's semantics: ``round(density * n)``
noise tokens (at least 1, at most n-1), ``round(noise / mean_span)`` spans (at
least 1); noise and non-noise tokens are each split into that many non-empty
runs uniformly at random, and the runs alternate non-noise, noise, non-noise
..., so the text starts with non-noise and ends with noise.  Then::

    source = nn_0 s_0 nn_1 s_1 ... nn_k s_k          (+ eos)
    target = s_0 noise_0 s_1 noise_1 ... s_k noise_k  (+ eos)

with ``s_j`` the j-th sentinel.  Sentinels (``sentinel_ids``): the pieces
``<extra_id_0>``, ``<extra_id_1>``... when the tokenizer has them; otherwise
T5's layout of 100 extra ids appended after the SentencePiece pieces in
reverse order, ``s_j = tokenizer.vocab_size + 100 - 1 - j`` (mT5: 250099 for
``<extra_id_0>``; the model's ``vocab_size`` must cover them).

**Text infilling + sentence permutation** (mBART, ``task: infilling``).
``permute_sentences`` splits on sentence-final punctuation (``. ! ?`` before
a space or the end, ``。！？`` anywhere, ``। ॥ ؟ ۔``) and shuffles the
sentences.  ``infilling_spans`` then masks ``round(ratio * n)`` tokens of the
permuted text in spans whose lengths are drawn from Poisson(lambda); draws of
0 are discarded (no insertion noise, unlike fairseq's), so span lengths
follow the zero-truncated Poisson, mean ``lambda / (1 - exp(-lambda))``,
except that the last span is cut to hit the masked count exactly.  Spans are
placed uniformly at random, separated by at least one kept token when the
text is long enough, and each span becomes one ``<mask>`` token.  Masking is
on SentencePiece tokens, not whole words as in fairseq.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from jaxft.data.readers import DataError
from jaxft.data.tokenizer import Tokenizer

T5_EXTRA_IDS = 100
MASK_PIECE = "<mask>"


# ------------------------------------------------------------ span corruption


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """``num_items`` split into ``num_segments`` non-empty runs, uniformly over compositions."""
    cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """Boolean noise mask of ``length`` tokens (True = noise), T5 semantics."""
    if length < 2:
        return np.zeros(length, bool)
    num_noise = min(max(int(round(noise_density * length)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    num_spans = min(num_spans, num_noise, length - num_noise)
    noise = _random_segmentation(num_noise, num_spans, rng)
    nonnoise = _random_segmentation(length - num_noise, num_spans, rng)
    runs = np.stack([nonnoise, noise], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], num_spans), runs)


def sentinel_ids(tokenizer: Tokenizer, count: int = T5_EXTRA_IDS) -> list[int]:
    """Ids of sentinels 0..count-1: ``<extra_id_j>`` pieces, else T5's layout (module doc)."""
    if tokenizer.piece_id("<extra_id_0>") is None:
        return [tokenizer.vocab_size + T5_EXTRA_IDS - 1 - j for j in range(min(count, T5_EXTRA_IDS))]
    ids = []
    for j in range(count):
        i = tokenizer.piece_id(f"<extra_id_{j}>")
        if i is None:
            break
        ids.append(i)
    return ids


def span_corruption(tokens: Sequence[int], noise_mask: np.ndarray,
                    sentinels: Sequence[int]) -> tuple[list[int], list[int]]:
    """(source, target) without eos: each noise run -> one sentinel in the source;
    the target lists each sentinel followed by the tokens it replaced."""
    tokens = list(tokens)
    source: list[int] = []
    target: list[int] = []
    span = -1
    for i, (t, noisy) in enumerate(zip(tokens, noise_mask)):
        if noisy and (i == 0 or not noise_mask[i - 1]):
            span += 1
            if span >= len(sentinels):
                raise DataError(f"span corruption needs more than {len(sentinels)} sentinel tokens "
                                f"(<extra_id_N>); shorten data.seq_len or add sentinel pieces")
            source.append(sentinels[span])
            target.append(sentinels[span])
        (target if noisy else source).append(t)
    return source, target


def merge_span_corruption(source: Sequence[int], target: Sequence[int],
                          sentinels: Sequence[int]) -> list[int]:
    """Inverse of ``span_corruption``: the original tokens (eos already removed)."""
    index = {s: j for j, s in enumerate(sentinels)}
    spans: dict[int, list[int]] = {}
    current = None
    for t in target:
        if t in index:
            current = spans.setdefault(index[t], [])
        elif current is not None:
            current.append(t)
    out: list[int] = []
    for t in source:
        out.extend(spans.get(index[t], []) if t in index else [t])
    return out


# ------------------------------------------------------------------ infilling

_BOUNDARY = re.compile(r"(?:[.!?]+(?=\s|$)|[。！？]+|[।॥؟۔]+)\s*")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (stripped, non-empty), split after sentence-final punctuation."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        out.append(text[start : m.end()].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def permute_sentences(text: str, rng: np.random.Generator) -> str:
    """Sentences shuffled, joined by a space (none if the text had none between sentences)."""
    sentences = split_sentences(text)
    if len(sentences) < 2:
        return text
    sep = " " if any(re.search(r"\s$", m.group()) for m in _BOUNDARY.finditer(text)) else ""
    return sep.join(sentences[i] for i in rng.permutation(len(sentences)))


def infilling_spans(length: int, ratio: float, poisson_lambda: float,
                    rng: np.random.Generator) -> list[tuple[int, int]]:
    """Masked spans ``(start, length)``, in order, ``round(ratio * length)`` tokens in all."""
    to_mask = min(int(round(ratio * length)), length - 1) if length > 1 else 0
    lengths: list[int] = []
    total = 0
    while total < to_mask:
        for x in rng.poisson(poisson_lambda, size=8):
            if x > 0 and total < to_mask:
                lengths.append(int(min(x, to_mask - total)))
                total += lengths[-1]
    k, free = len(lengths), length - to_mask
    if k == 0:
        return []
    gaps = np.zeros(k + 1, np.int64)
    if free >= k - 1:
        gaps[1:k] = 1  # keep spans apart: each becomes its own <mask>
    rest = free - int(gaps.sum())
    cuts = np.sort(rng.choice(rest + k, k, replace=False))  # stars and bars
    gaps += np.diff(np.concatenate([[-1], cuts, [rest + k]])) - 1
    spans, pos = [], int(gaps[0])
    for n, gap in zip(lengths, gaps[1:]):
        spans.append((pos, n))
        pos += n + int(gap)
    return spans


def text_infilling(tokens: Sequence[int], spans: Sequence[tuple[int, int]], mask_id: int) -> list[int]:
    """``tokens`` with each span replaced by one ``mask_id``."""
    out, pos = [], 0
    for start, n in spans:
        out.extend(tokens[pos:start])
        out.append(mask_id)
        pos = start + n
    out.extend(tokens[pos:])
    return out


def mask_id(tokenizer: Tokenizer) -> int:
    i = tokenizer.piece_id(MASK_PIECE)
    if i is None:
        raise DataError(f"task infilling: tokenizer {tokenizer.path} has no {MASK_PIECE!r} piece; add it "
                        f"with jaxft.data.vocab.extend_tokenizer (and resize the model's embeddings)")
    return i
