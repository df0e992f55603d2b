"""Temperature-sampled mixture of per-direction datasets, random access.

``temperature_rates`` gives p_i ∝ n_i^(1/T).  ``Mixture`` maps a global index
of the (infinite) mixed stream to ``(source, index in source)``:

* the stream is cut into blocks of ``block_size`` indices; block ``b`` holds
  ``C_s(b+1) - C_s(b)`` examples of source ``s`` with ``C_s(b) =
  floor(p_s * block_size * b)`` (the largest source takes the remainder), so
  every prefix of whole blocks matches the rates to within one example for
  each source but the largest (which absorbs the rounding); the block's order is a permutation seeded by ``(seed, b)``, so
  every sub-stream (``i = r, r+B, ...``) sees the same mixture;
* the ``j``-th example drawn from source ``s`` is element ``j`` of that
  source's stream: the source shuffled by seed and reshuffled each epoch
  (``EpochShuffled``).

Everything is a pure function of ``(seed, index)``: no iterator state, so any
process can read any part of the stream, and resuming needs only the index.
We do not use grain's ``MapDataset.mix`` because it interleaves sources in a
fixed period: with a batch size sharing a factor with that period, a batch
row (slot) would only ever see one source, and packing would then bias the
trained mixture towards sources with short examples.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np


def temperature_rates(sizes: Sequence[float], temperature: float) -> np.ndarray:
    """Sampling rates p_i ∝ n_i^(1/T): T=1 proportional, T -> inf uniform."""
    sizes = np.asarray(sizes, np.float64)
    if sizes.ndim != 1 or sizes.size == 0:
        raise ValueError("temperature_rates needs a non-empty list of sizes")
    if not np.all(sizes > 0) or not np.all(np.isfinite(sizes)):
        raise ValueError(f"dataset sizes must be finite and > 0, got {sizes.tolist()}")
    if not temperature > 0:
        raise ValueError(f"data.temperature must be > 0, got {temperature}")
    # In log space: sizes ** (1/T) overflows for tiny T.
    logits = np.log(sizes) / temperature
    w = np.exp(logits - logits.max())
    return w / w.sum()


def derive_seed(seed: int, *path: int) -> int:
    """A 32-bit seed for one component (source, block...) of the stream."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


PERMUTATION_TABLE_MAX = 1 << 16  # sources up to this size shuffle through a permutation table


class FeistelPermutation:
    """A seeded bijection of ``[0, n)`` in O(1) memory: a 4-round Feistel network over the
    smallest even number of bits covering ``n``, walking the cycle until the value falls
    below ``n`` (fewer than 4 rounds of walking on average)."""

    _M = (1 << 64) - 1

    def __init__(self, n: int, seed: Sequence[int] | int):
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [int(k) for k in np.random.default_rng(seed).integers(0, 1 << 62, size=4)]

    def _round(self, r: int, k: int) -> int:
        x = (r ^ k) * 0x9E3779B97F4A7C15 & self._M
        x ^= x >> 29
        x = x * 0xBF58476D1CE4E5B9 & self._M
        return (x ^ (x >> 32)) & self.mask

    def __getitem__(self, i: int) -> int:
        x, h, mask = int(i), self.half, self.mask
        while True:
            left, right = x >> h, x & mask
            for k in self.keys:
                left, right = right, left ^ self._round(right, k)
            x = (left << h) | right
            if x < self.n:
                return x


class EpochShuffled:
    """An infinite random-access view of ``elements``: epoch ``e`` is a
    permutation seeded by ``(seed, e)``, so each epoch is reshuffled.

    Up to ``PERMUTATION_TABLE_MAX`` elements the permutation is a table (numpy); above,
    a ``FeistelPermutation``, so memory does not grow with the source.
    (grain's ``MapDataset.shuffle().repeat()`` does the same, but its index
    shuffle takes milliseconds per element for sources of a few dozen
    examples, common for low-resource directions.)
    """

    def __init__(self, elements: Sequence[Any], seed: int):
        if not len(elements):
            raise ValueError("cannot shuffle an empty source")
        self.elements, self.seed = elements, seed
        self.n = len(elements)
        self._perm = functools.lru_cache(maxsize=2)(self._make_perm)

    def _make_perm(self, epoch: int):
        if self.n <= PERMUTATION_TABLE_MAX:
            return np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return FeistelPermutation(self.n, [self.seed, epoch])

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> Any:
        epoch, k = divmod(int(index), self.n)
        return self.elements[int(self._perm(epoch)[k])]

    def __getstate__(self) -> dict[str, Any]:
        return {"elements": self.elements, "seed": self.seed, "n": self.n}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._perm = functools.lru_cache(maxsize=2)(self._make_perm)


def shuffled_repeat(elements: Sequence[Any], seed: int) -> EpochShuffled:
    """``elements`` shuffled by ``seed``, reshuffled each epoch, repeated forever."""
    return EpochShuffled(elements, seed)


class Mixture:
    """Random-access mixed stream: ``mixture[i] -> (source index, element)``."""

    def __init__(self, datasets: Sequence[Any], rates: Sequence[float], *, seed: int,
                 block_size: int | None = None):
        rates = np.asarray(rates, np.float64)
        if len(datasets) != len(rates) or not len(rates):
            raise ValueError("need one rate per dataset, and at least one dataset")
        if np.any(rates <= 0) or abs(rates.sum() - 1) > 1e-6:
            raise ValueError(f"rates must be > 0 and sum to 1, got {rates.tolist()}")
        n = len(rates)
        self.datasets = list(datasets)
        self.rates = rates / rates.sum()
        self.seed = seed
        # K >= n^2 keeps the largest source's share of every block positive.
        self.block_size = block_size or max(4096, 4 * n * n)
        self._largest = int(np.argmax(self.rates))
        self._block = functools.lru_cache(maxsize=64)(self._make_block)

    def __len__(self) -> int:
        return sys.maxsize

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_block"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._block = functools.lru_cache(maxsize=64)(self._make_block)

    def _cumulative(self, b: int) -> np.ndarray:
        """Examples of each source in blocks [0, b)."""
        c = np.floor(self.rates * float(self.block_size) * float(b)).astype(np.int64)
        c[self._largest] = 0
        c[self._largest] = self.block_size * b - c.sum()
        return c

    def _make_block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        start = self._cumulative(b)
        counts = self._cumulative(b + 1) - start
        labels = np.repeat(np.arange(len(counts)), counts)
        labels = np.random.default_rng(derive_seed(self.seed, 2, b)).permutation(labels)
        order = np.argsort(labels, kind="stable")
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order)) - first[labels[order]]
        return labels, start[labels] + rank

    def select(self, index: int) -> tuple[int, int]:
        """Global stream index -> (source, index within the source's stream)."""
        b, k = divmod(int(index), self.block_size)
        labels, within = self._block(b)
        return int(labels[k]), int(within[k])

    def __getitem__(self, index: int) -> tuple[int, Any]:
        s, j = self.select(index)
        return s, self.datasets[s][j]


def realised_rates(mixture: Mixture, num_examples: int, *, start: int = 0,
                   step: int = 1) -> np.ndarray:
    """Share of each source among stream indices ``start, start+step, ...`` (``num_examples`` of them)."""
    counts = np.zeros(len(mixture.rates), np.int64)
    for i in range(num_examples):
        counts[mixture.select(start + i * step)[0]] += 1
    return counts / max(num_examples, 1)


def format_rates_table(names: Sequence[str], examples: Sequence[int],
                       target: Sequence[float], realised: Sequence[float],
                       overlong_skipped: Sequence[int] | None = None) -> str:
    """A plain-text table: direction, examples, target rate, realised rate (and, when
    given, the examples skipped as over-long before the rates were computed)."""
    head = ("direction", "examples", "target", "realised")
    rows = [(n, str(e), f"{t:.4f}", f"{r:.4f}") for n, e, t, r in zip(names, examples, target, realised)]
    if overlong_skipped is not None:
        head = (*head[:2], "over-long skipped", *head[2:])
        rows = [(*row[:2], str(k), *row[2:]) for row, k in zip(rows, overlong_skipped)]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])
