"""Where `jaxft.train.plan`'s extrapolation compiles run beside the scanned step's compile:
worker processes for a TPU topology (stopped when the compiler refuses the step, and exiting when
the planner is gone), threads for local devices."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Callable, Sequence

from jaxft.config.schema import Config


def _die_with(parent: int) -> None:
    """A worker's initializer: exit when the planner is gone (killed by a timeout, say), even mid-compile."""
    import os
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _pool():
    """Three spawned worker processes that do not run the caller's main script.  A spawned child
    normally re-imports ``__main__`` (as ``__mp_main__``): a script calling `jaxft.train.plan.plan`
    without an ``if __name__ == "__main__":`` guard would plan again in every worker, which fails
    in their bootstrap, and the pool would replace them forever.  The workers need nothing from
    the main script (their work is module-level jaxft functions), so while they start the main
    module shows no file or spec to re-import."""
    import multiprocessing
    import os
    import sys

    main = sys.modules["__main__"]
    hidden = {k: main.__dict__.pop(k) for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__spec__ = None
    try:
        return multiprocessing.get_context("spawn").Pool(3, initializer=_die_with, initargs=(os.getpid(),))
    finally:
        del main.__spec__
        main.__dict__.update(hidden)


class Workers:
    """Where the extrapolation's small compiles run beside the scanned step's compile: worker
    processes for a TPU topology (a step the compiler refuses needs none, and a process can be
    stopped mid-compile; threads would run on for minutes, and the process would wait for them at
    exit), threads for local devices."""

    def __init__(self, topology: Any | None):
        self.topology = topology
        self.procs = _pool() if topology is not None else None
        self.threads = concurrent.futures.ThreadPoolExecutor(max_workers=3) if topology is None else None

    def submit(self, local: Callable, remote: Callable, cfg: Config, devices: Sequence, sizes: dict[str, int]
               ) -> Callable[[], dict[str, float]]:
        """``local(cfg, devices, sizes)`` in a thread, or ``remote(cfg, topology, sizes)`` (a
        module-level function: it is pickled by name) in a worker process; returns the waiter."""
        if self.procs is not None:
            return self.procs.apply_async(remote, (cfg, self.topology, sizes)).get
        return self.threads.submit(local, cfg, devices, sizes).result

    def stop(self, needed: bool) -> None:
        """Not ``needed``: stop what runs (processes) or has not started (threads)."""
        if self.procs is not None:
            if needed:
                self.procs.close()
            else:
                self.procs.terminate()
                self.procs.join()
        else:
            self.threads.shutdown(wait=False, cancel_futures=not needed)
