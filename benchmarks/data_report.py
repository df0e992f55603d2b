"""The tables of `benchmarks/data_pipeline.py` (from its results.json), and the
straight-line fit it extrapolates the old path's memory with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------ report


def _fit(points: list[tuple[float, float]], x: float) -> float:
    """Least-squares line through ``points``, at ``x``."""
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    a, b = np.polyfit(xs, ys, 1) if len(points) > 1 else (ys[0] / xs[0], 0.0)
    return float(a * x + b)


def report(results_path: Path, machine: str) -> str:
    res = json.loads(results_path.read_text())
    # every run, repeats included (timings on a shared 2-core machine vary by tens of %)
    rows = sorted(res, key=lambda r: (r["kind"], -r.get("gb", 0), r.get("workers") or 0, r["date"]))
    out = []
    date = lambda r: r["date"].split()[0]  # noqa: E731
    loads = lambda r: f"{r['load_before'].split()[0]}/{r['load_after'].split()[0]}"  # noqa: E731
    idx = [r for r in rows if r["kind"] == "index"]
    if idx:
        out += ["One-time line-index build (fresh `$JAXFT_CACHE`, every file of the corpus):", "",
                "| date | machine | corpus | lines | examples | skipped (bad lines) | build s | MB/s | index MiB | "
                "peak RSS MiB | load 1-min before/after |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|---|"]
        for r in idx:
            x = r["result"]
            if "error" in x:
                out.append(f"| {date(r)} | {machine} | {r['gb']:.2f} GB, {r['files']} files | {x['error']} |")
                continue
            sk = ", ".join(f"{k} {v}" for k, v in sorted(x["skipped"].items()))
            out.append(f"| {date(r)} | {machine} | {r['gb']:.2f} GB, {r['files']} files | {x['lines']:,} | "
                       f"{x['examples']:,} | {sk} | {x['seconds']:.0f} | {r['gb'] * 1e3 / x['seconds']:.1f} | "
                       f"{x['index_bytes'] / 2**20:.0f} | {x['maxrss_mib']:.0f} | {loads(r)} |")
        out.append("")
    pipe = [r for r in rows if r["kind"] in ("new", "old")]
    if pipe:
        out += ["Pipeline build + first batch (index cached), then batches of "
                "global_batch x seq_len, packed (non-pad tokens):", "",
                "| date | machine | path | corpus | workers | open sources s | build s | first batch s | examples/s | tokens/s | "
                "peak RSS MiB (main / largest worker) | RssAnon / RssFile MiB at end | load before/after |",
                "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
        for r in sorted(pipe, key=lambda r: (r["kind"] == "old", -r["gb"], r.get("overlong") or "",
                                             r.get("workers") or 0, r["date"])):
            x = r["result"]
            what = "new (on disk)" if r["kind"] == "new" else "old (in memory)"
            what += ", overlong truncate" if r.get("overlong") == "truncate" else ""
            head = f"| {date(r)} | {machine} | {what} | {r['gb']:.2f} GB, {r['files']} files |"
            if "error" in x:
                out.append(f"{head} - | - | {x['error']} | | | | | | {loads(r)} |")
                continue
            kids = f" / {x['worker_hwm_mib']:.0f}" if r.get("workers") else ""
            opened = f"{x['open_sources_s']:.1f}" if "open_sources_s" in x else "-"
            out.append(f"{head} {r.get('workers', '-') if r['kind'] == 'new' else '-'} | {opened} | "
                       f"{x['build_s']:.1f} | {x['first_batch_s']:.1f} | {x['examples_per_s']:.0f} | {x['tokens_per_s']:.0f} | "
                       f"{x['maxrss_mib']:.0f}{kids} | {x['RssAnon_mib']:.0f} / {x['RssFile_mib']:.0f} | {loads(r)} |")
        old = [(r["gb"], r["result"]["maxrss_mib"]) for r in pipe if r["kind"] == "old" and "error" not in r["result"]]
        big = max((r["gb"] for r in rows if r["kind"] in ("new", "index")), default=None)
        if old and big and big > 1.05 * max(g for g, _ in old):
            out.append(f"| | | old (in memory) | {big:.2f} GB | - | - | not run (extrapolated "
                       f"{_fit(old, big) / 1024:.1f} GiB peak RSS, linear fit over {len(old)} sizes) | | | | | | |")
        out.append("")
    rs = [r for r in rows if r["kind"] == "resume"]
    if rs:
        out += ["Resume far into the stream (fresh process, index cached): `set_state` with every slot "
                "at its example ~10M/global_batch, then the first batch:", "",
                "| date | machine | corpus | workers | position | build s | set_state + first batch s | "
                "accepted | same batch twice | peak RSS MiB | load before/after |",
                "|---|---|---|---:|---:|---:|---:|---|---|---:|---|"]
        for r in rs:
            x = r["result"]
            if "error" in x:
                out.append(f"| {date(r)} | {machine} | {r['gb']:.2f} GB | {r['workers']} | {x['error']} |")
                continue
            out.append(f"| {date(r)} | {machine} | {r['gb']:.2f} GB | {r['workers']} | {x['resume_at']:,} | "
                       f"{x['build_s']:.1f} | {x['resume_s']:.1f} | {x['accepted']} | {x['deterministic']} | "
                       f"{x['maxrss_mib']:.0f} | {loads(r)} |")
        out.append("")
    tr = [r for r in rows if r["kind"] == "train"]
    if tr:
        out += ["`jaxft train` of the demo-size decoder (3 x d128 LLaMA, vocab 8000, batch 16 x 128, fp32), "
                "metrics.jsonl, steps 2.. (step 1 compiles):", "",
                "| date | machine | corpus | data.workers | steps | median step s | data_wait_s mean (max) | "
                "data wait % of step time | load before/after |", "|---|---|---|---:|---:|---:|---|---:|---|"]
        for r in tr:
            x = r["result"]
            if "error" in x:
                out.append(f"| {date(r)} | {machine} | {r['gb']:.2f} GB | {r['workers']} | {x['error']} |")
                continue
            out.append(f"| {date(r)} | {machine} | {r['gb']:.2f} GB, {r['files']} files | {r['workers']} | "
                       f"{x['steps']} | {x['step_s_median']:.3f} | {x['data_wait_s'] * 1e3:.1f} ms "
                       f"({x['data_wait_s_max'] * 1e3:.0f} ms) | {100 * x['data_wait_frac']:.2f} % | {loads(r)} |")
        out.append("")
    return "\n".join(out)
