"""Compile cost of the train step, layers unrolled vs `model.scan_layers`, against depth.

Each cell is its own process (its peak RSS is the compile's): a LLaMA-shaped model of
`--d-model` width at each depth in `--depths`, the real train step (`jaxft.train.aot`, AdamW,
fsdp over the local devices) lowered and compiled for the local devices; then a few steps are
timed, so the scan's run-time cost is measured next to its compile-time saving.
With `--topology v5e-8` (needs libtpu) the step is compiled ahead of time for that TPU slice's
compile-only devices instead, and nothing is run (step s is blank).

    python benchmarks/scan_compile.py [--depths 8,32 --d-model 256 --batch 8 --seq 256] [--topology v5e-8]

Prints one Markdown row per cell for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """\
run_dir: run
model: {{preset: tiny-llama, vocab_size: 8192, d_model: {d}, n_layers: {n}, n_heads: 4, n_kv_heads: 2,
        mlp_dim: {mlp}, max_seq_len: {seq}, scan_layers: {scan}}}
data: {{seq_len: {seq}}}
train: {{global_batch: {batch}, steps: 10}}
mesh: {{data: 1, fsdp: -1, tensor: 1}}
"""


def cell(args) -> dict:
    """In the child: compile and time one configuration."""
    import jax
    import numpy as np

    from jaxft.config.loader import load_config
    from jaxft.sharding import batch_sharding
    from jaxft.train.aot import lower_step_parts
    from jaxft.train.step import abstract_batch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(CONFIG.format(d=args.d_model, n=args.depth, mlp=3 * args.d_model, seq=args.seq,
                                      batch=args.batch, scan=str(args.scan).lower()))
        cfg = load_config(path)
    devices = jax.devices()
    if args.topology:
        from jaxft.train.chips import abstract_devices, parse_topology
        devices = abstract_devices(parse_topology(args.topology))
    t0 = time.perf_counter()
    parts = lower_step_parts(cfg, devices)
    t1 = time.perf_counter()
    compiled = parts.lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    if args.topology:
        return {"lower_s": t1 - t0, "compile_s": t2 - t1, "step_s": None,
                "temp_mib": mem.temp_size_in_bytes / 2**20,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    batch = abstract_batch(cfg.train.global_batch, cfg.data.seq_len, batch_sharding(parts.mesh))
    state, batch = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding),
                                (parts.state, batch))  # zeros: the same work as real values
    times, run_values = [], parts.run_inputs.put(parts.mesh)  # the run's values (`train.run_inputs`)
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        state, metrics = compiled(state, batch, run_values)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "step_s": sorted(times[1:])[len(times[1:]) // 2],
            "temp_mib": mem.temp_size_in_bytes / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="8,32")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--topology", default="", help="compile for this TPU slice (libtpu) instead of running")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--scan", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(cell(args)))
        return 0
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    if args.topology:
        env.setdefault("TPU_SKIP_MDS_QUERY", "1")
    where = f"{args.topology} (AOT)" if args.topology else f"{platform.machine()} {os.cpu_count()} cpu"
    print("| date | machine | depth | layers | lower s | compile s | step s | compiled temp MiB | peak RSS MiB |"
          " compile vs unrolled |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for depth in [int(x) for x in args.depths.split(",")]:
        unrolled = None
        for scan in (False, True):
            cmd = [sys.executable, __file__, "--child", "--depth", str(depth), "--d-model", str(args.d_model),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
            cmd += ["--topology", args.topology] if args.topology else []
            p = subprocess.run(cmd + (["--scan"] if scan else []), capture_output=True, text=True, env=env,
                               cwd=ROOT, check=True)
            r = json.loads(p.stdout.strip().splitlines()[-1])
            unrolled = unrolled or r
            print(f"| {time.strftime('%Y-%m-%d')} | {where} | {depth} | "
                  f"{'scan' if scan else 'unrolled'} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
                  f"{'' if r['step_s'] is None else format(r['step_s'], '.3f')} | "
                  f"{r['temp_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
                  f"{(r['lower_s'] + r['compile_s']) / (unrolled['lower_s'] + unrolled['compile_s']):.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
