"""``jaxft data prepare``: every train and dev source of a config to ArrayRecord shards.

Each direction (an expanded source, ``jaxft.data.sources.keyed_sources``) is read through
``open_source`` under ``data.bad_lines`` and streamed, one example at a time, into
``<out>/<split>/<name>/part-NNNNN.array_record`` (``shard_size`` examples per shard, written
with ``group_size:1``, the layout grain's random access expects).  A record is the UTF-8
JSON object ``{"src", "tgt"}`` (plus ``src_lang`` / ``tgt_lang`` when set), the texts as
the source yields them (cleaned, bad records skipped).  ``<out>/manifest.json`` reports per
direction the records read, the examples written and the records skipped per reason;
``<out>/sources.yaml`` is a ``data: {train: [...], dev: [...]}`` overlay of ``type:
arrayrecord`` sources with the same names, languages, tasks and weights (paste it into a
config, or name it under ``base:``).  The output goes through ``jaxft.outputs.safe_output``.
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import yaml

from jaxft.config.schema import DataConfig, SourceConfig
from jaxft.data.readers import MONOLINGUAL_TASKS, DataError, Example, Source
from jaxft.data.sources import keyed_sources, open_source
from jaxft.outputs import safe_output

log = logging.getLogger(__name__)

SHARD_SIZE = 100_000  # examples per ArrayRecord shard
WRITER_OPTIONS = "group_size:1"  # one record per chunk: fast random access (grain warns otherwise)
MANIFEST_VERSION = 1


def _input_paths(src: SourceConfig) -> list[str]:
    """The files / folders a source reads (a glob: the folder it starts in)."""
    out = []
    for p in (src.path, src.src_path, src.tgt_path, src.tfds_data_dir):
        if p is None:
            continue
        if glob.has_magic(p):
            parts = Path(p).parts
            p = str(Path(*parts[:next(i for i, x in enumerate(parts) if glob.has_magic(x))]) or ".")
        out.append(p)
    return out


def _folder(name: str, used: set[str]) -> str:
    """A file-system-safe, unique folder name for a direction."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "source"
    folder, n = base, 1
    while folder in used:
        n += 1
        folder = f"{base}_{n}"
    used.add(folder)
    return folder


def _write_direction(source: Source, folder: Path, shard_size: int) -> dict[str, Any]:
    """Stream ``source``'s examples into ArrayRecord shards under ``folder``; the counts."""
    from array_record.python.array_record_module import ArrayRecordWriter

    folder.mkdir(parents=True)
    skipped: collections.Counter = collections.Counter(source.stats.skipped)  # found when indexing
    writer, shards, written = None, 0, 0
    try:
        for ex in source:
            if not isinstance(ex, Example):
                skipped[ex.reason] += 1
                continue
            if writer is None or written % shard_size == 0:
                if writer is not None:
                    writer.close()
                writer = ArrayRecordWriter(str(folder / f"part-{shards:05d}.array_record"), WRITER_OPTIONS)
                shards += 1
            rec = {"messages": json.loads(ex.tgt)} if ex.task == "chat" else {"src": ex.src, "tgt": ex.tgt}
            rec.update({k: v for k, v in (("src_lang", ex.src_lang), ("tgt_lang", ex.tgt_lang)) if v})
            writer.write(json.dumps(rec, ensure_ascii=False).encode("utf-8"))
            written += 1
    finally:
        if writer is not None:
            writer.close()
    if written == 0:
        raise source.fail(source.where(0).rsplit(":", 1)[0], f"no usable examples (skipped: {dict(skipped)})")
    return {"records": source.stats.records, "examples": written, "skipped": dict(sorted(skipped.items())),
            "shards": shards}


def _arrayrecord_source(src: SourceConfig, path: Path) -> dict[str, Any]:
    """The ``sources.yaml`` entry reading a written direction back."""
    entry: dict[str, Any] = {"type": "arrayrecord", "path": str(path), "name": src.name, "task": src.task}
    if src.src_lang or src.tgt_lang:
        entry.update(src_lang=src.src_lang, tgt_lang=src.tgt_lang)
    if src.task in MONOLINGUAL_TASKS:
        entry["tgt_field"] = "tgt"
    elif src.task != "chat":  # chat records are written as {"messages": [...]}, the default field
        entry.update(src_field="src", tgt_field="tgt")
    if src.weight is not None:
        entry["weight"] = src.weight
    return entry


def prepare(cfg: DataConfig, base_dir: Path, out: str | Path, *, overwrite: bool = False,
            shard_size: int = SHARD_SIZE) -> dict[str, Any]:
    """Write every ``cfg.train`` / ``cfg.dev`` direction as ArrayRecord shards under ``out``
    (see the module docstring); returns the manifest (also ``out/manifest.json``)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    splits = [(split, keyed_sources(sources, Path(base_dir), section=f"data.{split}", split=split))
              for split, sources in (("train", cfg.train), ("dev", cfg.dev)) if sources]
    if not splits:
        raise DataError("data.train / data.dev: no sources to prepare")
    inputs = [p for _, keyed in splits for _, src in keyed for p in _input_paths(src)]
    final = Path(out).expanduser().resolve()
    manifest: dict[str, Any] = {"version": MANIFEST_VERSION, "bad_lines": cfg.bad_lines, "directions": []}
    overlay: dict[str, list] = {}
    with safe_output(out, inputs=inputs, overwrite=overwrite, flag="--out") as tmp:
        opened = [(split, [(key, src, open_source(src, key=key, bad_lines=cfg.bad_lines, index_dir=cfg.index_dir))
                           for key, src in keyed]) for split, keyed in splits]  # every config error first
        for split, keyed in opened:
            used: set[str] = set()
            for key, src, source in keyed:
                t0 = time.time()
                rel = Path(split) / _folder(src.name, used)
                counts = _write_direction(source, tmp / rel, shard_size)
                manifest["directions"].append({"split": split, "key": key, "name": src.name, "task": src.task,
                                               "src_lang": src.src_lang, "tgt_lang": src.tgt_lang,
                                               "folder": str(rel), **counts})
                overlay.setdefault(split, []).append(_arrayrecord_source(src, final / rel))
                bad = {k: v for k, v in counts["skipped"].items() if k != "blank"}
                log.info("%s %s (%s): %d examples of %d records -> %s in %.1f s%s", split, src.name, key,
                         counts["examples"], counts["records"], final / rel, time.time() - t0,
                         f", skipped {bad}" if bad else "")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
        header = "# written by `jaxft data prepare`: paste into a config, or name this file under `base:`\n"
        (tmp / "sources.yaml").write_text(header + yaml.safe_dump({"data": overlay}, sort_keys=False,
                                                                  allow_unicode=True), encoding="utf-8")
    return manifest


def summary_table(manifest: dict[str, Any]) -> str:
    """The per-direction counts as a plain-text table."""
    rows = [("split", "direction", "records", "examples", "skipped")]
    for d in manifest["directions"]:
        skipped = " ".join(f"{k}={v}" for k, v in d["skipped"].items()) or "-"
        rows.append((d["split"], d["name"], str(d["records"]), str(d["examples"]), skipped))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i in (2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in rows)
