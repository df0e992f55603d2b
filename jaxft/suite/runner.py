"""Running a suite: each run is its own ``jaxft train`` process, in dependency order.

State is kept in ``<suite_dir>/suite_state.json`` (written atomically): per run, ``running``
(with the pid), ``done``, ``failed`` (with the error line of its log), ``blocked`` (a run it
depends on is not done) or ``interrupted`` (exit 75 / 130).  Running a suite again skips done
runs (after checking their saved config still matches the suite: a changed run is refused,
as ``jaxft train`` refuses it), and every other run is started with ``jaxft train``, which
resumes it from its newest checkpoint.  A failed run does not stop the runs that do not
depend on it.  Each run's output is in ``<suite_dir>/logs/<run>.log``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from jaxft.config.schema import to_dict
from jaxft.outputs import atomic_write_text, read_jsonl
from jaxft.runs.resume import fix_schedule_length, incompatible_keys
from jaxft.suite.spec import RunPlan, Suite

log = logging.getLogger(__name__)

STATE_FILE = "suite_state.json"
STOP_EXITS = (75, 130)  # preempted / interrupted: the suite stops too, with the same status


def read_state(suite: Suite) -> dict[str, dict[str, Any]]:
    path = suite.suite_dir / STATE_FILE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable suite state ({e}); move it aside to start the suite's "
                         f"bookkeeping afresh (run dirs are kept and resumed)") from None
    return state if isinstance(state, dict) else {}


def _write_state(suite: Suite, state: dict[str, dict[str, Any]]) -> None:
    suite.suite_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(suite.suite_dir / STATE_FILE, json.dumps(state, indent=1, sort_keys=True) + "\n")


def changed_since_done(plan: RunPlan) -> list[str]:
    """Keys whose value in the suite differs from the finished run's saved ``config.yaml``."""
    saved_path = plan.run_dir / "config.yaml"
    if plan.config is None or not saved_path.is_file():
        return []
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    current = to_dict(fix_schedule_length(plan.config, saved))
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in incompatible_keys(saved, current)]


def _error_line(log_path: Path) -> str:
    try:
        lines = [line.strip() for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    ours = [line for line in lines if line.startswith("jaxft:")]
    return (ours or [line for line in lines if line] or ["(empty log)"])[-1]


def _prctl() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: a run may outlive a killed suite
        return None


def _child_setup(cpus: tuple[int, ...]):
    """What the child does before ``exec``: die with the suite (PR_SET_PDEATHSIG: SIGTERM when
    the suite process dies, even by kill -9, so a run never outlives its suite; it checkpoints
    and exits 75, the next `suite run` resumes it) and keep to its share of the cores.  Only
    plain calls after the fork: libc is loaded here, in the parent."""
    prctl = _prctl()

    def setup() -> None:
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


@dataclasses.dataclass
class SuiteResult:
    state: dict[str, dict[str, Any]]
    exit_status: int = 0  # 0, or 75 / 130 when a run was preempted / interrupted


def _platform(env: dict[str, str]) -> str:
    """The accelerator the runs will use, found without starting JAX here (a TPU is owned
    by one process: the suite must leave it to its runs)."""
    wanted = env.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if wanted:
        return "gpu" if wanted in ("cuda", "rocm") else wanted
    if Path("/dev/accel0").exists() or Path("/dev/vfio/0").exists():
        return "tpu"
    if env.get("CUDA_VISIBLE_DEVICES", "x") != "" and Path("/dev/nvidiactl").exists():
        return "gpu"
    return "cpu"


def _gpu_ids(env: dict[str, str]) -> list[str]:
    if env.get("CUDA_VISIBLE_DEVICES"):
        return [d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


_CPU_DEVICES = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one of ``--max-parallel`` runs goes: its environment and (on CPU) its cores."""

    env: dict[str, str]
    cpus: tuple[int, ...] = ()


def device_slots(n: int, env: dict[str, str]) -> list[Slot]:
    """``n`` slots with the devices split evenly between them: GPUs by ``CUDA_VISIBLE_DEVICES``;
    on CPU the (fake, ``--xla_force_host_platform_device_count``) devices and the cores.  A run's
    mesh must fit its share (its error says so when it does not)."""
    if n < 1:
        raise ValueError(f"--max-parallel: must be >= 1, got {n}")
    if n == 1:
        return [Slot(dict(env))]
    platform = _platform(env)
    if platform == "gpu":
        ids = _gpu_ids(env)
        if len(ids) < n:
            raise ValueError(f"--max-parallel {n}: only {len(ids)} GPU(s) visible ({', '.join(ids) or 'none'}); "
                             f"each run needs at least one")
        per = len(ids) // n
        return [Slot({**env, "CUDA_VISIBLE_DEVICES": ",".join(ids[i * per:(i + 1) * per])}) for i in range(n)]
    if platform != "cpu":
        raise ValueError(f"--max-parallel {n}: not on {platform} (a {platform} host's chips belong to one "
                         f"process); run the suite's runs one after another, or queue them with "
                         f"--emit-commands (tpu_scripts/suite-queue.sh)")
    flags = env.get("XLA_FLAGS", "")
    m = _CPU_DEVICES.search(flags)
    devices = int(m.group(1)) if m else 1
    per = max(1, devices // n)  # a process always has its own CPU device
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    slots = []
    for i in range(n):
        child = dict(env)
        if m:
            child["XLA_FLAGS"] = _CPU_DEVICES.sub(f"--xla_force_host_platform_device_count={per}", flags)
        share = tuple(cores[i * len(cores) // n:(i + 1) * len(cores) // n]) if len(cores) >= n else ()
        slots.append(Slot(child, share))
    return slots


@dataclasses.dataclass
class _Running:
    plan: RunPlan
    proc: subprocess.Popen
    slot: int
    t0: float
    prev: dict[str, Any]
    log_path: Path


def _ready(plan: RunPlan, state: dict[str, dict[str, Any]], coming: set[str]) -> bool | None:
    """True: every run it needs is done; None: some will still run in this call; False: blocked."""
    missing = [d for d in plan.depends if state.get(d, {}).get("status") != "done"]
    if not missing:
        return True
    return None if any(d in coming for d in missing) else False


def run_suite(suite: Suite, *, only: str | None = None, python: list[str] | None = None,
              env: dict[str, str] | None = None, max_parallel: int = 1, poll_s: float = 0.2) -> SuiteResult:
    """Run (or resume) every run of ``suite`` matching the glob ``only`` (by id), in order, at
    most ``max_parallel`` at once (each on its share of the devices, see ``device_slots``)."""
    python = python or [sys.executable, "-m", "jaxft.cli"]
    slots = device_slots(max_parallel, dict(os.environ if env is None else env))
    state = read_state(suite)
    logs = suite.suite_dir / "logs"
    todo = [p for p in suite.runs if not only or fnmatch.fnmatchcase(p.id, only)]
    running: list[_Running] = []
    stop = 0
    while todo or running:
        coming = {p.id for p in todo} | {r.plan.id for r in running}
        for plan in list(todo):
            if stop or len(running) >= len(slots):
                break
            prev = state.get(plan.id, {})
            if prev.get("status") == "done":
                todo.remove(plan)
                changed = changed_since_done(plan)
                if changed:
                    state[plan.id] = {**prev, "status": "failed", "error": f"the run finished with another config "
                                      f"({'; '.join(changed[:3])}); refused: give it a new name or remove {plan.run_dir}"}
                    _write_state(suite, state)
                    log.error("%s: %s", plan.id, state[plan.id]["error"])
                else:
                    log.info("%s: done, skipped", plan.id)
                continue
            ready = _ready(plan, state, coming - {plan.id})
            if ready is None:
                continue
            todo.remove(plan)
            if not ready:
                missing = [d for d in plan.depends if state.get(d, {}).get("status") != "done"]
                state[plan.id] = {"status": "blocked", "error": f"needs {', '.join(missing)} (not done)"}
                _write_state(suite, state)
                log.warning("%s: blocked: needs %s", plan.id, ", ".join(missing))
                continue
            slot = min(set(range(len(slots))) - {r.slot for r in running})
            logs.mkdir(parents=True, exist_ok=True)
            log_path = logs / f"{plan.id}.log"
            cmd = plan.command(" ".join(shlex.quote(p) for p in python))
            with open(log_path, "ab") as out:
                out.write(f"\n$ {shlex.join(cmd)}\n".encode())
                out.flush()
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=slots[slot].env,
                                        preexec_fn=_child_setup(slots[slot].cpus))
            running.append(_Running(plan, proc, slot, time.time(), prev, log_path))
            state[plan.id] = {"status": "running", "pid": proc.pid, "started": running[-1].t0,
                              "wall_s": prev.get("wall_s", 0.0)}
            _write_state(suite, state)
            log.info("%s: running (log %s)%s", plan.id, log_path, f", slot {slot}" if len(slots) > 1 else "")
        if stop and not running:
            break
        if not running:
            if todo and not stop:  # nothing runs and nothing can start: a bug in the order, not a hang
                raise RuntimeError(f"suite: no run can start ({', '.join(p.id for p in todo)})")
            continue
        done = [r for r in running if r.proc.poll() is not None]
        if not done:
            time.sleep(poll_s)
            continue
        for r in done:
            running.remove(r)
            rc = r.proc.returncode
            wall = round(r.prev.get("wall_s", 0.0) + time.time() - r.t0, 1)
            if rc == 0:
                state[r.plan.id] = {"status": "done", "wall_s": wall}
            elif rc in STOP_EXITS:
                state[r.plan.id] = {"status": "interrupted", "wall_s": wall, "exit": rc}
                stop = stop or rc  # no new runs; the others finish (or are stopped) on their own
            else:
                state[r.plan.id] = {"status": "failed", "wall_s": wall, "exit": rc, "error": _error_line(r.log_path)}
                log.error("%s: failed (exit %d): %s", r.plan.id, rc, state[r.plan.id]["error"])
            _write_state(suite, state)
    return SuiteResult(state, stop)


def _alive(pid: Any) -> bool:
    """A running (not zombie) process."""
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def status_rows(suite: Suite) -> list[dict[str, Any]]:
    """Per run: state, step of total, last train loss, last dev loss (mean over directions),
    best evaluation score (``eval.best_metric``, averaged over directions), wall time."""
    state = read_state(suite)
    rows = []
    for plan in suite.runs:
        st = dict(state.get(plan.id, {}))
        status = st.get("status", "pending")
        if status == "running" and not _alive(st.get("pid")):
            status = "interrupted"
        step, loss, dev, best = 0, None, None, None
        metric = plan.config.eval.best_metric if plan.config is not None else "chrf"
        for row in read_jsonl(plan.run_dir / "metrics.jsonl"):
            if row.get("kind") == "train":
                step, loss = row.get("step", step), row.get("loss", loss)
            elif row.get("kind") == "dev" and isinstance(row.get("dev_loss"), dict):
                values = [v for v in row["dev_loss"].values() if isinstance(v, (int, float))]
                dev = sum(values) / len(values) if values else dev
            elif row.get("kind") == "eval" and isinstance(row.get("average"), dict):
                score = row["average"].get(metric)
                if isinstance(score, (int, float)):
                    best = score if best is None else max(best, score)
        total = plan.config.train.steps if plan.config is not None else None
        rows.append({"run": plan.id, "state": status, "step": step, "steps": total, "loss": loss, "dev_loss": dev,
                     "best": f"{metric} {best:.2f}" if best is not None else None, "wall_s": st.get("wall_s"),
                     "error": st.get("error")})
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    head = "| run | state | step | last loss | dev loss | best | wall s |\n|---|---|---:|---:|---:|---:|---:|"
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [f"| {r['run']} | {r['state']}{': ' + r['error'] if r['error'] and r['state'] != 'done' else ''} | "
             f"{r['step']}/{fmt(r['steps'], 'd')} | {fmt(r['loss'], '.4f')} | {fmt(r['dev_loss'], '.4f')} | "
             f"{r['best'] or '-'} | {fmt(r['wall_s'], '.0f')} |" for r in rows]
    return "\n".join([head, *lines])


def selected(suite: Suite, only: str | None) -> list[RunPlan]:
    return [p for p in suite.runs if not only or fnmatch.fnmatchcase(p.id, only)]


def plan_table(suite: Suite, only: str | None = None) -> str:
    """The expanded runs (``--dry-run``): the overrides every run shares, then per run its id,
    the runs it needs and its own overrides."""
    plans = selected(suite, only)
    common = [o for o in plans[0].overrides if all(o in p.overrides for p in plans)] if len(plans) > 1 else []
    lines = [f"every run: {' '.join(common)}", ""] if common else []
    lines += ["| run | needs | overrides |", "|---|---|---|"]
    for p in plans:
        own = [o for o in p.overrides if o not in common]
        lines.append(f"| {p.id} | {', '.join(p.depends) or '-'} | {' '.join(own) or '-'} |")
    return "\n".join(lines)


def emit_commands(suite: Suite, only: str | None = None) -> str:
    """A shell script: per run, in dependency order, a ``# run <id> [needs <id> ...]`` line and
    its ``jaxft train`` command (tpu_scripts/suite-queue.sh reads it; a shell runs it as is)."""
    lines = []
    for p in selected(suite, only):
        lines += [f"# run {p.id}" + (f" needs {' '.join(p.depends)}" if p.depends else ""), shlex.join(p.command())]
    return "\n".join(lines)
