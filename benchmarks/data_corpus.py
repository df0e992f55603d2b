"""The synthetic corpus of `benchmarks/data_pipeline.py`: many directions in mixed scripts,
xP3-style JSONL and TSV files of skewed sizes with a sprinkling of bad lines, written
streaming; its manifest, and the `data.train` entries that read it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

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
