"""Directions: one expanded source opened for random access, its featurizer, the
over-long scan (``apply_overlong``) and drawing one record (``draw``)."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxft.config.schema import DataConfig
from jaxft.data import seq2seq
from jaxft.data.chat import ChatFeaturizer
from jaxft.data.index import build_indexes
from jaxft.data.readers import EVAL_TASKS, LINE_FORMATS
from jaxft.data.sources import DataError, Example, ReadStats, Skipped, Source, keyed_sources, open_source
from jaxft.data.tasks import Featurizer, OverlongError
from jaxft.data.tokenizer import Tokenizer


class Subset(Sequence):
    """The examples of ``source`` at ``positions`` (those kept by the over-long scan)."""

    def __init__(self, source: Source, positions: np.ndarray):
        self.source, self.positions = source, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.source[int(self.positions[i])]


@dataclasses.dataclass
class Direction:
    """One expanded source, opened for random access (nothing read into memory)."""

    key: str
    config: Any  # SourceConfig
    source: Source
    overlong_skipped: int = 0  # dropped up front (data.overlong: skip, sources <= data.overlong_scan)
    positions: np.ndarray | None = None  # of the kept examples in ``source``; None: all

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def read_stats(self) -> ReadStats:
        return self.source.stats

    @property
    def examples(self) -> Sequence[Example | Skipped]:
        """The examples trained on, random access."""
        return self.source if self.positions is None else Subset(self.source, self.positions)


def read_directions(cfg: DataConfig, base_dir: Path, *, split: str) -> list[Direction]:
    """Expand and open ``cfg.train``, ``cfg.dev`` or ``cfg.test`` (split "train" / "dev" / "test")."""
    sources = {"train": cfg.train, "dev": cfg.dev, "test": cfg.test}[split]
    keyed = keyed_sources(sources, Path(base_dir), section=f"data.{split}", split=split)
    keyed = [(key, src) for key, src in keyed if src.task not in EVAL_TASKS]  # scored by jaxft.eval.choice / generation
    build_indexes([(src, key) for key, src in keyed if src.type in LINE_FORMATS], cfg.bad_lines, cfg.index_dir)
    return [Direction(key, src, open_source(src, key=key, bad_lines=cfg.bad_lines, index_dir=cfg.index_dir))
            for key, src in keyed]


_NOISE_TASKS = ("span_corruption", "infilling")
_DEV_NOISE_STREAM = 4  # dev noise seeds: (data.seed, 4, direction, position in file)


def _featurizer(cfg: DataConfig, tokenizer: Tokenizer, direction: Direction, *,
                decoder_start_id: int | None = None, seed: int | None = None):
    """Decoder-only ``Featurizer`` (``ChatFeaturizer`` for task chat), or ``Seq2SeqFeaturizer`` when
    ``decoder_start_id`` is given."""
    if decoder_start_id is not None:
        return seq2seq.Seq2SeqFeaturizer(tokenizer, cfg, direction.config, decoder_start_id=decoder_start_id,
                                         key=direction.key, seed=seed)
    if direction.config.task in _NOISE_TASKS:
        raise DataError(f"{direction.key}.task: {direction.config.task} needs an encoder-decoder model "
                        f"(model.family t5 or bart); decoder-only models train on monolingual text with task lm")
    if direction.config.task == "chat":
        return ChatFeaturizer(tokenizer, seq_len=cfg.seq_len, chat_template=cfg.chat_template, overlong=cfg.overlong,
                              source=f"{direction.name} ({direction.key})")
    return Featurizer(tokenizer, seq_len=cfg.seq_len, prompt_template=cfg.prompt_template,
                      target_template=cfg.target_template, overlong=cfg.overlong,
                      source=f"{direction.name} ({direction.key})")


AnyFeaturizer = Featurizer | ChatFeaturizer | seq2seq.Seq2SeqFeaturizer


def example_lengths(featurizer: AnyFeaturizer, examples: Sequence[Example]) -> np.ndarray:
    """``[n, len(featurizer.limits)]`` token lengths of ``examples``, measured once as the
    featurizer measures them when it draws (the one length pass over a source)."""
    return featurizer.lengths(examples)


def lengths_key(cfg: DataConfig, tokenizer: Tokenizer, featurizer_kind: str) -> str | None:
    """What token lengths depend on besides the source: the tokenizer, every data setting
    (conservatively: all but the source lists and settings that cannot matter) and the
    featurizer; None when the tokenizer has no ``fingerprint`` (then nothing is cached)."""
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if fingerprint is None:
        return None
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("train", "dev", "test", "workers", "prefetch", "index_dir", "overlong_scan")}
    parts = [LENGTHS_VERSION, fingerprint, featurizer_kind, settings]
    if getattr(tokenizer, "chat_template", None):  # task chat with the tokenizer's template
        parts.append(tokenizer.chat_template)
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


LENGTHS_VERSION = 1


def _lengths_path(d: Direction, key: str | None) -> Path | None:
    source_key = getattr(d.source, "cache_key", None)
    if key is None or source_key is None or not d.source.checked_up_front:
        return None
    return Path(d.source.index_path).parent / "lengths" / f"{source_key}.{key}.npy"


def _scan(d: Direction, featurizer: AnyFeaturizer, key: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the usable examples, their token lengths), measured once per source and
    tokenizer / data settings and cached beside the line index (``lengths_key``)."""
    path = _lengths_path(d, key)
    if path is not None:
        try:
            lengths = np.load(path)
            if lengths.shape == (len(d.source), len(featurizer.limits)):
                return np.arange(len(d.source)), lengths
        except (OSError, ValueError):
            pass
    records = list(d.source)
    good = np.array([i for i, ex in enumerate(records) if isinstance(ex, Example)], np.int64)
    if not d.source.checked_up_front:
        d.source.stats.skipped.update(ex.reason for ex in records if isinstance(ex, Skipped))
        d.source.stats.examples = len(good)
        if not len(good):
            raise DataError(f"{d.source.where(0).rsplit(':', 1)[0]}: no usable examples "
                            f"(skipped: {dict(d.source.stats.skipped)}) ({d.key})")
    lengths = example_lengths(featurizer, [records[i] for i in good])
    del records
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
            with open(tmp, "wb") as f:
                np.save(f, lengths.astype(np.int32))
            os.replace(tmp, path)
        except OSError:  # a cache: not writing it only costs the next start the scan
            pass
    return good, lengths


def apply_overlong(d: Direction, featurizer: AnyFeaturizer, overlong: str, *, scan_limit: int,
                   lengths_key: str | None = None) -> Direction:
    """``data.overlong`` up front, for sources of at most ``scan_limit`` records (larger ones
    are dealt with when drawn): ``error`` raises ``OverlongError`` (file:line, lengths) for
    the first over-long example; ``skip`` returns ``d`` without them (``overlong_skipped``,
    ``positions``); ``truncate`` returns ``d`` (cut when drawn).  Records a lazily checked
    source skips are left out of ``positions`` too (counted in its read stats).  With a
    ``lengths_key`` the lengths of an indexed file are cached, so a restart does not
    tokenize the source again."""
    if overlong == "truncate" or len(d.source) > scan_limit:
        return d
    good, lengths = _scan(d, featurizer, lengths_key)
    over = np.flatnonzero((lengths > np.asarray(featurizer.limits)).any(axis=1))
    keep = np.ones(len(good), bool)
    keep[over] = False
    if len(over) and overlong == "error":
        i = int(over[0])
        more = f"; {len(over) - 1} more in this source" if len(over) > 1 else ""
        raise OverlongError(f"{d.source.where(int(good[i]))}: {featurizer.describe(lengths[i])} ({d.key}{more}; "
                            f"data.overlong: skip or truncate would handle it)")
    if len(over) and not keep.any():
        raise DataError(f"{d.key}: all {len(good)} examples of {d.name!r} are over-long, e.g. "
                        f"{d.source.where(int(good[over[0]]))}: {featurizer.describe(lengths[over[0]])} "
                        f"(data.overlong: skip; raise data.seq_len or use truncate)")
    positions = good[keep]
    if len(positions) == len(d.source):
        return d
    return dataclasses.replace(d, overlong_skipped=len(over), positions=positions)


@dataclasses.dataclass
class DrawStats:
    """Per direction, counted when examples are drawn: records skipped by the bad-record
    policy (lazily checked sources) and, via the featurizer, over-long ones."""

    bad: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def draw(featurizer: AnyFeaturizer, ex: Example | Skipped, stats: DrawStats, **kw: Any):
    """Featurize one drawn record: None for a skipped one (counted), an over-long error
    naming its ``file:line``."""
    if isinstance(ex, Skipped):
        stats.bad[ex.reason] += 1
        return None
    try:
        return featurizer(ex, **kw)
    except OverlongError as e:
        if ex.where and not str(e).startswith(ex.where):
            raise OverlongError(f"{ex.where}: {e}") from None
        raise
