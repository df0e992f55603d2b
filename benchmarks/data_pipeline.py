"""Data pipeline at corpus scale: the on-disk pipeline (line index, workers) against the
old in-memory one, on a synthetic multi-direction corpus of several GB.

    # 1. a corpus of >= 5 GB (24 directions, 12 languages, 7 scripts, xP3-style JSONL
    #    and TSV, sizes skewed 100x, a sprinkling of bad lines) and an 8000-piece
    #    SentencePiece tokenizer trained on a sample of it
    python benchmarks/data_pipeline.py --make-corpus /tmp/jaxft-bench/corpus --gb 5

    # 2. the measurements, each in its own subprocess (peak RSS per measurement)
    python benchmarks/data_pipeline.py --corpus /tmp/jaxft-bench/corpus \\
        --old /tmp/jaxft-old --work /tmp/jaxft-bench/work [--only index,new,resume,old,train]

Measurements (markdown tables at the end; ``--json`` also writes the raw figures):

* ``index``: one-time line-index build of every file with a fresh ``$JAXFT_CACHE``
  (seconds, index size on disk, skip counts);
* ``new``: with the index cached, ``build_train_pipeline`` + first batch, then
  ``--batches`` batches of ``--global-batch`` x ``--seq-len`` (packed), for data.workers
  0, 1, 2 and for corpus subsets (``--subsets`` GB: RSS against corpus size);
  examples/s and non-pad tokens/s; peak RSS of the process (ru_maxrss, VmHWM; RssAnon /
  RssFile at the end) and of its largest worker;
* ``resume``: ``set_state`` with a state whose slots stand ~10M examples into the stream,
  then the first batch (a fresh process, index cached);
* ``old``: the in-memory implementation (``--old``, a checkout of commit 6d54816) on the
  subsets, build + first batch, while its peak RSS stays under ``--old-max-gb``
  (extrapolated above);
* ``train``: ``jaxft train`` (the CLI) of the demo-size decoder (``make demo``'s
  LLaMA-style model: d_model 128, 3 layers, seq_len 128, batch 16) for ``--train-steps``
  steps on the whole corpus with data.workers 0 and 1: ``data_wait_s`` /
  ``data_wait_frac`` from metrics.jsonl, averaged over the logged steps after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_report import _fit, report  # noqa: E402
from data_corpus import make_corpus, load_manifest, source_dicts, subset  # noqa: E402
GiB = 1 << 30

def _data_config(files, tokenizer, **kw):
    from jaxft.config.schema import DataConfig, SourceConfig, TokenizerConfig

    return DataConfig(tokenizer=TokenizerConfig(path=tokenizer),
                      train=tuple(SourceConfig(**d) for d in source_dicts(files)), **kw)


# ------------------------------------------------------------ child measurements


def _status(pid: int | str = "self") -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[f"{k}_mib"] = int(v.split()[0]) / 1024
    return out


def _workers_hwm() -> float:
    """Peak RSS (VmHWM, MiB) of the largest live data worker of this process (``ru_maxrss``
    of children is no use here: after fork + exec it still holds the parent's peak)."""
    import multiprocessing as mp

    peaks = []
    for c in mp.active_children():
        try:
            peaks.append(_status(c.pid)["VmHWM_mib"])
        except (OSError, KeyError):
            pass
    return max(peaks, default=0.0)


def _mem(workers_hwm: float = 0.0) -> dict:
    """Peak and current memory of this process (MiB), and the peak of its largest data worker."""
    return {"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_hwm_mib": workers_hwm, **_status()}


def _rss_now() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _batch_counts(b: dict) -> tuple[int, int]:
    """(examples, non-pad tokens) of a packed batch: segments are numbered 1..n per row."""
    seg = b["segment_ids"]
    return int(seg.max(axis=1).sum()), int((seg > 0).sum())


def child_index(a: dict) -> dict:
    from jaxft.config.schema import SourceConfig
    from jaxft.data.index import cache_root
    from jaxft.data.sources import open_source

    from jaxft.data.index import build_indexes

    root = cache_root()
    t0, per_file, skipped, examples, lines = time.perf_counter(), [], {}, 0, 0
    configs = [(SourceConfig(**{"name": f"{d['src_lang']}-{d['tgt_lang']}", **d}), f"data.train[{i}]")
               for i, d in enumerate(source_dicts(a["files"]))]
    build_indexes(configs, "skip", None)  # what the pipeline does first: missing indexes, in parallel
    parallel_s = time.perf_counter() - t0
    for src_cfg, key in configs:
        t = time.perf_counter()
        src = open_source(src_cfg, key=key)
        per_file.append(round(time.perf_counter() - t, 2))
        examples += len(src)
        lines += src.stats.records
        for k, v in src.stats.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    total_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
    return {"seconds": round(total_s, 1), "parallel_build_s": round(parallel_s, 1), "index_bytes": size, "examples": examples, "lines": lines,
            "skipped": skipped, "slowest_file_s": max(per_file), "per_file_s": per_file, **_mem()}


def _pipeline(a: dict, **kw):
    from jaxft.data.pipeline import build_train_pipeline
    from jaxft.data.tokenizer import Tokenizer

    tok = Tokenizer.load(a["tokenizer"])
    cfg = _data_config(a["files"], a["tokenizer"], seq_len=a["seq_len"], workers=a.get("workers", 0),
                       prefetch=a.get("prefetch", 2), overlong=a.get("overlong", "skip"), **kw)
    return build_train_pipeline(cfg, tok, global_batch=a["global_batch"], base_dir=Path(a["corpus"]))


def child_new(a: dict) -> dict:
    import jaxft
    import jaxft.data.pipeline  # noqa: F401 - imports outside the timed part

    from jaxft.data.pipeline import read_directions

    rss_imports = _rss_now()
    t = time.perf_counter()  # opening the sources alone (index metadata): the rest of the build is
    read_directions(_data_config(a["files"], a["tokenizer"]), Path(a["corpus"]), split="train")
    open_s = time.perf_counter() - t  # the data.overlong length scan of the small sources
    t0 = time.perf_counter()
    p = _pipeline(a)
    build_s = time.perf_counter() - t0
    rss_built = _rss_now()
    first = next(p)
    first_s = time.perf_counter() - t0
    ex, toks = 0, 0
    t1 = time.perf_counter()
    for _ in range(a["batches"]):
        e, k = _batch_counts(next(p))
        ex, toks = ex + e, toks + k
    dt = time.perf_counter() - t1
    state = p.get_state()
    stats = p.stats
    workers_hwm = _workers_hwm()
    p.close()
    return {"jaxft": jaxft.__file__, "open_sources_s": round(open_s, 2), "build_s": round(build_s, 2),
            "first_batch_s": round(first_s, 2), "batches": a["batches"], "examples": ex, "tokens": toks, "loop_s": round(dt, 2),
            "examples_per_s": round(ex / dt, 1), "tokens_per_s": round(toks / dt, 1),
            "rows_shape": list(first["inputs"].shape), "slot0_next_index": state["slot_0"]["parent"]["next_index"],
            "rss_after_imports_mib": rss_imports, "rss_after_build_mib": rss_built,
            "bad_skipped_when_drawn": sum(sum(v["bad_skipped"].values()) for v in stats.values()),
            "index_skipped": sum(sum(v2 for k2, v2 in v["skipped"].items() if k2 != "blank") for v in stats.values()),
            "overlong_skipped": sum(v["overlong_skipped"] + v["tokenized_overlong_skipped"] for v in stats.values()),
            **_mem(workers_hwm)}


def child_resume(a: dict) -> dict:
    import jaxft.data.pipeline  # noqa: F401 - imported before the clock starts

    t0 = time.perf_counter()
    p = _pipeline(a)
    build_s = time.perf_counter() - t0
    fresh = p.get_state()
    slot = fresh["slot_0"]
    if set(slot) != {"parent", "next_row", "counter"} or set(slot["parent"]) != {"next_index"}:
        raise RuntimeError(f"unexpected iterator state structure: {slot}")
    B = a["global_batch"]
    k = a["resume_at"] // B  # slot r resumes at stream index r + k*B: ~resume_at examples in
    state = {key: {"parent": {"next_index": k}, "next_row": 0, "counter": k // 4} for key in fresh}
    json.dumps(state)  # as a checkpoint stores it
    t1 = time.perf_counter()
    p.set_state(state)
    b = next(p)
    resume_s = time.perf_counter() - t1
    after = p.get_state()
    idx = [after[f"slot_{r}"]["parent"]["next_index"] for r in range(B)]
    ok = all(i > k for i in idx) and b["inputs"].shape[0] == B and int((b["segment_ids"] > 0).sum()) > 0
    ex, toks = _batch_counts(b)
    workers_hwm = _workers_hwm()
    # the same position through a second pipeline gives the same batch (deterministic resume)
    p.close()
    q = _pipeline(a)
    q.set_state(state)
    same = all(np.array_equal(b[key], v) for key, v in next(q).items())
    q.close()
    return {"build_s": round(build_s, 2), "resume_s": round(resume_s, 2),
            "total_s": round(build_s + resume_s, 2), "resume_at": k * B, "next_index_per_slot": k,
            "accepted": bool(ok), "deterministic": bool(same), "examples_in_batch": ex,
            "tokens_in_batch": toks, "next_index_after": [min(idx), max(idx)], **_mem(workers_hwm)}


def child_old(a: dict) -> dict:
    import jaxft

    if not jaxft.__file__.startswith(a["old"]):
        raise RuntimeError(f"old implementation expected under {a['old']}, got {jaxft.__file__}")
    import jaxft.data.pipeline  # noqa: F401 - imported before the clock starts

    from jaxft.config.schema import DataConfig, SourceConfig, TokenizerConfig
    from jaxft.data.pipeline import build_train_pipeline
    from jaxft.data.tokenizer import Tokenizer

    cfg = DataConfig(tokenizer=TokenizerConfig(path=a["tokenizer"]), seq_len=a["seq_len"],
                     train=tuple(SourceConfig(**d) for d in source_dicts(a["files"])))
    tok = Tokenizer.load(a["tokenizer"])
    rss_imports = _rss_now()
    t0 = time.perf_counter()
    p = build_train_pipeline(cfg, tok, global_batch=a["global_batch"],
                             base_dir=Path(a["corpus"]))
    build_s = time.perf_counter() - t0
    next(p)
    first_s = time.perf_counter() - t0
    ex, toks = 0, 0
    t1 = time.perf_counter()
    for _ in range(a["batches"]):
        e, k = _batch_counts(next(p))
        ex, toks = ex + e, toks + k
    dt = time.perf_counter() - t1
    return {"jaxft": jaxft.__file__, "build_s": round(build_s, 2), "first_batch_s": round(first_s, 2),
            "examples_per_s": round(ex / dt, 1), "tokens_per_s": round(toks / dt, 1),
            "examples": sum(len(d.examples) for d in p.directions),
            "rss_after_imports_mib": rss_imports, **_mem()}


CHILDREN = {"index": child_index, "new": child_new, "resume": child_resume, "old": child_old}


# ------------------------------------------------------------------------ parent


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_child(kind: str, args: dict, *, env: dict, log: Path, max_rss_gb: float | None = None,
              pythonpath: str | None = None) -> dict:
    """One measurement in a fresh process; {"error": ...} if it failed or was stopped at
    ``max_rss_gb`` of resident memory (polled every 0.2 s)."""
    env = dict(env)
    env["PYTHONPATH"] = pythonpath or str(ROOT)
    t0 = time.perf_counter()
    with open(log, "ab") as err:
        err.write(f"\n=== {kind} {time.strftime('%H:%M:%S')} ===\n".encode())
        err.flush()
        proc = subprocess.Popen([sys.executable, __file__, "--child", kind], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err)
        proc.stdin.write(json.dumps(args).encode())
        proc.stdin.close()
        peak, killed = 0.0, False
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024
                peak = max(peak, rss)
                if max_rss_gb is not None and rss > max_rss_gb * 1024:
                    proc.kill()
                    killed = True
            except (OSError, StopIteration):
                pass
            time.sleep(0.2)
        out = proc.stdout.read().decode()
    wall = time.perf_counter() - t0
    if killed:
        return {"error": f"stopped at {peak / 1024:.1f} GiB RSS after {wall:.0f} s", "polled_peak_mib": peak,
                "wall_s": round(wall, 1)}
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode} (see {log})", "wall_s": round(wall, 1)}
    return {**json.loads(lines[-1][7:]), "polled_peak_mib": peak, "wall_s": round(wall, 1)}


def train_config(path: Path, corpus: dict, run_dir: Path, steps: int, workers: int) -> Path:
    """``make demo``'s decoder (configs/experiments/demo_decoder.yaml) with this corpus's
    8000-piece tokenizer (hence vocab_size 8000) on every direction, logging every step."""
    cfg = {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny-llama", "vocab_size": 8000, "d_model": 128, "n_layers": 3, "n_heads": 4,
                  "n_kv_heads": 2, "mlp_dim": 384, "dtype": "float32", "max_seq_len": 128},
        "data": {"tokenizer": {"path": corpus["tokenizer"]}, "train": source_dicts(corpus["files"]),
                 "seq_len": 128, "temperature": 5.0, "workers": workers, "prefetch": 2},
        "optimizer": {"lr": 3.0e-3, "warmup_steps": min(30, steps // 2), "schedule": "cosine", "weight_decay": 0.01},
        "train": {"steps": steps, "global_batch": 16, "log_every": 1, "progress_bar": False},
        "checkpoint": {"every": 0, "keep": 1},
    }
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return path


def run_train(work: Path, corpus: dict, *, steps: int, workers: int, env: dict, log: Path) -> dict:
    run_dir = work / f"train_w{workers}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = train_config(work / f"train_w{workers}.yaml", corpus, run_dir, steps, workers)
    cmd = [str(ROOT / ".venv" / "bin" / "jaxft"), "train", str(cfg)]
    t0 = time.perf_counter()
    with open(log, "ab") as err:
        err.write(f"\n=== train workers={workers} {time.strftime('%H:%M:%S')} ===\n".encode())
        err.flush()
        rc = subprocess.run(cmd, env=dict(env, JAX_PLATFORMS="cpu"), stdout=err, stderr=err).returncode
    wall = time.perf_counter() - t0
    if rc:
        return {"error": f"jaxft train exit {rc} (see {log})", "wall_s": round(wall, 1)}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") == "train" and "data_wait_frac" in r]
    after = [r for r in rows if r["step"] > 1]
    step_s = [r["data_wait_s"] / r["data_wait_frac"] for r in after if r["data_wait_frac"] > 0]
    return {"steps": steps, "logged_steps": len(after), "wall_s": round(wall, 1),
            "first_step_wait_s": rows[0]["data_wait_s"] if rows and rows[0]["step"] == 1 else None,
            "data_wait_s": float(np.mean([r["data_wait_s"] for r in after])),
            "data_wait_s_max": float(np.max([r["data_wait_s"] for r in after])),
            "data_wait_frac": float(np.mean([r["data_wait_frac"] for r in after])),
            "step_s_median": float(np.median(step_s)) if step_s else None,
            "seq_tokens_per_s": float(np.median([r["seq_tokens_per_s"] for r in after])),
            "command": " ".join(cmd)}


def record(results_path: Path, entry: dict) -> None:
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    results.append(entry)
    results_path.write_text(json.dumps(results, indent=1))
    print(json.dumps(entry), flush=True)


def measure(args) -> None:
    corpus_dir = Path(args.corpus).resolve()
    corpus = load_manifest(corpus_dir)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path, log = work / "results.json", work / "children.log"
    cache = work / "cache"
    base_env = dict(os.environ, JAXFT_CACHE=str(cache), PYTHONUNBUFFERED="1")
    only = set(args.only.split(","))
    common = {"tokenizer": corpus["tokenizer"], "corpus": str(corpus_dir), "global_batch": args.global_batch,
              "seq_len": args.seq_len, "batches": args.batches}
    all_files = subset(corpus["files"], args.index_gb)
    gb_of = lambda fs: sum(f["bytes"] for f in fs) / 1e9  # noqa: E731

    def rec(kind: str, label: dict, result: dict, load0: str) -> None:
        record(results_path, {"kind": kind, **label, "date": time.strftime("%Y-%m-%d %H:%M"),
                              "load_before": load0, "load_after": _load(), "result": result})

    if "index" in only:
        shutil.rmtree(cache, ignore_errors=True)
        load0 = _load()
        rec("index", {"gb": gb_of(all_files), "files": len(all_files)},
            run_child("index", {"files": all_files}, env=base_env, log=log), load0)
    if "new" in only:
        for w in args.workers:
            load0 = _load()
            rec("new", {"gb": gb_of(all_files), "files": len(all_files), "workers": w},
                run_child("new", {**common, "files": all_files, "workers": w, "prefetch": args.prefetch},
                          env=base_env, log=log), load0)
        load0 = _load()
        rec("new", {"gb": gb_of(all_files), "files": len(all_files), "workers": 0, "overlong": "truncate"},
            run_child("new", {**common, "files": all_files, "workers": 0, "overlong": "truncate"},
                      env=base_env, log=log), load0)
        for gb in args.subsets:
            fs = subset(corpus["files"], gb)
            load0 = _load()
            rec("new", {"gb": gb_of(fs), "files": len(fs), "workers": 0},
                run_child("new", {**common, "files": fs, "workers": 0}, env=base_env, log=log), load0)
    if "resume" in only:
        for w in (0, 1):
            load0 = _load()
            rec("resume", {"gb": gb_of(all_files), "files": len(all_files), "workers": w},
                run_child("resume", {**common, "files": all_files, "workers": w, "resume_at": args.resume_at},
                          env=base_env, log=log), load0)
    if "old" in only:
        for gb in [*args.subsets, *args.old_more]:
            fs = subset(corpus["files"], gb)
            done = [(r["gb"], r["result"]["maxrss_mib"]) for r in
                    (json.loads(results_path.read_text()) if results_path.exists() else [])
                    if r["kind"] == "old" and "maxrss_mib" in r["result"]]
            if len(done) >= 2 and _fit(done, gb_of(fs)) > args.old_max_gb * 1024:
                print(f"old path at {gb_of(fs):.2f} GB not run: extrapolated {_fit(done, gb_of(fs)) / 1024:.1f} GiB "
                      f"peak RSS > --old-max-gb {args.old_max_gb}", flush=True)
                break
            load0 = _load()
            res = run_child("old", {**common, "files": fs, "old": str(Path(args.old).resolve())}, env=base_env,
                            log=log, max_rss_gb=args.old_max_gb, pythonpath=str(Path(args.old).resolve()))
            rec("old", {"gb": gb_of(fs), "files": len(fs)}, res, load0)
            if "error" in res:
                break
    if "train" in only:
        for w in (0, 1):
            load0 = _load()
            rec("train", {"gb": gb_of(all_files), "files": len(all_files), "workers": w},
                run_train(work, {**corpus, "files": all_files}, steps=args.train_steps, workers=w,
                          env=base_env, log=log), load0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make-corpus", metavar="DIR", help="write a synthetic corpus (and tokenizer) to DIR")
    ap.add_argument("--gb", type=float, default=5.0, help="corpus size for --make-corpus")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--corpus", help="a corpus written by --make-corpus: measure on it")
    ap.add_argument("--work", default="/tmp/jaxft-bench/work", help="index cache, run dirs, results.json")
    ap.add_argument("--old", default="/tmp/jaxft-old", help="checkout of the in-memory implementation")
    ap.add_argument("--only", default="index,new,resume,old,train")
    ap.add_argument("--index-gb", type=float, default=None,
                    help="measure on the largest files up to this many GB (default: the whole corpus)")
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--subsets", type=float, nargs="*", default=[0.25, 0.5, 1.0],
                    help="GB: corpus subsets (whole files) for new-vs-old and RSS vs corpus size")
    ap.add_argument("--old-more", type=float, nargs="*", default=[2.0],
                    help="GB: larger subsets tried on the old path (stopped at --old-max-gb)")
    ap.add_argument("--old-max-gb", type=float, default=16.0)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--resume-at", type=int, default=10_000_000)
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--report", action="store_true", help="only print the tables of WORK/results.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = CHILDREN[args.child](json.loads(sys.stdin.read()))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    machine = f"{platform.machine()} cpu, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB"
    if args.make_corpus:
        make_corpus(Path(args.make_corpus), args.gb, vocab=args.vocab)
    if args.corpus and not args.report:
        print(f"load before: {_load()}", flush=True)
        measure(args)
        print(f"load after: {_load()}", flush=True)
    if args.corpus or args.report:
        print(report(Path(args.work) / "results.json", machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
