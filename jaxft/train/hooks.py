"""Hooks: what the step loop does besides stepping, at fixed points.

    on_start(run, state)                      before the first step of this process
    after_step(run, step, state, metrics)     after each step; may return a new state
    on_end(run, state, end)                   after the last step of this process (`end`)
    close(run)                                always, in reverse order, even after an error

The standard hooks run in this order: the PEFT method's per-step hook and
export, metrics (logged one step late so the host never stalls the device),
the divergence guard (reads the metrics just fetched), dev loss, any extra
hooks (evaluation during training, tests), checkpoints.  Before the hooks of a
step run, the loop sets `run.save_now` (step / time cadence, preemption, the
last step): the metrics hook then writes that step's line before the
checkpoint, so a resumed run never lacks a line.
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.config.schema import to_dict
from jaxft.models.flops import train_flops_per_example
from jaxft.models.registry import is_encoder_decoder
from jaxft.train.metric_sinks import Progress, device_peak_flops
from jaxft.train.step import CompileThenMeet

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
    step k's metrics are fetched after step k+1 was dispatched.  Throughput and MFU
    are over the steps since the previous line; their definitions are in
    `jaxft.models.flops`."""

    def __init__(self):
        self.losses: dict[int, float] = {}
        self.pending: tuple[int, dict] | None = None
        self.window = {"tokens": 0.0, "nonpad_tokens": 0.0}  # summed since the previous line

    def on_start(self, run, state):
        cfg = run.cfg
        self.flops_per_step = train_flops_per_step(cfg, state, getattr(run.train_step, "teacher", None))
        self.peak = device_peak_flops() * jax.device_count()
        self.progress = Progress(run.start, cfg.train.steps, cfg.train.progress_bar)
        self.t_last, self.step_last = time.perf_counter(), run.start

    def after_step(self, run, step, state, metrics):
        run.fetched = []
        if self.pending is not None:
            self._flush(run, *self.pending)
        self.pending = (step, metrics)
        if run.save_now:  # the line of a checkpointed step is written before its checkpoint
            self._flush(run, *self.pending, force=True)
            self.pending = None

    def on_end(self, run, state, end):
        run.fetched = []
        if self.pending is not None:
            self._flush(run, *self.pending)
            self.pending = None
        self.progress.close()

    def _flush(self, run, step: int, metrics: dict, force: bool = False) -> None:
        tcfg = run.cfg.train
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.losses[step] = m["loss"]
        run.fetched.append((step, m))
        for key in self.window:
            self.window[key] += m.get(key, 0.0)
        if step % tcfg.log_every == 0 or step == run.end or m.get("skipped") or force:
            dt = time.perf_counter() - self.t_last
            steps_done = max(step - self.step_last, 1)
            m["seq_tokens_per_s"] = steps_done * tcfg.global_batch * run.cfg.data.seq_len / dt
            m["tokens_per_s"] = self.window["tokens"] / dt
            m["nonpad_tokens_per_s"] = self.window["nonpad_tokens"] / dt
            self.window = dict.fromkeys(self.window, 0.0)
            m["mfu"] = steps_done * self.flops_per_step / dt / self.peak
            m.update(_data_wait(run, step))
            m.update(_data_skips(run.pipeline))
            self.t_last, self.step_last = time.perf_counter(), step
            run.writer.write(step, m)
            self.progress.update(step, f"loss {m['loss']:.4f} lr {m['lr']:.2e} |g| {m['grad_norm']:.3f}")


def train_flops_per_step(cfg, state, teacher=None) -> float:
    """Model FLOPs of one step at the padded batch shapes, from the state's trainable
    (``params``) / frozen (``rest``) split; full finetuning's closed form when the
    tree holds a parameter path `jaxft.models.flops` does not know.  A distillation
    ``teacher`` (`jaxft.runs.teacher.Teacher`) adds its forward pass (all frozen)."""
    tgt = cfg.data.seq_len
    src = (cfg.data.encoder_seq_len or tgt) if is_encoder_decoder(cfg.model) else None
    try:
        per_example = train_flops_per_example(cfg.model, tgt, src, trainable=state.params, frozen=state.rest)
    except ValueError as e:
        log.warning("MFU: %s; counting full finetuning", e)
        per_example = train_flops_per_example(cfg.model, tgt, src)
    if teacher is not None:
        try:
            per_example += train_flops_per_example(teacher.model, tgt, src, trainable=nnx.State({}),
                                                   frozen=teacher.state)
        except ValueError as e:
            log.warning("MFU: %s; counting the teacher's forward pass as a third of full finetuning", e)
            per_example += train_flops_per_example(teacher.model, tgt, src) / 3
    return per_example * cfg.train.global_batch


def _data_wait(run, step: int) -> dict[str, float]:
    """Over the steps since the last line up to ``step``: host time blocked on the next
    batch, per step, and its share of those steps' wall time (from the start of the first
    to the start of the step after ``step``, or now)."""
    window = [s for s in sorted(run.data_wait) if s <= step]
    if not window:
        return {}
    starts, waits = zip(*(run.data_wait.pop(s) for s in window))
    end = run.data_wait[step + 1][0] if step + 1 in run.data_wait else time.perf_counter()
    return {"data_wait_s": sum(waits) / len(waits), "data_wait_frac": sum(waits) / max(end - starts[0], 1e-9)}


def _data_skips(pipeline) -> dict[str, float]:
    """Examples skipped when drawn so far (this process): over-long ones and bad records of
    sources checked when read; only the non-zero counts."""
    counts = getattr(pipeline, "counts", None)
    if counts is None:
        return {}
    per_dir = counts()
    out = {"data_overlong_skipped": sum(c.get("overlong_skipped", 0) for c in per_dir),
           "data_bad_skipped": sum(sum(c.get("bad_skipped", {}).values()) for c in per_dir)}
    return {k: float(v) for k, v in out.items() if v}


class DivergedError(ValueError):
    """Training stopped on non-finite losses (`train.nonfinite`)."""


class GuardHook(Hook):
    """Non-finite steps and loss spikes.  The step itself drops the update of a
    step whose loss or gradients are not finite (`skipped` = 1 in its metrics),
    so the state, and every checkpoint, keeps finite weights; this hook stops the
    run after `train.max_nonfinite` such steps in a row (`train.nonfinite: skip`)
    or the first one (`stop`), and warns when a loss exceeds `train.spike_factor`
    x the median of the last `train.spike_window` losses."""

    def on_start(self, run, state):
        tcfg = run.cfg.train
        self.limit = 1 if tcfg.nonfinite == "stop" else tcfg.max_nonfinite
        self.in_a_row = 0
        self.window: collections.deque = collections.deque(maxlen=tcfg.spike_window)

    def after_step(self, run, step, state, metrics):
        for fetched_step, m in run.fetched:
            self._check(run, fetched_step, m)
        run.unhealthy = self.in_a_row > 0

    def on_end(self, run, state, end):
        self.after_step(run, end, state, None)

    def _check(self, run, step: int, m: dict) -> None:
        tcfg = run.cfg.train
        if m.get("skipped"):
            self.in_a_row += 1
            run.meta["skipped_steps"] = run.meta.get("skipped_steps", 0) + 1
            log.warning("step %d: loss %s or gradients not finite; the update was dropped (%d in a row)",
                        step, m["loss"], self.in_a_row)
            if self.in_a_row >= self.limit:
                raise DivergedError(
                    f"step {step}: training diverged ({self.in_a_row} non-finite step(s) in a row, "
                    f"train.nonfinite={tcfg.nonfinite}, train.max_nonfinite={tcfg.max_nonfinite}); "
                    f"stopped without saving; the newest checkpoint in {run.dirs.checkpoints} holds finite weights")
            return
        self.in_a_row = 0
        loss = m["loss"]
        if tcfg.spike_factor and len(self.window) >= min(10, self.window.maxlen):
            median = statistics.median(self.window)
            if median > 0 and loss > tcfg.spike_factor * median:
                run.meta["loss_spikes"] = run.meta.get("loss_spikes", 0) + 1
                log.warning("step %d: loss spike: %.4f > %g x the running median %.4f", step, loss,
                            tcfg.spike_factor, median)
        if math.isfinite(loss):
            self.window.append(loss)


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


def _all_finite_fn(params) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


_all_finite = CompileThenMeet(jax.jit(_all_finite_fn), "all_finite")  # a collective over every process


class CheckpointHook(Hook):
    """When the loop says so (`run.save_now`: every `checkpoint.every` steps or
    `checkpoint.every_minutes`, on preemption, and at the last step of this
    process).  Nothing is saved while the guard sees non-finite losses, and
    weights that are not finite are never saved, so rotation can never delete
    the last checkpoint with healthy weights."""

    def after_step(self, run, step, state, metrics):
        if run.save_now:
            if run.unhealthy:
                log.warning("step %d: not checkpointing while the loss is not finite (the newest checkpoint "
                            "keeps the last healthy weights)", step)
                return
            if not bool(_all_finite(state.params)):
                raise DivergedError(f"step {step}: the weights are not finite; not saving them; the newest "
                                    f"checkpoint in {run.dirs.checkpoints} is kept")
            run.writer.sync()  # a remote run dir: the metrics up to this step are stored before it
            run.ckpt.save(step, run.checkpoint_items(state), run.pipeline.get_state(), to_dict(run.cfg), run.meta)

    def close(self, run):
        run.ckpt.close()
        run.writer.close()
