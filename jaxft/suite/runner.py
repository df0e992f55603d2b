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
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from jaxft.config.schema import to_dict
from jaxft.outputs import atomic_write_text
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


def _die_with_parent() -> None:
    """In the child: SIGTERM it when the suite process dies (even by kill -9), so a run never
    outlives its suite (it checkpoints and exits 75; the next `suite run` resumes it)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the run may outlive a killed suite
        pass


@dataclasses.dataclass
class SuiteResult:
    state: dict[str, dict[str, Any]]
    exit_status: int = 0  # 0, or 75 / 130 when a run was preempted / interrupted


def run_suite(suite: Suite, *, only: str | None = None, python: list[str] | None = None,
              env: dict[str, str] | None = None) -> SuiteResult:
    """Run (or resume) every run of ``suite`` matching the glob ``only`` (by id), in order."""
    python = python or [sys.executable, "-m", "jaxft.cli"]
    state = read_state(suite)
    logs = suite.suite_dir / "logs"
    for plan in suite.runs:
        if only and not fnmatch.fnmatchcase(plan.id, only):
            continue
        prev = state.get(plan.id, {})
        if prev.get("status") == "done":
            changed = changed_since_done(plan)
            if changed:
                state[plan.id] = {**prev, "status": "failed", "error": f"the run finished with another config "
                                  f"({'; '.join(changed[:3])}); refused: give it a new name or remove {plan.run_dir}"}
                _write_state(suite, state)
                log.error("%s: %s", plan.id, state[plan.id]["error"])
            else:
                log.info("%s: done, skipped", plan.id)
            continue
        missing = [d for d in plan.depends if state.get(d, {}).get("status") != "done"]
        if missing:
            state[plan.id] = {"status": "blocked", "error": f"needs {', '.join(missing)} (not done)"}
            _write_state(suite, state)
            log.warning("%s: blocked: needs %s", plan.id, ", ".join(missing))
            continue
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{plan.id}.log"
        cmd = plan.command(" ".join(shlex.quote(p) for p in python))
        t0 = time.time()
        with open(log_path, "ab") as out:
            out.write(f"\n$ {shlex.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
            state[plan.id] = {"status": "running", "pid": proc.pid, "started": t0,
                              "wall_s": prev.get("wall_s", 0.0)}
            _write_state(suite, state)
            log.info("%s: running (log %s)", plan.id, log_path)
            rc = proc.wait()
        wall = prev.get("wall_s", 0.0) + time.time() - t0
        if rc == 0:
            state[plan.id] = {"status": "done", "wall_s": round(wall, 1)}
        elif rc in STOP_EXITS:
            state[plan.id] = {"status": "interrupted", "wall_s": round(wall, 1), "exit": rc}
        else:
            state[plan.id] = {"status": "failed", "wall_s": round(wall, 1), "exit": rc,
                              "error": _error_line(log_path)}
            log.error("%s: failed (exit %d): %s", plan.id, rc, state[plan.id]["error"])
        _write_state(suite, state)
        if rc in STOP_EXITS:
            return SuiteResult(state, rc)
    return SuiteResult(state)


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
    wall time."""
    state = read_state(suite)
    rows = []
    for plan in suite.runs:
        st = dict(state.get(plan.id, {}))
        status = st.get("status", "pending")
        if status == "running" and not _alive(st.get("pid")):
            status = "interrupted"
        step, loss, dev = 0, None, None
        metrics = plan.run_dir / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("kind") == "train":
                    step, loss = row.get("step", step), row.get("loss", loss)
                elif row.get("kind") == "dev" and isinstance(row.get("dev_loss"), dict):
                    values = [v for v in row["dev_loss"].values() if isinstance(v, (int, float))]
                    dev = sum(values) / len(values) if values else dev
        total = plan.config.train.steps if plan.config is not None else None
        rows.append({"run": plan.id, "state": status, "step": step, "steps": total, "loss": loss, "dev_loss": dev,
                     "wall_s": st.get("wall_s"), "error": st.get("error")})
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    head = "| run | state | step | last loss | dev loss | wall s |\n|---|---|---:|---:|---:|---:|"
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [f"| {r['run']} | {r['state']}{': ' + r['error'] if r['error'] and r['state'] != 'done' else ''} | "
             f"{r['step']}/{fmt(r['steps'], 'd')} | {fmt(r['loss'], '.4f')} | {fmt(r['dev_loss'], '.4f')} | "
             f"{fmt(r['wall_s'], '.0f')} |" for r in rows]
    return "\n".join([head, *lines])


def plan_table(suite: Suite) -> str:
    """The expanded runs (``--dry-run``): id, depends, overrides."""
    lines = ["| run | needs | overrides |", "|---|---|---|"]
    for p in suite.runs:
        lines.append(f"| {p.id} | {', '.join(p.depends) or '-'} | {' '.join(p.overrides) or '-'} |")
    return "\n".join(lines)


def emit_commands(suite: Suite) -> str:
    """One ``jaxft train`` command per run, in dependency order (a TPU VM queue reads them)."""
    return "\n".join(shlex.join(p.command()) for p in suite.runs)
