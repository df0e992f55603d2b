"""The sentences a tokenizer is trained on: a per-language, temperature-balanced random
sample of the train sources, read through their random access (``open_source``).

Pools.  Every train source (``data.train``, expanded per direction) adds its texts to one
pool per language: the source side (``src``) to ``src_lang``'s pool, the target side
(``tgt``) to ``tgt_lang``'s.  A monolingual source (``lm`` / ``span_corruption`` /
``infilling``) adds only its text, to ``tgt_lang`` or else ``src_lang`` (the configs set
either).  A side without a language code (e.g. xP3-style prompts) goes to a pool named after
the source (``SourceConfig.name``), so unlabelled sources each count as one "language" and
none swamps the others.  A pool's size is the sum of its sources' ``len()`` (capped at
``max_examples``): nothing is read to size it.  (``SourceConfig.weight``, a training-mixture
knob, is not used here.)

Quotas.  ``data.tokenizer.max_sentences`` is split over the pools with
``temperature_rates(pool sizes, data.temperature)`` (p_i ∝ n_i^(1/T)), by water-filling: a
pool whose share exceeds its size is taken whole and the rest is split again over the
other pools, until no share exceeds its pool; the shares are then rounded to integers by
largest remainder (ties: the earlier pool), so the quotas sum to
``min(max_sentences, total size)``.

Sampling.  Each pool draws its positions from a lazy uniform permutation of
``range(pool size)`` (Fisher-Yates over a dict of the swapped entries, seeded by
``(data.seed, pool name)``): the first ``quota`` positions are a uniform sample without
replacement in O(quota) memory whatever the pool's size.  (``Generator.choice(n, k,
replace=False)`` is not used: for ``k > n / 50`` it allocates ``arange(n)``.)  A position
maps to (source, index, side); each source is read in increasing index order, each index
once.  A ``Skipped`` record (sources checked only when read) or an empty text is not
counted, and the pool draws further positions for the shortfall until it is met or the pool
is exhausted (such a shortfall is not handed to other pools).

The result is deterministic: the same config gives the same texts in the same order
(sources in config order, then index, then src before tgt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from jaxft.config.schema import DataConfig, SourceConfig
from jaxft.data.chat_messages import plain_text
from jaxft.data.mixture import temperature_rates
from jaxft.data.readers import MONOLINGUAL_TASKS, Example, Source
from jaxft.data.sources import keyed_sources, open_source

__all__ = ["TokenizerSample", "pool_quotas", "tokenizer_sample"]

log = logging.getLogger(__name__)

SRC, TGT = 0, 1


@dataclasses.dataclass
class TokenizerSample:
    """The sampled texts, and per pool (language, or source name when unlabelled) the
    sentences taken and the sentences available; both dicts in pool order (first use in
    the config)."""

    texts: list[str]
    counts: dict[str, int]
    available: dict[str, int]


def pool_quotas(sizes: dict[str, int], total: int, temperature: float) -> dict[str, int]:
    """Sentences to take per pool: ``total`` split by ``temperature_rates`` with each pool
    capped at its size and the excess redistributed (water-filling); the quotas sum to
    ``min(total, sum(sizes))``."""
    quotas = {name: 0 for name in sizes}
    remaining = min(max(int(total), 0), sum(sizes.values()))
    active = [name for name, n in sizes.items() if n > 0]
    while active and remaining > 0:
        rates = temperature_rates([sizes[a] for a in active], temperature)
        shares = {a: remaining * float(p) for a, p in zip(active, rates)}
        full = [a for a in active if shares[a] >= sizes[a]]
        if full:
            for a in full:
                quotas[a] = sizes[a]
                remaining -= sizes[a]
            active = [a for a in active if a not in full]
            continue
        # every share < its size, so floor + 1 never exceeds a pool
        floors = {a: int(np.floor(shares[a])) for a in active}
        left = remaining - sum(floors.values())
        order = sorted(range(len(active)), key=lambda i: (-(shares[active[i]] - floors[active[i]]), i))
        for i in order[:left]:
            floors[active[i]] += 1
        quotas.update(floors)
        remaining = 0
    return quotas


class _LazyPermutation:
    """A uniform random permutation of ``range(n)``, drawn a prefix at a time (Fisher-Yates
    with the swapped entries in a dict): memory O(positions drawn), not O(n)."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng, self.t = n, rng, 0
        self.swaps: dict[int, int] = {}

    @property
    def left(self) -> int:
        return self.n - self.t

    def take(self, k: int) -> np.ndarray:
        k = min(k, self.left)
        t0, swaps = self.t, self.swaps
        js = self.rng.integers(np.arange(t0, t0 + k, dtype=np.int64), self.n).tolist() if k else []
        out = np.empty(k, np.int64)
        for m, j in enumerate(js):
            t = t0 + m
            vj = swaps.get(j, j)
            vt = swaps.pop(t, t)  # position t is never looked at again
            if j != t:
                swaps[j] = vt
            out[m] = vj
        self.t += k
        return out


@dataclasses.dataclass
class _Pool:
    name: str
    segments: list[tuple[int, int, int]]  # (source number, side, examples), in config order

    @property
    def size(self) -> int:
        return sum(n for _, _, n in self.segments)


def _side_pools(src: SourceConfig) -> list[tuple[int, str]]:
    """(side, pool name) for the texts a source contributes."""
    if src.task in (*MONOLINGUAL_TASKS, "chat"):
        return [(TGT, src.tgt_lang or src.src_lang or src.name)]
    return [(SRC, src.src_lang or src.name), (TGT, src.tgt_lang or src.name)]


def _rng(seed: int, pool: str) -> np.random.Generator:
    digest = hashlib.sha256(pool.encode("utf-8")).digest()
    return np.random.default_rng([seed, 0x746F6B, *np.frombuffer(digest[:16], np.uint32).tolist()])


def tokenizer_sample(cfg: DataConfig, base_dir: Path) -> TokenizerSample:
    """A temperature-balanced per-language sample of ``data.train``'s texts, at most
    ``data.tokenizer.max_sentences`` of them (see the module docstring)."""
    keyed = keyed_sources(cfg.train, Path(base_dir), section="data.train", split="train")
    sources: list[Source] = []
    pools: dict[str, _Pool] = {}
    for i, (key, src) in enumerate(keyed):
        source = open_source(src, key=key, bad_lines=cfg.bad_lines, index_dir=cfg.index_dir)
        n = len(source) if src.max_examples is None else min(len(source), src.max_examples)
        sources.append(source)
        for side, name in _side_pools(src):
            pools.setdefault(name, _Pool(name, [])).segments.append((i, side, n))
    available = {name: p.size for name, p in pools.items()}
    need = pool_quotas(available, cfg.tokenizer.max_sentences, cfg.temperature)
    counts = {name: 0 for name in pools}
    perms = {name: _LazyPermutation(p.size, _rng(cfg.seed, name)) for name, p in pools.items()}
    starts = {name: np.cumsum([0] + [n for _, _, n in p.segments]) for name, p in pools.items()}
    taken: list[tuple[int, int, int, str]] = []  # (source number, index, side, text)
    while True:
        requests: dict[int, list[tuple[int, int, str]]] = defaultdict(list)  # source -> (index, side, pool)
        for name, pool in pools.items():
            positions = perms[name].take(need[name] - counts[name])
            if not len(positions):
                continue
            segs = np.searchsorted(starts[name], positions, side="right") - 1
            for pos, s in zip(positions.tolist(), segs.tolist()):
                i, side, _ = pool.segments[s]
                requests[i].append((pos - int(starts[name][s]), side, name))
        if not requests:
            break
        for i in sorted(requests):
            last, ex = -1, None
            for index, side, name in sorted(requests[i]):
                if index != last:
                    last, ex = index, sources[i][index]
                if not isinstance(ex, Example):
                    continue
                text = (ex.src if side == SRC else plain_text(ex.tgt) if ex.task == "chat" else ex.tgt).strip()
                if text:
                    counts[name] += 1
                    taken.append((i, index, side, text))
    taken.sort(key=lambda x: x[:3])
    for name in pools:
        log.info("tokenizer sample: %s %d/%d", name, counts[name], available[name])
    return TokenizerSample([t for *_, t in taken], counts, available)
