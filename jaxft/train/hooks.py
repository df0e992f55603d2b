"""Hooks: what the step loop does besides stepping, at fixed points.

    on_start(run, state)                      before the first step of this process
    after_step(run, step, state, metrics)     after each step; may return a new state
    on_end(run, state, end)                   after the last step of this process (`end`)
    close(run)                                always, in reverse order, even after an error

The standard hooks run in this order: the PEFT method's per-step hook and
export, metrics (logged one step late so the host never stalls the device),
dev loss, any extra hooks (evaluation during training, tests), checkpoints.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax

from jaxft.config.schema import to_dict
from jaxft.models.flops import train_flops_per_token
from jaxft.train.metric_sinks import Progress, device_peak_flops

log = logging.getLogger(__name__)


class Hook:
    def on_start(self, run, state) -> None:
        pass

    def after_step(self, run, step: int, state, metrics: dict) -> Any:
        return None

    def on_end(self, run, state, end: int) -> None:
        pass

    def close(self, run) -> None:
        pass


class PeftHook(Hook):
    """The PEFT method's per-step hook (LT-SFT's phase switch) and, at the end of
    the whole run, its export (adapter / sparse diff)."""

    def on_start(self, run, state):
        self.ctx = run.step_context()

    def after_step(self, run, step, state, metrics):
        return run.method.on_step(step, state, self.ctx)

    def on_end(self, run, state, end):
        if end == run.cfg.train.steps:
            out = run.method.export(state, self.ctx)
            if out is not None:
                log.info("wrote %s", out)


class MetricsHook(Hook):
    """Train metrics (loss, lr, |g|, tokens/s, MFU) to the sinks, one step late:
    step k's metrics are fetched after step k+1 was dispatched."""

    def __init__(self):
        self.losses: dict[int, float] = {}
        self.pending: tuple[int, dict] | None = None

    def on_start(self, run, state):
        cfg = run.cfg
        self.flops_per_step = (train_flops_per_token(cfg.model, cfg.data.seq_len) * cfg.train.global_batch
                               * cfg.data.seq_len)
        self.peak = device_peak_flops() * jax.device_count()
        self.progress = Progress(run.start, cfg.train.steps, cfg.train.progress_bar)
        self.t_last, self.step_last = time.perf_counter(), run.start

    def after_step(self, run, step, state, metrics):
        if self.pending is not None:
            self._flush(run, *self.pending)
        self.pending = (step, metrics)

    def on_end(self, run, state, end):
        if self.pending is not None:
            self._flush(run, *self.pending)
            self.pending = None
        self.progress.close()

    def _flush(self, run, step: int, metrics: dict) -> None:
        tcfg = run.cfg.train
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.losses[step] = m["loss"]
        if step % tcfg.log_every == 0 or step == run.end:
            dt = time.perf_counter() - self.t_last
            steps_done = max(step - self.step_last, 1)
            m["seq_tokens_per_s"] = steps_done * tcfg.global_batch * run.cfg.data.seq_len / dt
            m["mfu"] = steps_done * self.flops_per_step / dt / self.peak
            self.t_last, self.step_last = time.perf_counter(), step
            run.writer.write(step, m)
            self.progress.update(step, f"loss {m['loss']:.4f} lr {m['lr']:.2e} |g| {m['grad_norm']:.3f}")


def local_rows(batch: dict) -> dict:
    """This process's contiguous block of rows of a global host batch."""
    n, p, i = next(iter(batch.values())).shape[0], jax.process_count(), jax.process_index()
    return {k: v[i * n // p:(i + 1) * n // p] for k, v in batch.items()}


def dev_losses(run, state) -> dict[str, float]:
    out = {}
    for name, batches in run.dev.items():
        sums = [run.eval_step(state, run.to_global(local_rows(b))) for b in batches]
        loss = sum(float(s["loss_sum"]) for s in sums)
        weight = sum(float(s["weight_sum"]) for s in sums)
        out[name] = loss / max(weight, 1.0)
    return out


class DevLossHook(Hook):
    """Per-direction dev loss before training, every `train.dev_every` steps, and at the end."""

    def __init__(self):
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}

    def on_start(self, run, state):
        self.before = dict(run.meta.get("dev_before", {}))
        if run.start == 0 and run.dev:
            self.before = dev_losses(run, state)
            run.meta["dev_before"] = self.before
            run.writer.write(0, {"dev_loss": self.before}, kind="dev")

    def after_step(self, run, step, state, metrics):
        every = run.cfg.train.dev_every
        if every and step % every == 0 and step != run.cfg.train.steps and run.dev:
            run.writer.write(step, {"dev_loss": dev_losses(run, state)}, kind="dev")

    def on_end(self, run, state, end):
        if end == run.cfg.train.steps and run.dev:
            self.after = dev_losses(run, state)
            run.writer.write(end, {"dev_loss": self.after}, kind="dev")


class CheckpointHook(Hook):
    """Every `checkpoint.every` steps and at the last step of this process."""

    def after_step(self, run, step, state, metrics):
        if step % run.cfg.checkpoint.every == 0 or step == run.end:
            run.ckpt.save(step, run.checkpoint_items(state), run.pipeline.get_state(), to_dict(run.cfg), run.meta)

    def close(self, run):
        run.ckpt.close()
        run.writer.close()
