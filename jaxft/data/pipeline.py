"""The training and dev input pipelines (grain).

Training data flow, for a global batch of B rows ("slots"):

    sources --read--> Examples per direction --shuffle+repeat--> Mixture (temperature)
    slot r: mixture[r], mixture[r+B], ... --tokenize (lazy)--> pack or pad --> row r

Process p of P owns slots [p*B/P, (p+1)*B/P) and reads only their stream
indices, so a P-process run yields exactly the rows of a 1-process run, and
its state (one grain iterator state per slot, JSON-serialisable) can be
restored into any process layout that owns the same slots.

Every row has ``inputs``, ``targets``, ``positions``, ``segment_ids``
(int32) and ``weights`` (float32), shape ``[seq_len]``.  Packed rows hold
whole examples, segment ids 1..n, positions restarting at 0 per example;
padding is token 0 (``Tokenizer.pad_id`` for models trained here), weight 0,
segment 0, position 0.  Paths of train sources may use ``{split}`` = train,
of dev sources ``{split}`` = dev.

Encoder-decoder models (``encoder_decoder=True``; features and language-token
conventions in ``jaxft.data.seq2seq``): rows hold ``enc_inputs``,
``enc_segment_ids``, ``enc_positions`` ``[encoder_seq_len]`` and ``inputs``
(decoder inputs), ``targets``, ``weights``, ``segment_ids``, ``positions``
``[seq_len]``.  Packing packs both sides together: example k of a row is
segment k on both sides, so cross-attention can match segments.  The noise of
``span_corruption`` / ``infilling`` is seeded by ``(data.seed, stream index)``
(dev: the example's position in its file), so it is part of the deterministic,
resumable stream.

Over-long examples (``data.overlong``, see ``jaxft.data.tasks`` and
``jaxft.data.seq2seq``) are dealt with when the pipeline is built: every
example's token length is measured once (``example_lengths``, with the
featurizer's own tokenization); with ``error`` the first over-long example
raises ``OverlongError`` naming its ``file:line``; with ``skip`` over-long
examples are dropped before the mixture, so temperature rates use the counts
that are trained on, and the counts are reported per direction (the rates
table, ``stats``).  ``truncate`` cuts when an example is drawn, as before.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxft.config.schema import DataConfig
from jaxft.data.mixture import (Mixture, derive_seed, format_rates_table, realised_rates,
                                shuffled_repeat, temperature_rates)
from jaxft.data import seq2seq
from jaxft.data.directions import (_DEV_NOISE_STREAM, AnyFeaturizer, Direction, DrawStats, Subset, _featurizer,
                                   apply_overlong, draw, example_lengths, lengths_key, read_directions)
from jaxft.data.sources import DataError
from jaxft.data.tasks import FEATURES, Featurizer, pad_row
from jaxft.data.tokenizer import Tokenizer

__all__ = ["ROW_KEYS", "AnyFeaturizer", "Direction", "Subset", "TrainPipeline", "apply_overlong",
           "build_dev_batches", "build_train_pipeline", "example_lengths", "read_directions"]

log = logging.getLogger(__name__)

ROW_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")
REALISED_RATE_EXAMPLES = 20000
_NO_PREFETCH = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _unpacked_row(seq_len: int):
    return lambda features: pad_row(features, seq_len)


def _packed_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "inputs": row["inputs"], "targets": row["targets"], "weights": row["weights"],
        "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"],
    }


class TrainPipeline(Iterator[dict[str, np.ndarray]]):
    """``next(p)`` -> this process's rows of the next global batch.

    With ``workers`` > 0 the rows are built by worker processes (``jaxft.data.workers``),
    identical to ``workers=0``; ``close()`` stops them."""

    def __init__(self, mixture: Mixture, featurizers: Sequence[Featurizer],
                 directions: Sequence[Direction], *, global_batch: int, slots: range,
                 seq_len: int, packing: bool, encoder_seq_len: int | None = None,
                 workers: int = 0, prefetch: int = 2):
        """``encoder_seq_len`` set: encoder-decoder rows (``featurizers`` are ``Seq2SeqFeaturizer``)."""
        self.mixture, self.featurizers, self.directions = mixture, list(featurizers), list(directions)
        self.global_batch, self.slots, self.seq_len, self.packing = global_batch, slots, seq_len, packing
        self.encoder_seq_len = encoder_seq_len
        self.row_keys = ROW_KEYS if encoder_seq_len is None else seq2seq.ROW_KEYS
        self.draw_stats = [DrawStats() for _ in self.directions]
        if workers < 0 or prefetch < 0:
            raise ValueError(f"data.workers and data.prefetch must be >= 0, got {workers} and {prefetch}")
        self.workers, self.prefetch = workers, prefetch
        self._iters: dict[int, Any] | None = None
        self._pending: dict[str, Any] | None = None  # a state to start the iterators from
        self._pool = None
        self._worker_counts: list[Any] = []

    def _slot_dataset(self, r: int) -> grain.IterDataset:
        featurizers, stats, B = self.featurizers, self.draw_stats, self.global_batch
        ds = grain.MapDataset.source(self.mixture)[r :: B]
        if self.encoder_seq_len is None:  # None = skipped (bad record, over-long)
            ds = ds.map(lambda item: draw(featurizers[item[0]], item[1], stats[item[0]]))
            lengths, unpacked, packed_row = ({k: self.seq_len for k in FEATURES}, _unpacked_row(self.seq_len),
                                             _packed_row)
        else:  # the noise of stream example i = r + j*B is seeded by i
            ds = ds.map_with_index(lambda j, item: draw(featurizers[item[0]], item[1], stats[item[0]],
                                                        index=r + j * B))
            S, L = self.encoder_seq_len, self.seq_len
            lengths, packed_row = seq2seq.length_struct(S, L), seq2seq.packed_seq2seq_row
            unpacked = lambda features: seq2seq.pad_seq2seq_row(features, S, L)  # noqa: E731
        it = ds.to_iter_dataset(_NO_PREFETCH)
        if not self.packing:
            return it.map(unpacked)
        packed = grain.experimental.FirstFitPackIterDataset(
            it, length_struct=lengths, num_packing_bins=1, shuffle_bins=False,
        )
        return packed.map(packed_row)

    def _iterators(self) -> dict[int, Any]:
        if self._iters is None:
            self._iters = {r: iter(self._slot_dataset(r)) for r in self.slots}
            if self._pending is not None:
                for r, it in self._iters.items():
                    it.set_state(self._pending[f"slot_{r}"])
                self._pending = None
        return self._iters

    def next_local(self) -> dict[str, np.ndarray]:
        """The next rows, built in this process."""
        iters = self._iterators()
        rows = [next(iters[r]) for r in self.slots]
        return {k: np.stack([row[k] for row in rows]) for k in self.row_keys}

    def __next__(self) -> dict[str, np.ndarray]:
        if not self.workers:
            return self.next_local()
        if self._pool is None:
            from jaxft.data.workers import WorkerPool

            self._pool = WorkerPool(self, self.workers, self.prefetch)
        rows, self._worker_counts = self._pool.next()
        return rows

    def for_slots(self, slots: range) -> TrainPipeline:
        """A copy that builds only ``slots`` (a worker's share), in its own process, from
        this pipeline's current state."""
        sub = TrainPipeline(self.mixture, self.featurizers, self.directions, global_batch=self.global_batch,
                            slots=slots, seq_len=self.seq_len, packing=self.packing,
                            encoder_seq_len=self.encoder_seq_len)
        state = self.get_state()
        sub._pending = {f"slot_{r}": state[f"slot_{r}"] for r in slots}
        return sub

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable; one entry per owned slot (``slot_<r>``): the position after the
        last batch handed out."""
        if self._pool is not None:
            return dict(self._pool.state)
        if self._iters is None and self._pending is not None:
            return dict(self._pending)
        return {f"slot_{r}": it.get_state() for r, it in self._iterators().items()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore own slots from ``state`` (which may hold other processes' slots too)."""
        missing = [f"slot_{r}" for r in self.slots if f"slot_{r}" not in state]
        if missing:
            raise DataError(
                f"data iterator state lacks slots {missing[:4]}{'...' if len(missing) > 4 else ''} "
                f"of this process (it has {len(state)} entries; was global_batch changed?)"
            )
        self.close()
        self._iters, self._pending = None, {f"slot_{r}": state[f"slot_{r}"] for r in self.slots}

    def close(self) -> None:
        """Stop the worker processes (a later ``next`` starts new ones from the current state)."""
        if self._pool is not None:
            state = self._pool.state
            self._pool.close()
            self._pool, self._iters, self._pending = None, None, state

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_iters=None, _pool=None, _worker_counts=[])
        return state

    def draw_counts(self) -> list[dict[str, Any]]:
        """Per direction, this process's (or worker's) counts so far: examples tokenized,
        over-long skipped / truncated when drawn, bad records skipped when drawn."""
        return [{**f.stats.to_dict(), "bad_skipped": dict(d.bad)} for f, d in zip(self.featurizers, self.draw_stats)]

    def counts(self) -> list[dict[str, Any]]:
        """``draw_counts`` summed over this process's workers."""
        parts = [c for c in self._worker_counts if c] or [self.draw_counts()]
        out = []
        for per_dir in zip(*parts):
            total: dict[str, Any] = {"bad_skipped": collections.Counter()}
            for c in per_dir:
                for k, v in c.items():
                    if k == "bad_skipped":
                        total[k].update(v)
                    else:
                        total[k] = total.get(k, 0) + v
            total["bad_skipped"] = dict(total["bad_skipped"])
            out.append(total)
        return out

    @property
    def rates(self) -> list[dict[str, Any]]:
        """Per direction: examples, target rate, rate realised over the stream's start."""
        n = REALISED_RATE_EXAMPLES
        realised = realised_rates(self.mixture, n)
        return [
            {"direction": d.name, "examples": len(d.examples), "overlong_skipped": d.overlong_skipped,
             "target": float(t), "realised": float(q)}
            for d, t, q in zip(self.directions, self.mixture.rates, realised)
        ]

    @property
    def stats(self) -> dict[str, Any]:
        """Read counts (per file), over-long examples skipped up front, and tokenization
        counts (this process, so far)."""
        return {
            d.name: {**d.read_stats.to_dict(), "overlong_skipped": d.overlong_skipped,
                     **{f"tokenized_{k}" if k != "bad_skipped" else k: v for k, v in c.items()}}
            for d, c in zip(self.directions, self.counts())
        }

    def rates_table(self) -> str:
        r = self.rates
        return format_rates_table([x["direction"] for x in r], [x["examples"] for x in r],
                                  [x["target"] for x in r], [x["realised"] for x in r],
                                  [x["overlong_skipped"] for x in r])


def _check_seq2seq(encoder_decoder: bool, decoder_start_id: int | None) -> int | None:
    """The decoder start id to featurize with, None for decoder-only."""
    if not encoder_decoder:
        return None
    if decoder_start_id is None:
        raise ValueError("encoder-decoder data needs model.decoder_start_id (T5: pad 0; mBART/NLLB: eos 2)")
    return int(decoder_start_id)


def build_train_pipeline(
    cfg: DataConfig, tokenizer: Tokenizer, *, global_batch: int, base_dir: Path,
    process_index: int = 0, process_count: int = 1,
    encoder_decoder: bool = False, decoder_start_id: int | None = None,
) -> TrainPipeline:
    """The training pipeline; ``encoder_decoder`` (with the model's
    ``decoder_start_id``) gives seq2seq rows (see the module docstring)."""
    start_id = _check_seq2seq(encoder_decoder, decoder_start_id)
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} is not divisible by {process_count} processes")
    if not cfg.train:
        raise DataError("data.train: no training sources configured")
    directions = read_directions(cfg, base_dir, split="train")
    featurizers = [_featurizer(cfg, tokenizer, d, decoder_start_id=start_id) for d in directions]
    key = lengths_key(cfg, tokenizer, f"train:{start_id}")
    directions = [apply_overlong(d, f, cfg.overlong, scan_limit=cfg.overlong_scan, lengths_key=key)
                  for d, f in zip(directions, featurizers)]
    sizes = [d.config.weight or len(d.examples) for d in directions]
    rates = temperature_rates(sizes, cfg.temperature)
    datasets = [shuffled_repeat(d.examples, derive_seed(cfg.seed, 1, i)) for i, d in enumerate(directions)]
    mixture = Mixture(datasets, rates, seed=cfg.seed)
    per = global_batch // process_count
    pipeline = TrainPipeline(
        mixture, featurizers, directions,
        global_batch=global_batch, slots=range(process_index * per, (process_index + 1) * per),
        seq_len=cfg.seq_len, packing=cfg.packing,
        encoder_seq_len=(cfg.encoder_seq_len or cfg.seq_len) if encoder_decoder else None,
        workers=cfg.workers, prefetch=cfg.prefetch,
    )
    log.info("training mixture (temperature %g):\n%s", cfg.temperature, pipeline.rates_table())
    return pipeline


def build_dev_batches(
    cfg: DataConfig, tokenizer: Tokenizer, *, batch_size: int, base_dir: Path, max_batches: int,
    encoder_decoder: bool = False, decoder_start_id: int | None = None,
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per dev direction: up to ``max_batches`` batches [batch_size, seq_len], unpacked.

    The first ``max_batches * batch_size`` examples in file order (after the
    over-long policy, applied to the whole file up front); the last batch is
    padded with all-zero rows.  With ``encoder_decoder``, seq2seq rows as in
    training.
    """
    start_id = _check_seq2seq(encoder_decoder, decoder_start_id)
    if start_id is None:
        keys, features_of, pad = ROW_KEYS, FEATURES, lambda f: pad_row(f, cfg.seq_len)  # noqa: E731
    else:
        S = cfg.encoder_seq_len or cfg.seq_len
        keys, features_of = seq2seq.ROW_KEYS, seq2seq.FEATURES
        pad = lambda f: seq2seq.pad_seq2seq_row(f, S, cfg.seq_len)  # noqa: E731
    out: dict[str, list[dict[str, np.ndarray]]] = {}
    for i, d in enumerate(read_directions(cfg, base_dir, split="dev")):
        featurize = _featurizer(cfg, tokenizer, d, decoder_start_id=start_id,
                                seed=derive_seed(cfg.seed, _DEV_NOISE_STREAM, i))
        d = apply_overlong(d, featurize, cfg.overlong, scan_limit=cfg.overlong_scan,
                           lengths_key=lengths_key(cfg, tokenizer, f"dev:{start_id}:{i}"))
        if d.overlong_skipped:
            log.warning("dev %s: skipped %d over-long examples (of %d)", d.name, d.overlong_skipped,
                        d.overlong_skipped + len(d.examples))
        positions = range(len(d.source)) if d.positions is None else d.positions
        rows, counts = [], DrawStats()
        for n in positions:  # noise seeded by the position in the file, as before
            if len(rows) == max_batches * batch_size:
                break
            ex = d.source[int(n)]
            features = draw(featurize, ex, counts) if start_id is None else draw(featurize, ex, counts, index=int(n))
            if features is not None:
                rows.append(pad(features))
        empty = {k: np.zeros_like(v) for k, v in pad({k: [] for k in features_of}).items()}
        batches = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            chunk += [empty] * (batch_size - len(chunk))
            batches.append({k: np.stack([row[k] for row in chunk]) for k in keys})
        out[d.name] = batches
    return out
