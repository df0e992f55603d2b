"""A study's runs against the compilation cache: do the later runs compile their programs again?

Writes the tests' tiny 3-language corpus and one `jaxft train` config per run (a deeper LLaMA so
that compiling costs something: `--layers`, d_model 256, dropout 0.1), the runs differing only in
the numbers a sweep changes (learning rate, seed, warmup, train.steps, weight decay, label
smoothing, z-loss), all pointed at one fresh `compile_cache` folder. Runs them one after the
other as separate processes and reports each one's wall time and which jitted programs the cache
holds after it (jax caches programs that took >= 1 s to compile; `--min-compile-s` lowers that).

    python benchmarks/study_compile.py [--layers 16 --steps 2 --runs 3]

Prints one line per run and Markdown rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from trainutil import write_run_config  # noqa: E402

# run i takes SWEEP[key][i]: every number of the study differs from one run to the next
SWEEP = {"optimizer.lr": (3e-3, 1e-3, 3e-4, 1e-4), "train.seed": (0, 1, 2, 3),
         "optimizer.warmup_steps": (1, 2, 3, 4), "train.steps": None,  # --steps + i
         "optimizer.weight_decay": (0.01, 0.05, 0.1, 0.2), "train.label_smoothing": (0.1, 0.2, 0.05, 0.15),
         "train.z_loss": (1e-4, 1e-3, 1e-2, 1e-5)}


def run_config(tmp: Path, i: int, args) -> Path:
    values = {k: (args.steps + i if v is None else v[i]) for k, v in SWEEP.items()}
    path = write_run_config(tmp, steps=args.steps, name=f"run{i}", extra={
        "model.n_layers": args.layers, "model.d_model": 256, "model.mlp_dim": 1024, "model.dropout": 0.1,
        "checkpoint.every": 0, **values})
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "compile_cache": str(tmp / "xla")}, sort_keys=False))
    return path


def programs(cache: Path) -> dict[str, int]:
    """Cache entries per jitted program name (`jit_train_step-<hash>` -> jit_train_step)."""
    return dict(collections.Counter(p.name.split("-")[0] for p in cache.iterdir())) if cache.exists() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, choices=range(1, 5))
    ap.add_argument("--min-compile-s", type=float, default=1.0, help="jax's threshold for caching a program")
    args = ap.parse_args()
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(args.min_compile_s)}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for i in range(args.runs):
            cfg = run_config(tmp, i, args)
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "jaxft.cli", "train", str(cfg)], env=env, cwd=tmp,
                                 capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if out.returncode:
                sys.exit(f"run {i} failed:\n{out.stderr[-3000:]}")
            held = programs(tmp / "xla")
            shown = {k: v for k, v in held.items() if k in ("jit_train_step", "jit_init_train_state", "jit_eval_step")}
            print(f"run {i}: {wall:.1f} s wall; cache holds {shown}", flush=True)
            rows.append((i, wall, shown))
    machine = f"{platform.machine()} {os.cpu_count()} cpu"
    print("\n| date | machine | run | wall s | the cache holds |\n|---|---|---|---:|---|")
    for i, wall, shown in rows:
        held = ", ".join(f"{v} x {k}" for k, v in sorted(shown.items())) or "-"
        print(f"| {time.strftime('%Y-%m-%d')} | {machine} | {i + 1} | {wall:.1f} | {held} |")


if __name__ == "__main__":
    main()
