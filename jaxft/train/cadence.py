"""When to checkpoint and when to stop: step and time cadence, and preemption.

SIGTERM (the preemption notice of TPU VMs and spot GPUs) and SIGINT (Ctrl-C)
do not kill a training process any more: the current step finishes, a
checkpoint is written, and `jaxft train` exits with `PREEMPTED_EXIT` (75,
EX_TEMPFAIL: "resume me"; `tpu_scripts/launch.sh` relaunches on it) or
`INTERRUPTED_EXIT` (130) for SIGINT.  A second SIGINT interrupts at once.

Every process must stop at the same step (a checkpoint is a collective write).
With several processes, SIGTERM is left to JAX's preemption service (started by
`jax.distributed.initialize`): the notice reaches every process and
`multihost_utils.reached_preemption_sync_point` names one common step.  SIGINT
on any process is forwarded to that service as a SIGTERM.  Without the service,
the processes agree by an all-gather of their flags at every step.

The time cadence (`checkpoint.every_minutes`) is process 0's clock; with several
processes it is broadcast every `train.log_every` steps (a host sync), not every step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxft.config.schema import Config

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL
INTERRUPTED_EXIT = 130  # 128 + SIGINT


def _jax_preemption_service() -> bool:
    from jax._src import distributed

    return distributed.global_state.client is not None and \
        distributed.global_state.preemption_sync_manager is not None


class Cadence:
    """Decides, after each step, whether to checkpoint and whether to stop."""

    def __init__(self, cfg: Config):
        self.every = cfg.checkpoint.every
        self.every_s = cfg.checkpoint.every_minutes * 60.0
        self.log_every = cfg.train.log_every
        self.multi = jax.process_count() > 1
        self.jax_service = self.multi and _jax_preemption_service()
        self.signal: int | None = None  # the signal that asked us to stop (this process)
        self.stop_signal: int | None = None  # set when every process agreed to stop
        self.last_save = time.monotonic()
        self._old: dict[int, object] = {}

    # --- signals -----------------------------------------------------------------
    @contextlib.contextmanager
    def catching_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be installed by the main thread
            return
        sigs = [signal.SIGINT] if self.jax_service else [signal.SIGTERM, signal.SIGINT]
        for sig in sigs:
            self._old[sig] = signal.signal(sig, self._handle)
            early = getattr(self._old[sig], "received", None)  # the CLI's start-up recorder (jaxft.cli)
            if early is not None:
                self._handle(early, None)
        try:
            yield self
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)
            self._old.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        first = self.signal is None
        self.signal = signum
        if first:
            log.warning("received %s: finishing the current step, writing a checkpoint, then stopping "
                        "(Ctrl-C again to stop at once)", signal.Signals(signum).name)
        if self.jax_service and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service makes every process agree

    # --- decisions ---------------------------------------------------------------
    def stop_requested_before_start(self) -> bool:
        """A signal during set-up: nothing new to save, stop before the first step."""
        if self.multi:
            return False  # the processes agree at step granularity only
        self.stop_signal = self.signal
        return self.signal is not None

    def _agreed_stop(self, step: int) -> bool:
        if not self.multi:
            self.stop_signal = self.signal
        elif self.jax_service:
            if multihost_utils.reached_preemption_sync_point(step):
                self.stop_signal = self.signal or signal.SIGTERM
        else:
            flags = multihost_utils.process_allgather(np.array([self.signal or 0], np.int32))
            raised = [int(f) for f in np.asarray(flags).reshape(-1) if f]
            self.stop_signal = raised[0] if raised else None
        return self.stop_signal is not None

    def _time_due(self, step: int) -> bool:
        if not self.every_s:
            return False
        if not self.multi:
            return time.monotonic() - self.last_save >= self.every_s
        if step % self.log_every:
            return False
        due = np.array(time.monotonic() - self.last_save >= self.every_s, np.int32)
        return bool(multihost_utils.broadcast_one_to_all(due))

    def after_step(self, step: int, end: int) -> tuple[bool, bool]:
        """(save now, stop after this step)."""
        stop = self._agreed_stop(step)
        save = stop or step == end or (self.every > 0 and step % self.every == 0) or self._time_due(step)
        if save:
            self.last_save = time.monotonic()
        return save, stop

    @property
    def exit_status(self) -> int:
        if self.stop_signal is None:
            return 0
        return INTERRUPTED_EXIT if self.stop_signal == signal.SIGINT else PREEMPTED_EXIT
