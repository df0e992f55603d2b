"""The host training loop: set up once, then step and call hooks.

All numerics live in `step.py`, everything built before the first step in
`setup.py`, and everything done besides stepping (metrics, dev loss, the PEFT
method's phase switch and export, checkpoints, evaluation) in hooks
(`hooks.py`).  The loop dispatches step k+1 before the metrics hook reads step
k's metrics, so the host never stalls the device on a metrics fetch.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

from jaxft.config.schema import Config
from jaxft.sharding import use_mesh
from jaxft.train.cadence import Cadence
from jaxft.train.hooks import CheckpointHook, DevLossHook, GuardHook, Hook, MetricsHook, PeftHook
from jaxft.train.setup import Run, setup


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int
    dev_before: dict[str, float]
    dev_after: dict[str, float]
    losses: dict[int, float]
    exit_status: int = 0  # 0, or cadence.PREEMPTED_EXIT / INTERRUPTED_EXIT after a signal


def train(cfg: Config, *, base_dir: Path, stop_after: int | None = None,
          hooks: Sequence[Hook] = (), restart: bool = False) -> TrainResult:
    """Train (or resume) the run in `cfg.run_dir`.  `stop_after` ends this process
    after that many steps, as a preemption would.  `hooks` run after the standard
    ones and before checkpointing (evaluation during training: `jaxft.eval.during_training`).
    `restart`: when every checkpoint of the run is unreadable, set them aside and
    start again from step 0 (otherwise that is an error).  SIGTERM / SIGINT stop
    the run after the current step with a checkpoint (`TrainResult.exit_status`)."""
    if cfg.eval.every and not any(getattr(h, "evaluates", False) for h in hooks):
        raise ValueError("eval.every: evaluation during training needs the evaluation hook; run `jaxft train` "
                         "or jaxft.eval.during_training.train_and_evaluate")
    cadence = Cadence(cfg)
    with cadence.catching_signals():
        run = setup(cfg, base_dir=base_dir, restart=restart)
        metrics, dev = MetricsHook(), DevLossHook()
        all_hooks = [PeftHook(), metrics, GuardHook(), dev, *hooks, CheckpointHook()]
        steps = cfg.train.steps
        run.end = steps if stop_after is None else min(steps, run.start + stop_after)
        if cadence.stop_requested_before_start():
            run.end = run.start
        try:
            with use_mesh(run.mesh):
                step_loop(run, all_hooks, cadence)
        finally:
            for hook in reversed(all_hooks):
                hook.close(run)
            run.pipeline.close()
    return TrainResult(run_dir=run.dirs.root, step=run.end, dev_before=dev.before, dev_after=dev.after,
                       losses=metrics.losses,
                       exit_status=0 if run.end == cfg.train.steps else cadence.exit_status)


def step_loop(run: Run, hooks: Sequence[Hook], cadence: Cadence):
    state, run.state = run.state, None  # the loop owns the state (each step donates it)
    for hook in hooks:
        hook.on_start(run, state)
    for step in range(run.start + 1, run.end + 1):
        t0 = time.perf_counter()
        rows = next(run.pipeline)
        run.data_wait[step] = (t0, time.perf_counter() - t0)  # (step start, host time blocked on its batch)
        batch = run.to_global(rows)
        state, metrics = run.train_step(state, batch)
        run.save_now, stop = cadence.after_step(step, run.end)
        if stop:
            run.end = step
        for hook in hooks:
            state = hook.after_step(run, step, state, metrics) or state
        if stop:
            break
    for hook in hooks:
        hook.on_end(run, state, run.end)
    return state


def dev_table(result: TrainResult) -> str:
    """Markdown table of per-direction dev loss before and after training."""
    rows = ["| direction | dev loss before | dev loss after | change |", "|---|---:|---:|---:|"]
    for name in sorted(result.dev_after or result.dev_before):
        b, a = result.dev_before.get(name, float("nan")), result.dev_after.get(name, float("nan"))
        rows.append(f"| {name} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    return "\n".join(rows)
