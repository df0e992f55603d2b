"""Metric sinks (JSONL, TensorBoard, console progress) and the MFU estimate.

Only process 0 writes.  metrics.jsonl is strict JSON (a non-finite value is
written as null).  A resumed run first cuts the file back to the steps up to
the checkpoint it resumes from (a line cut short by a kill, and lines of steps
that will be trained again, are dropped; the file is replaced atomically), then
appends: across any kill, every logged step has exactly one line.
TensorBoard events of the dropped steps are purged the same way (purge_step).

A run dir at a URL (``gs://``: no append on an object store) is written through a local spool
folder: metrics.jsonl (downloaded first, then cut back) and this process's TensorBoard event
file are uploaded whole, one object each, at `MetricsWriter.sync`: before every checkpoint (the
checkpoint hook calls it, so a checkpointed step's line is stored before its checkpoint), at
most every `SYNC_S` seconds while logging, and at close.  A kill loses at most the lines since
the last sync, all of steps after the newest checkpoint, which the resumed run logs again.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.paths import as_path, copy, is_remote, upload
from jaxft.train.chips import chip_of_kind

log = logging.getLogger(__name__)


@functools.cache
def device_peak_flops() -> float:
    """Peak FLOP/s of one local device: its chip's dense bf16 figure (`jaxft.train.chips`, vendor
    data; it only feeds the running MFU estimate, benchmarks measure their own), else a measured
    f32 matmul."""
    chip = chip_of_kind(jax.local_devices()[0].device_kind)
    if chip is not None:
        return chip.peak_bf16
    n = 1024
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a).lower(x).compile()
    f(x).block_until_ready()
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _plain(value: Any) -> Any:
    """Arrays / numpy scalars -> floats (None when not finite), recursively through dicts."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, str) or np.ndim(value) != 0:
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def cut_back(path: Path, last_step: int) -> int:
    """Keep the lines of steps <= `last_step` that parse (none when `last_step` is 0);
    returns how many lines were dropped.  The file is replaced atomically."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
                keep = last_step > 0 and int(row["step"]) <= last_step
            except (ValueError, KeyError, TypeError):
                keep = False  # a line cut short by a kill
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            elif line.strip():
                dropped += 1
    if dropped:
        tmp = path.parent / f".{path.name}.partial"
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def _flat(value: dict[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in value.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, float):
            out[f"{prefix}{k}"] = v
    return out


SYNC_S = 60.0  # a remote run dir's metrics: a logged line is uploaded once this long passed since the last upload


def _spool(run_dir) -> Path:
    """A local folder standing in for a remote run dir's metrics: metrics.jsonl downloaded."""
    spool = Path(tempfile.mkdtemp(prefix="jaxft-metrics-"))
    if (as_path(run_dir) / "metrics.jsonl").exists():
        copy(as_path(run_dir) / "metrics.jsonl", spool / "metrics.jsonl")
    return spool


class MetricsWriter:
    """`resume_step`: the step the run (re)starts from; later lines are dropped first.
    `run_dir` may be a URL: the files are then written locally and uploaded (`sync`)."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self._remote = as_path(run_dir) if is_remote(run_dir) else None
        self._dir = local = _spool(run_dir) if self._remote else run_dir
        local.mkdir(parents=True, exist_ok=True)
        dropped = cut_back(local / "metrics.jsonl", resume_step)
        if dropped:
            log.info("metrics.jsonl: dropped %d line(s) after step %d (the step this run resumes from)",
                     dropped, resume_step)
        self._jsonl = open(local / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(local / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # pragma: no cover - tensorboardX is a runtime dependency
            log.warning("tensorboardX is not installed: no TensorBoard events")
        self._synced = -math.inf
        if dropped:
            self.sync()  # the cut-back file replaces the remote one now

    def sync(self) -> None:
        """Upload metrics.jsonl and the TensorBoard event files (a remote run dir; else nothing)."""
        if not self.enabled or self._remote is None:
            return
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()
        self._upload()

    def _upload(self) -> None:
        upload(self._dir / "metrics.jsonl", self._remote / "metrics.jsonl")
        if (self._dir / "tb").is_dir():
            for f in sorted((self._dir / "tb").iterdir()):
                upload(f, self._remote / "tb" / f.name)
        self._synced = time.monotonic()

    def write(self, step: int, scalars: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        clean = _plain(scalars)
        self._jsonl.write(json.dumps({"step": step, "kind": kind, **clean}, ensure_ascii=False,
                                     allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in _flat(clean, f"{kind}/").items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._remote is not None and time.monotonic() - self._synced >= SYNC_S:
            self.sync()

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._remote is not None:
            self._upload()
            shutil.rmtree(self._dir, ignore_errors=True)


class Progress:
    """A tqdm bar with ETA on an interactive console; plain log lines otherwise."""

    def __init__(self, start: int, total: int, enabled: bool):
        self._bar = None
        if enabled and jax.process_index() == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, text: str) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(text, refresh=True)
        else:
            log.info("step %d %s", step, text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
