"""Worker processes that build training batches ahead of the step (``data.workers``).

The process's slots (batch rows) are split into ``data.workers`` contiguous groups; each
group's rows are produced by its own worker process from a pickled copy of the pipeline
restricted to those slots.  Slots are independent streams (the same property that makes a
P-process run yield the rows of a 1-process run), so batches are identical for any number
of workers.  Each worker sends, per batch, its rows, its slots' iterator state after them
and its draw counts; the main process keeps the state of the last batch it handed out, so
a checkpoint holds exactly the consumed position whatever the workers have prefetched.

Workers are started with ``spawn`` (forking a process that runs JAX is unsafe), run in
their own process group (a Ctrl-C or a group SIGTERM is the main process's to handle: it
finishes its step and checkpoints), and exit when the main process is gone.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import traceback
import weakref
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_POLL_S = 1.0
_POOLS: weakref.WeakSet = weakref.WeakSet()


class DataWorkerError(RuntimeError):
    """A data worker process died without reporting an error."""


def _work(blob: bytes, out: Any, parent: int) -> None:
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pipeline = pickle.loads(blob)
        while True:
            rows = pipeline.next_local()
            msg = ("batch", rows, pipeline.get_state(), pipeline.draw_counts())
            while True:
                try:
                    out.put(msg, timeout=_POLL_S)
                    break
                except queue.Full:
                    if os.getppid() != parent:
                        return
    except BaseException as e:  # noqa: BLE001 - reported to the main process
        try:
            pickle.dumps(e)
            err = e
        except Exception:  # noqa: BLE001
            err = RuntimeError(f"{type(e).__name__}: {e}")
        out.put(("error", err, traceback.format_exc()))


class WorkerPool:
    """``next()`` -> the concatenated rows of every worker's next batch."""

    def __init__(self, pipeline: Any, workers: int, prefetch: int):
        slots = list(pipeline.slots)
        groups = [g for g in np.array_split(np.arange(len(slots)), min(workers, len(slots))) if len(g)]
        ctx = mp.get_context("spawn")
        self.state = pipeline.get_state()  # of the last batch handed out (so far: the start)
        self.counts: list[Any] = [None] * len(groups)
        self.queues, self.procs = [], []
        for g in groups:
            sub = pipeline.for_slots(range(slots[g[0]], slots[g[-1]] + 1))
            q = ctx.Queue(maxsize=max(1, prefetch))
            p = ctx.Process(target=_work, args=(pickle.dumps(sub), q, os.getpid()), daemon=True,
                            name=f"jaxft-data-{len(self.procs)}")
            p.start()
            self.queues.append(q)
            self.procs.append(p)
        _POOLS.add(self)
        log.info("data: %d worker process(es), %d batch(es) prefetched each", len(self.procs), max(1, prefetch))

    def _get(self, w: int) -> tuple:
        while True:
            try:
                return self.queues[w].get(timeout=_POLL_S)
            except queue.Empty:
                if not self.procs[w].is_alive():
                    try:
                        return self.queues[w].get(timeout=_POLL_S)
                    except queue.Empty:
                        raise DataWorkerError(f"data worker {w} died (exit code {self.procs[w].exitcode}) "
                                              f"without reporting an error") from None

    def next(self) -> tuple[dict[str, np.ndarray], list[Any]]:
        parts, states = [], {}
        for w in range(len(self.procs)):
            msg = self._get(w)
            if msg[0] == "error":
                self.close()
                log.debug("data worker %d failed:\n%s", w, msg[2])
                raise msg[1]
            _, rows, state, counts = msg
            parts.append(rows)
            states.update(state)
            self.counts[w] = counts
        self.state = states
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, self.counts

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)
        for q in self.queues:
            q.cancel_join_thread()
            q.close()
        self.procs, self.queues = [], []


@atexit.register
def _close_all() -> None:  # before multiprocessing's own exit handler joins daemon processes
    for pool in list(_POOLS):
        pool.close()
