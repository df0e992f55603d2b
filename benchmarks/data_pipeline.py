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
GiB = 1 << 30

# --------------------------------------------------------------------------- corpus

# Language -> (script alphabet as code point ranges, extra letters, word separator)
_LATIN = [(0x61, 0x7A)]
LANGS = {
    "eng_Latn": (_LATIN, "", " "),
    "deu_Latn": (_LATIN, "äöüß", " "),
    "fra_Latn": (_LATIN, "éèàçêô", " "),
    "rus_Cyrl": ([(0x430, 0x44F)], "", " "),
    "ukr_Cyrl": ([(0x430, 0x44F)], "іїєґ", " "),
    "ell_Grek": ([(0x3B1, 0x3C9)], "άέήίόύώ", " "),
    "arb_Arab": ([(0x627, 0x64A)], "", " "),
    "hin_Deva": ([(0x905, 0x939), (0x93E, 0x94C)], "", " "),
    "zho_Hans": ([(0x4E00, 0x4E00 + 1500)], "，。", ""),
    "jpn_Jpan": ([(0x3041, 0x3093), (0x4E00 + 200, 0x4E00 + 900)], "、。", ""),
    "tha_Thai": ([(0xE01, 0xE2E), (0xE30, 0xE39), (0xE40, 0xE44)], "", ""),
    "kor_Hang": ([(0xAC00, 0xAC00 + 1200)], "", " "),
}
NAMES = {"eng_Latn": "English", "deu_Latn": "German", "fra_Latn": "French", "rus_Cyrl": "Russian",
         "ukr_Cyrl": "Ukrainian", "ell_Grek": "Greek", "arb_Arab": "Arabic", "hin_Deva": "Hindi",
         "zho_Hans": "Chinese", "jpn_Jpan": "Japanese", "tha_Thai": "Thai", "kor_Hang": "Korean"}
# 24 directions, largest first (sizes fall geometrically: the first is 100x the last);
# "jsonl" = xP3-style {"inputs": prompt + source, "targets": target}, "tsv" = src<TAB>tgt.
DIRECTIONS = [
    ("eng_Latn", "deu_Latn", "jsonl"), ("eng_Latn", "zho_Hans", "tsv"), ("fra_Latn", "eng_Latn", "jsonl"),
    ("eng_Latn", "rus_Cyrl", "jsonl"), ("arb_Arab", "eng_Latn", "tsv"), ("eng_Latn", "hin_Deva", "jsonl"),
    ("jpn_Jpan", "eng_Latn", "jsonl"), ("eng_Latn", "ell_Grek", "tsv"), ("deu_Latn", "fra_Latn", "jsonl"),
    ("eng_Latn", "tha_Thai", "jsonl"), ("rus_Cyrl", "ukr_Cyrl", "tsv"), ("kor_Hang", "eng_Latn", "jsonl"),
    ("eng_Latn", "arb_Arab", "jsonl"), ("zho_Hans", "jpn_Jpan", "tsv"), ("hin_Deva", "eng_Latn", "jsonl"),
    ("eng_Latn", "kor_Hang", "jsonl"), ("ell_Grek", "eng_Latn", "tsv"), ("ukr_Cyrl", "eng_Latn", "jsonl"),
    ("tha_Thai", "eng_Latn", "jsonl"), ("eng_Latn", "fra_Latn", "tsv"), ("deu_Latn", "rus_Cyrl", "jsonl"),
    ("eng_Latn", "jpn_Jpan", "jsonl"), ("arb_Arab", "fra_Latn", "tsv"), ("zho_Hans", "eng_Latn", "jsonl"),
]
VOCAB_WORDS = 4000  # per language, Zipf-distributed
LINES_PER_CHUNK = 20000
BAD_PER_CHUNK = 3  # bad lines written after each chunk (after the first)


def _alphabet(lang: str) -> list[str]:
    ranges, extra, _ = LANGS[lang]
    chars = [chr(c) for lo, hi in ranges for c in range(lo, hi + 1)] + list(extra)
    return chars


def _vocab(lang: str, rng: np.random.Generator) -> list[bytes]:
    """VOCAB_WORDS random words (with the language's separator), as UTF-8."""
    chars = np.array(_alphabet(lang))
    sep = LANGS[lang][2]
    cjk = sep == ""
    lens = rng.integers(1, 4, VOCAB_WORDS) if cjk else np.clip(rng.poisson(5, VOCAB_WORDS), 1, 14)
    # frequent letters first: a Zipf over the alphabet makes words look less uniform
    p = 1.0 / (np.arange(len(chars)) + 3.0)
    p /= p.sum()
    letters = rng.choice(len(chars), size=int(lens.sum()), p=p)
    out, k = [], 0
    for n in lens:
        out.append(("".join(chars[letters[k:k + n]]) + sep).encode())
        k += n
    return out


class _Table:
    """Byte strings in one uint8 buffer, gathered into lines by vectorized indexing."""

    def __init__(self, entries: list[bytes]):
        self.lens = np.array([len(e) for e in entries], np.int64)
        self.offs = np.concatenate([[0], np.cumsum(self.lens)[:-1]]).astype(np.int64)
        self.buf = np.frombuffer(b"".join(entries), np.uint8)

    def gather(self, ids: np.ndarray) -> bytes:
        lens = self.lens[ids]
        total = int(lens.sum())
        ends = np.cumsum(lens)
        idx = np.arange(total, dtype=np.int64) + np.repeat(self.offs[ids] - (ends - lens), lens)
        return self.buf[idx].tobytes()


def _zipf_cdf(n: int) -> np.ndarray:
    p = 1.0 / (np.arange(n) + 2.7)
    return np.cumsum(p / p.sum())


def _side_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """Words per side: lognormal around 12, and 0.2% long ones (150-400 words: over-long
    at seq_len 512)."""
    w = np.clip(np.round(rng.lognormal(np.log(12), 0.6, n)), 1, 120).astype(np.int64)
    long = rng.random(n) < 0.002
    w[long] = rng.integers(150, 400, int(long.sum()))
    return w


def _bad_lines(fmt: str, rng: np.random.Generator) -> list[bytes]:
    if fmt == "jsonl":
        pool = [b'{"inputs": "a truncated record', b'{"inputs": "text", "targets": ""}',
                b'["not", "an", "object"]', b'{"inputs": "no targets field"}', b'']
    else:
        pool = [b"only one column", b"source\t", b"a\tb\tc", b"\t"]
    return [pool[i] for i in rng.integers(0, len(pool), BAD_PER_CHUNK)]


def write_direction(path: Path, src: str, tgt: str, fmt: str, nbytes: int, seed: int) -> dict:
    """Write one direction's file of about ``nbytes``, streaming; its line counts."""
    rng = np.random.default_rng(seed)
    vs, vt = _vocab(src, rng), _vocab(tgt, np.random.default_rng(seed + 7919))
    if fmt == "jsonl":
        specials = [f'{{"inputs": "Translate from {NAMES[src]} to {NAMES[tgt]}:\\n'.encode(),
                    b'", "targets": "', b'"}\n']
    else:
        specials = [b"", b"\t", b"\n"]
    table = _Table(vs + vt + specials)
    P, M, S = 2 * VOCAB_WORDS, 2 * VOCAB_WORDS + 1, 2 * VOCAB_WORDS + 2
    cdf = _zipf_cdf(VOCAB_WORDS)
    written, lines, bad = 0, 0, 0
    with open(path, "wb", buffering=1 << 24) as f:
        if fmt == "tsv":
            written += f.write(b"src\ttgt\n")
        while written < nbytes:
            n = int(min(LINES_PER_CHUNK, max(500, (nbytes - written) // 200)))
            ns, nt = _side_lengths(rng, n), _side_lengths(rng, n)
            counts = ns + nt + 3
            total = int(counts.sum())
            starts = np.cumsum(counts) - counts
            pos = np.arange(total, dtype=np.int64) - np.repeat(starts, counts)
            nsr, cr = np.repeat(ns, counts), np.repeat(counts, counts)
            tok = np.empty(total, np.int64)
            is_src = (pos >= 1) & (pos <= nsr)
            is_tgt = (pos > nsr + 1) & (pos < cr - 1)
            tok[is_src] = np.minimum(np.searchsorted(cdf, rng.random(int(ns.sum()))), VOCAB_WORDS - 1)
            tok[is_tgt] = np.minimum(np.searchsorted(cdf, rng.random(int(nt.sum()))), VOCAB_WORDS - 1) + VOCAB_WORDS
            tok[pos == 0] = P
            tok[pos == nsr + 1] = M
            tok[pos == cr - 1] = S
            written += f.write(table.gather(tok))
            lines += n
            if lines > LINES_PER_CHUNK:
                junk = _bad_lines(fmt, rng)
                written += f.write(b"\n".join(junk) + b"\n")
                lines += len(junk)
                bad += sum(1 for j in junk if j)
    return {"path": str(path), "src": src, "tgt": tgt, "format": fmt, "bytes": path.stat().st_size,
            "lines": lines, "bad_lines_written": bad}


def make_corpus(out: Path, gb: float, *, seed: int = 0, vocab: int = 8000) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    weights = 100.0 ** (-np.arange(len(DIRECTIONS)) / (len(DIRECTIONS) - 1))
    target = gb * 1e9 * 1.01
    sizes = weights / weights.sum() * target
    t0 = time.perf_counter()
    files = []
    for i, ((src, tgt, fmt), size) in enumerate(zip(DIRECTIONS, sizes)):
        path = out / ("xp3" if fmt == "jsonl" else "tsv") / f"{src}-{tgt}.{fmt}"
        path.parent.mkdir(exist_ok=True)
        t = time.perf_counter()
        files.append(write_direction(path, src, tgt, fmt, int(size), seed * 1000 + i))
        print(f"  {path.name:24s} {files[-1]['bytes'] / 1e6:9.1f} MB {files[-1]['lines']:10d} lines "
              f"{time.perf_counter() - t:6.1f} s", flush=True)
    gen_s = time.perf_counter() - t0
    total = sum(f["bytes"] for f in files)
    print(f"corpus: {total / 1e9:.2f} GB, {sum(f['lines'] for f in files)} lines, {len(files)} files "
          f"in {gen_s:.0f} s ({total / 1e6 / gen_s:.0f} MB/s)", flush=True)
    t = time.perf_counter()
    tok_path = out / f"spm{vocab}.model"
    _train_tokenizer(files, tok_path, vocab)
    tok_s = time.perf_counter() - t
    print(f"tokenizer: {tok_path} ({vocab} pieces) in {tok_s:.0f} s", flush=True)
    manifest = {"files": files, "bytes": total, "gen_s": round(gen_s, 1), "tokenizer": str(tok_path),
                "tokenizer_s": round(tok_s, 1), "seed": seed}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _sample_texts(files: list[dict], per_file_bytes: int = 2_000_000):
    """Source and target texts of the first ``per_file_bytes`` of every file."""
    for f in files:
        with open(f["path"], "rb") as fh:
            chunk = fh.read(per_file_bytes).split(b"\n")[1:-1]
        for raw in chunk:
            line = raw.decode("utf-8", "replace")
            if f["format"] == "tsv":
                yield from (c for c in line.split("\t") if c.strip())
            else:
                try:
                    rec = json.loads(line)
                    yield rec["inputs"]
                    yield rec["targets"]
                except (ValueError, KeyError, TypeError):
                    continue


def _train_tokenizer(files: list[dict], path: Path, vocab: int) -> None:
    from jaxft.config.schema import TokenizerConfig
    from jaxft.data.tokenizer import train_tokenizer

    texts = list(_sample_texts(files))
    rng = np.random.default_rng(0)
    texts = [texts[i] for i in rng.permutation(len(texts))[:150000]]
    train_tokenizer(texts, path, TokenizerConfig(train_vocab_size=vocab, max_sentences=150000))


# ----------------------------------------------------------------------- configs


def load_manifest(corpus: Path) -> dict:
    return json.loads((corpus / "manifest.json").read_text())


def source_dicts(files: list[dict]) -> list[dict]:
    """The data.train entries of ``files`` (xP3-style JSONL: task prompt; TSV: translation)."""
    out = []
    for f in files:
        d = {"type": f["format"], "path": f["path"], "src_lang": f["src"], "tgt_lang": f["tgt"]}
        if f["format"] == "jsonl":
            d.update(task="prompt", name=f"xp3/{f['src']}-{f['tgt']}")
        out.append(d)
    return out


def subset(files: list[dict], gb: float | None) -> list[dict]:
    """Whole files, largest first, as long as they fit in ``gb`` (None: all)."""
    if gb is None:
        return list(files)
    out, total = [], 0
    for f in sorted(files, key=lambda f: -f["bytes"]):
        if total + f["bytes"] <= gb * 1e9:
            out.append(f)
            total += f["bytes"]
    return out


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
