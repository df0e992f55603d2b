"""The pod-planning table of docs/pod_planning.md: `jaxft plan --json` for models x TPU slices x
PEFT methods, each cell in its own process (its compile time and peak host RSS are part of the
table: what planning itself costs on this machine).

    python benchmarks/plan_table.py --out benchmarks/plan_table.md \\
        [--models llama-3-8b,mt5-xxl] [--slices v5p-256,v4-128] [--methods full,lora,sparse] \\
        [--batch 256 --seq 1024] [--set model.remat=full] [--timeout 1800]

Cells are appended to a JSONL file as they finish (`--out` with .jsonl), so an interrupted table
resumes where it stopped; the Markdown table is rewritten from it after every cell.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["mt5-xxl", "nllb-200-3.3B", "gemma-7b", "llama-3-8b", "llama-3-70b"]
SLICES = ["v4-128", "v5e-256", "v5p-256", "v6e-256"]
METHODS = ["full", "lora", "sparse"]


def cell_config(model: str, method: str, batch: int, seq: int, tmp: Path) -> Path:
    encdec = model.startswith(("mt5", "umt5", "t5", "nllb", "mbart", "m2m"))
    data = f"data: {{seq_len: {seq}{f', encoder_seq_len: {seq}' if encdec else ''}}}"
    path = tmp / f"{model}-{method}.yaml"
    path.write_text(f"run_dir: plan\nmodel: {{preset: {model}}}\n{data}\n"
                    f"train: {{global_batch: {batch}, steps: 1000}}\nmesh: {{data: 1, fsdp: -1, tensor: 1}}\n"
                    f"peft: {{method: {'none' if method == 'full' else method}}}\n")
    return path


def run_cell(model: str, slice_: str, method: str, args, tmp: Path) -> dict:
    config = cell_config(model, method, args.batch, args.seq, tmp)
    cmd = [sys.executable, "-m", "jaxft.cli", "plan", str(config), "--topology", slice_, "--json", "--no-suggest"]
    for o in args.set:
        cmd += ["--set", o]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"model": model, "slice": slice_, "method": method, "error": f"timeout after {args.timeout} s"}
    wall = time.perf_counter() - t0
    row = {"model": model, "slice": slice_, "method": method, "wall_s": wall}
    try:
        row.update(json.loads(p.stdout))
    except json.JSONDecodeError:
        row["error"] = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:300]
    return row


def markdown(rows: list[dict], args) -> str:
    head = ["model", "slice", "method", "fits", "memory/chip GiB", "usable GiB", "est. step s", "tokens/s",
            "MFU", "plan compile s", "plan RSS GiB"]
    out = [f"Batch {args.batch} x {args.seq} tokens, mesh fsdp over all chips, overrides "
           f"{' '.join(args.set) or 'none'}. Estimates are roofline lower bounds (see jaxft/train/plan.py).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['slice']} | {r['method']} | error: {r['error']} |" + " |" * 7)
            continue
        e, mem = r.get("estimate") or {}, r["memory"]
        fits = {True: "yes", False: "**no**", None: "?"}[r["fits"]]
        out.append(" | ".join([
            f"| {r['model']}", r["slice"], r["method"], fits, f"{mem['total'] / 2**30:.1f}",
            f"{(r['capacity'] or 0) / 2**30:.1f}", f"{e['step_s']:.2f}" if e else "-",
            f"{e['tokens_per_s']:,.0f}" if e else "-", f"{100 * e['mfu']:.0f}%" if e else "-",
            f"{r['planning']['compile_s']:.0f}", f"{r['planning']['peak_host_rss'] / 2**30:.1f} |"]))
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "plan_table.md")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--slices", default=",".join(SLICES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--timeout", type=int, default=1800)
    args = ap.parse_args()
    cells = args.out.with_suffix(".jsonl")
    if args.out == cells:  # `--out table.jsonl`: the cells there, the Markdown beside them
        args.out = cells.with_suffix(".md")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in cells.read_text().splitlines()] if cells.exists() else []
    seen = {(r["model"], r["slice"], r["method"]) for r in done}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for slice_ in args.slices.split(","):
                for method in args.methods.split(","):
                    if (model, slice_, method) in seen:
                        continue
                    row = run_cell(model, slice_, method, args, Path(tmp))
                    done.append(row)
                    with cells.open("a") as f:
                        f.write(json.dumps(row, default=str) + "\n")
                    args.out.write_text(markdown(done, args))
                    print(markdown([row], args).splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
