"""kill -9 stress test: a tiny `jaxft train` run killed at random moments, then
resumed, must give the losses of an uninterrupted run (bitwise, CPU) and exactly
one metrics line per step, and metrics.jsonl must stay strict JSON.

For each trial: a fresh run dir; `jaxft train` is started and SIGKILLed after a
uniformly random delay in [0, T] (T = the measured wall time of one whole
uninterrupted run, start-up included, so kills land in start-up, tokenizer
training, compilation, steps, asynchronous checkpoint writes and the final dev
loss alike); then `jaxft train` runs again to completion (and, with
--second-kill, is first killed once more at another random moment).

    python benchmarks/kill_stress.py [--trials 20 --steps 12 --seed 0 --second-kill --signal kill|term]
                                     [--workers N]

With `--workers N` the runs use N data worker processes (`data.workers`), and each
trial also checks that no worker outlives its killed trainer (a process still carrying
the trial's environment marker 10 s after the trial counts as a failure).

With `--signal term` the signal is SIGTERM: every interrupted run must exit 75
(checkpoint written) and the seconds from signal to exit are reported (median /
max).  Prints one line per trial and a Markdown row for benchmarks/RESULTS.md.  Uses
async checkpointing with checkpoint.every=1 (the most kill windows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from trainutil import write_run_config  # noqa: E402


def jaxft_train(cfg: Path, env: dict, kill_after: float | None = None, sig: int = signal.SIGKILL
                ) -> tuple[int, float, float | None]:
    """(exit status, wall seconds, seconds from the signal to the exit or None)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jaxft.cli", "train", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    to_exit = None
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            t_sig = time.perf_counter()
            proc.send_signal(sig)
            proc.wait()
            to_exit = time.perf_counter() - t_sig
    _, err = proc.communicate()
    if (kill_after is None or sig != signal.SIGKILL) and proc.returncode not in (0, 75):
        raise RuntimeError(f"jaxft train failed ({proc.returncode}): {err[-2000:]}")
    return proc.returncode, time.perf_counter() - t0, to_exit


def survivors(marker: str, wait_s: float = 10.0) -> list[int]:
    """Pids of processes (data workers) still carrying ``JAXFT_STRESS_TRIAL=marker`` after ``wait_s``."""
    needle = f"JAXFT_STRESS_TRIAL={marker}".encode() + b"\0"
    deadline = time.time() + wait_s
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and needle in (proc / "environ").read_bytes() + b"\0":
                    found.append(int(proc.name))
            except OSError:
                continue
        if not found or time.time() > deadline:
            return found
        time.sleep(0.5)


def strict_rows(path: Path) -> list[dict]:
    def refuse(c):
        raise ValueError(f"non-strict JSON constant {c}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text(encoding="utf-8").splitlines()]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in strict_rows(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--second-kill", action="store_true", help="kill the resumed run once more before finishing")
    ap.add_argument("--workers", type=int, default=0, help="data.workers of the runs")
    ap.add_argument("--signal", choices=("kill", "term"), default="kill",
                    help="term: SIGTERM instead (exit 75 expected; reports the time from signal to exit)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    extra = {"checkpoint.every": 1, "checkpoint.async_save": True, "checkpoint.keep": 2,
             "data.workers": args.workers}
    tmp = Path(tempfile.mkdtemp(prefix="kill_stress_"))
    ref_cfg = write_run_config(tmp, steps=args.steps, name="reference", extra=extra)
    sig = signal.SIGKILL if args.signal == "kill" else signal.SIGTERM
    _, full, _ = jaxft_train(ref_cfg, env)
    ref = train_losses(tmp / "reference")
    assert [s for s, _ in ref] == list(range(1, args.steps + 1)), ref
    print(f"reference: {args.steps} steps in {full:.1f} s (start-up included)", flush=True)
    failures, killed_mid, to_exit = 0, 0, []
    for trial in range(args.trials):
        cfg = write_run_config(tmp, steps=args.steps, name=f"trial{trial}", extra=extra)
        env["JAXFT_STRESS_TRIAL"] = str(tmp / f"trial{trial}")
        moments = [rng.uniform(0, full)] + ([rng.uniform(0, full)] if args.second_kill else [])
        ckpt_dir = tmp / f"trial{trial}" / "checkpoints"
        runs, at_signal = [], []
        for m in moments:
            runs.append(jaxft_train(cfg, env, kill_after=m, sig=sig))
            at_signal.append(max((int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()), default=0)
                             if ckpt_dir.is_dir() else None)
        rcs = [r[0] for r in runs]
        to_exit += [r[2] for r in runs if r[2] is not None and r[0] != 0]
        killed_mid += sum(rc in (-signal.SIGKILL, 75) for rc in rcs)
        if sig == signal.SIGTERM and any(rc not in (0, 75) for rc in rcs):
            failures += 1
            print(f"trial {trial:2d}: FAIL exit {rcs} after SIGTERM")
            continue
        jaxft_train(cfg, env)

        try:
            got = train_losses(tmp / f"trial{trial}")
            ok = got == ref
            why = "" if ok else (f"steps {[s for s, _ in got]}" if [s for s, _ in got] != [s for s, _ in ref]
                                 else "losses differ")
        except ValueError as e:
            ok, why = False, str(e)
        orphans = survivors(env["JAXFT_STRESS_TRIAL"])
        if orphans:
            ok, why = False, f"{why} worker processes outlived their trainer: {orphans}".strip()
        failures += not ok
        print(f"trial {trial:2d}: kill at {', '.join(f'{m:5.1f}' for m in moments)} s (exit {rcs}) -> "
              f"{'OK' if ok else 'FAIL ' + why}; newest checkpoint after the signal: {at_signal}", flush=True)
    print(f"\n{args.trials - failures}/{args.trials} trials identical to the uninterrupted run "
          f"({killed_mid} signals landed before the run ended)")
    timing = (f"{statistics.median(to_exit):.2f} / {max(to_exit):.2f}" if to_exit else "-")
    print(f"| {time.strftime('%Y-%m-%d')} | {platform.machine()} cpu, {os.cpu_count()} cores | SIG{args.signal.upper()}, "
          f"{args.trials} trials, {args.steps} steps, at [0, {full:.0f}] s{' x2' if args.second_kill else ''} | "
          f"{args.trials - failures}/{args.trials} | {killed_mid} | {timing} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
