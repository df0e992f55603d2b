"""TSV / JSONL / text sources through a line-offset index, built once and cached.

The first time a file is opened, one pass parses every line under the source's settings and
the bad-line policy, and writes a fixed-size entry (byte offset, byte length, line number)
for each usable line to ``<cache>/<file stem>.<path hash>.<key hash>.idx``, with the counts
(records, examples, skipped per reason) in the ``.json`` beside it.  The key hashes the
file's path, size, modification time and first/last 64 KiB, and every setting the parse
depends on, so an edited file or a changed field gets a new index and the old one is
removed.  Later opens read the ``.json`` only: O(1) whatever the corpus size.

``LineSource[i]`` reads entry ``i`` with one ``pread`` and the line with another, and parses
it again: memory stays constant (no offsets array in memory, no mmap) and any process can
read any example.

The cache folder is ``data.index_dir`` when set (e.g. a disk shared by the hosts of a pod),
else ``$JAXFT_CACHE/index``, else ``$XDG_CACHE_HOME/jaxft/index`` (``~/.cache/jaxft/index``).
Indexes are written to a temporary name and renamed, so processes building the same index
at once cannot see a partial one.

Files at a URL (``gs://``: no ``pread`` on an object store) are read through a local copy made
once per URL + size + mtime (`jaxft.paths.local_copy`, streamed: memory does not grow with the
file; disk does, in ``$JAXFT_CACHE/remote``); messages then name the copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxft.config.schema import SourceConfig
from jaxft.data.readers import (LINE_FORMATS, DataError, Example, FirstRecordLacksFields, LineFormat,
                                ReadStats, Source, clean, missing_fields_error)
from jaxft.paths import is_remote, local_copy

log = logging.getLogger(__name__)

INDEX_VERSION = 1
SINGLE = np.dtype([("off", "<i8"), ("len", "<u4"), ("line", "<i8")])
PAIR = np.dtype([("off", "<i8"), ("len", "<u4"), ("off2", "<i8"), ("len2", "<u4"), ("line", "<i8")])
_FLUSH = 65536  # entries per write while building
_SAMPLE = 65536  # bytes hashed from each end of a file
PARALLEL_BUILD_BYTES = 64 << 20  # missing indexes of at least this many bytes in all are built in parallel
_KEY_FIELDS = ("type", "task", "src_field", "tgt_field", "header", "max_examples", "src_lang", "tgt_lang")


def cache_root(index_dir: str | None = None) -> Path:
    """Where indexes are cached (see the module docstring)."""
    if index_dir and is_remote(index_dir):
        raise DataError(f"data.index_dir: {index_dir}: must be a local folder (indexes are read with pread)")
    if index_dir:
        return Path(index_dir).expanduser()
    if os.environ.get("JAXFT_CACHE"):
        return Path(os.environ["JAXFT_CACHE"]).expanduser() / "index"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxft" / "index"


def _file_key(path: str) -> list[Any]:
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE))
        if st.st_size > _SAMPLE:
            f.seek(max(_SAMPLE, st.st_size - _SAMPLE))
            h.update(f.read(_SAMPLE))
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns, h.hexdigest()[:16]]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line without its line end) for each line of ``path``."""
    off = 0
    with open(path, "rb", buffering=1 << 22) as f:
        for raw in f:
            n = len(raw)
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            yield off, raw.removesuffix(b"\r")
            off += n


def local_files(config: SourceConfig, key: str) -> SourceConfig:
    """`config` with its files at URLs replaced by local copies (`jaxft.paths.local_copy`)."""
    fields = [f for f in ("path", "src_path", "tgt_path") if getattr(config, f) and is_remote(getattr(config, f))]
    try:
        return dataclasses.replace(config, **{f: str(local_copy(getattr(config, f))) for f in fields})
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{key}: {e}") from None


class IndexMissing(LookupError):
    """``LineSource(..., build=False)`` of a file whose index is not cached yet."""


def build_indexes(todo: list[tuple[SourceConfig, str]], bad_lines: str, index_dir: str | None) -> None:
    """Build the missing line indexes of ``todo`` ((source, config key) pairs), several files
    at once in worker processes when there is more than one (an index build is one CPU core
    parsing; a TPU host has dozens).  Errors are raised as in ``LineSource``."""
    missing = []
    todo = [(local_files(src, key), key) for src, key in todo]
    for src, key in todo:
        try:
            LineSource(src, key, bad_lines, index_dir=index_dir, build=False)
        except IndexMissing:
            missing.append((src, key))
    procs = min(len(missing), os.cpu_count() or 1)
    size = sum(os.path.getsize(f) for src, _ in missing for f in (src.path, src.src_path, src.tgt_path) if f)
    if procs < 2 or size < PARALLEL_BUILD_BYTES:  # small files: faster than starting processes
        return
    import concurrent.futures
    import multiprocessing

    log.info("building %d line indexes in %d processes", len(missing), procs)
    with concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for f in [pool.submit(LineSource, src, key, bad_lines, index_dir=index_dir) for src, key in missing]:
            f.result()


class LineSource(Source):
    """Random access to a TSV, JSONL or text source through its cached line index."""

    def __init__(self, config: SourceConfig, key: str, bad_lines: str = "skip", *, index_dir: str | None = None,
                 build: bool = True):
        """``build`` False: raise ``IndexMissing`` instead of building a missing index."""
        config = local_files(config, key)  # files at URLs: local copies
        super().__init__(config, key, bad_lines)
        files = (config.path,) if config.path is not None else (config.src_path, config.tgt_path)
        what = ("file",) if config.path is not None else ("source file", "target file")
        for f, w in zip(files, what):
            p = Path(f)
            if p.is_dir():
                raise self.fail(f, f"{w} is a folder, not a file")
            if not p.is_file():
                raise self.fail(f, f"{w} does not exist")
            if not any(clean(raw.decode("utf-8", "replace")) for _, raw in _lines(f)):
                raise self.fail(f, "file is empty")
        self.format: LineFormat = LINE_FORMATS[config.type](self)
        self.files = files
        self.dtype = SINGLE if len(files) == 1 else PAIR
        settings = {k: getattr(config, k) for k in _KEY_FIELDS}
        if config.messages_field is not None:  # only when set: existing indexes keep their keys
            settings["messages_field"] = config.messages_field
        key_obj = {"version": INDEX_VERSION, "files": [_file_key(f) for f in files], "settings": settings,
                   "bad_lines": bad_lines}
        root = cache_root(index_dir)
        stem = f"{Path(files[0]).name}.{_digest([os.path.realpath(f) for f in files])}"
        self.index_path = root / f"{stem}.{_digest(key_obj)}.idx"
        meta = self._load_meta(key_obj)
        if meta is None and not build:
            raise IndexMissing(self.index_path)
        if meta is None:
            meta = self._build(root, stem, key_obj)
        self.n = int(meta["examples"])
        self.stats = ReadStats(self.name, records=meta["records"], examples=self.n)
        self.stats.skipped.update(meta["skipped"])
        self._fds: tuple[int, list[int]] | None = None

    # ------------------------------------------------------------ the index

    def _load_meta(self, key_obj: dict) -> dict | None:
        meta_path = self.index_path.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text())
            size = self.index_path.stat().st_size
        except (OSError, ValueError):
            return None
        if meta.get("key") != key_obj or size != meta.get("examples", -1) * self.dtype.itemsize:
            return None
        bad = {k: v for k, v in meta["skipped"].items() if k != "blank"}
        if bad:
            log.info("%s: %d examples (index %s), skipped %s", self.name, meta["examples"], self.index_path, bad)
        return meta

    def _entries(self) -> Iterator[tuple[tuple, tuple[int, ...], str, str]]:
        """(entry, raws, where, file) for each line (pair) after the header."""
        fmt, files = self.format, self.files
        if len(files) == 1:
            for n, (off, raw) in enumerate(_lines(files[0]), 1):
                if n > fmt.header_lines:
                    yield (off, len(raw), n), (raw,), f"{files[0]}:{n}", files[0]
            return
        a, b = _lines(files[0]), _lines(files[1])
        n = 0
        while True:
            x, y = next(a, None), next(b, None)
            if x is None or y is None:
                break
            n += 1
            yield (x[0], len(x[1]), y[0], len(y[1]), n), (x[1], y[1]), f"{files[0]}:{n} / {files[1]}:{n}", files[0]
        if x is not None or y is not None:
            n_a = n + (x is not None) + sum(1 for _ in a)
            n_b = n + (y is not None) + sum(1 for _ in b)
            raise self.fail(files[0], f"has {n_a} lines but {files[1]} has {n_b}; text pair files must be line-aligned")

    def _build(self, root: Path, stem: str, key_obj: dict) -> dict:
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{stem}.", suffix=".partial")
        except OSError as e:
            raise DataError(f"{root}: cannot write the line index of {self.files[0]} ({e.strerror}; "
                            f"set data.index_dir or $JAXFT_CACHE to a writable folder)") from None
        t0 = time.time()
        stats, cfg = self.stats, self.config
        stats.records = stats.examples = 0
        stats.skipped.clear()
        buf: list[tuple] = []
        try:
            with os.fdopen(fd, "wb") as out:
                for entry, raws, where, file in self._entries():
                    stats.records += 1
                    try:
                        texts = self.format.parse(*raws)
                    except FirstRecordLacksFields as e:
                        raise missing_fields_error(self.key, where, e.record, cfg.task) from None
                    if texts is None:
                        stats.skipped["blank"] += 1
                        continue
                    out_ex = self.example(*texts, where) if isinstance(texts, tuple) else texts
                    if isinstance(out_ex, str):
                        self.bad(where, out_ex, file)
                        continue
                    buf.append(entry)
                    stats.examples += 1
                    if len(buf) >= _FLUSH:
                        out.write(np.array(buf, self.dtype).tobytes())
                        buf.clear()
                    if cfg.max_examples is not None and stats.examples >= cfg.max_examples:
                        break
                if buf:
                    out.write(np.array(buf, self.dtype).tobytes())
            if stats.records == 0:
                raise self.fail(self.files[0], "file is empty (header only)")
            if stats.examples == 0:
                raise self.fail(self.files[0], f"no usable examples (skipped: {dict(stats.skipped)})")
            meta = {"key": key_obj, "records": stats.records, "examples": stats.examples,
                    "skipped": dict(sorted(stats.skipped.items())), "build_s": round(time.time() - t0, 3)}
            for old in root.glob(f"{stem}.*"):  # indexes of earlier versions of this file (not
                # this one: another process may have just built it and be reading it)
                if old.suffix in (".idx", ".json") and old.stem != self.index_path.stem:
                    old.unlink(missing_ok=True)
            os.replace(tmp, self.index_path)
            tmp_meta = self.index_path.with_name(f".{self.index_path.stem}.{os.getpid()}.json")
            tmp_meta.write_text(json.dumps(meta, indent=1))
            os.replace(tmp_meta, self.index_path.with_suffix(".json"))
        finally:
            Path(tmp).unlink(missing_ok=True)
        bad = {k: v for k, v in stats.skipped.items() if k != "blank"}
        log.info("%s: indexed %d examples of %d lines in %.1f s -> %s%s", self.name, stats.examples,
                 stats.records, time.time() - t0, self.index_path, f", skipped {bad}" if bad else "")
        return meta

    # ------------------------------------------------------ random access

    def _open(self) -> tuple[int, list[int]]:
        if self._fds is None or self._pid != os.getpid():
            self._fds = (os.open(self.index_path, os.O_RDONLY), [os.open(f, os.O_RDONLY) for f in self.files])
            self._pid = os.getpid()
        return self._fds

    def __len__(self) -> int:
        return self.n

    def _entry(self, i: int) -> np.void:
        if not 0 <= i < self.n:
            raise IndexError(f"{self.name}: example {i} out of range [0, {self.n})")
        idx, _ = self._open()
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(idx, size, i * size), self.dtype)[0]

    def _where(self, line: int) -> str:
        f = self.files
        return f"{f[0]}:{line}" if len(f) == 1 else f"{f[0]}:{line} / {f[1]}:{line}"

    def where(self, i: int) -> str:
        return self._where(int(self._entry(i)["line"]))

    def __getitem__(self, i: int) -> Example:
        i = int(i)
        e = self._entry(i)
        _, data = self._open()
        raws = [os.pread(data[0], int(e["len"]), int(e["off"]))]
        if len(data) == 2:
            raws.append(os.pread(data[1], int(e["len2"]), int(e["off2"])))
        texts = self.format.parse(*raws)
        where = self._where(int(e["line"]))
        ex = self.example(*texts, where) if isinstance(texts, tuple) else texts
        if not isinstance(ex, Example):
            raise DataError(f"{where}: changed since it was indexed ({self.index_path}); "
                            f"delete the index to rebuild it ({self.key})")
        return ex

    def __iter__(self) -> Iterator[Example]:
        """Every example in file order, read sequentially (the index in blocks, the file
        through a buffer): several times faster than ``[i]`` for i = 0, 1, ..."""
        size = self.dtype.itemsize
        with open(self.index_path, "rb") as idx:
            data = [open(f, "rb", buffering=1 << 20) for f in self.files]
            try:
                while block := idx.read(size * _FLUSH):
                    for e in np.frombuffer(block, self.dtype).tolist():
                        data[0].seek(e[0])
                        raws = [data[0].read(e[1])]
                        if len(data) == 2:
                            data[1].seek(e[2])
                            raws.append(data[1].read(e[3]))
                        texts = self.format.parse(*raws)
                        where = self._where(e[-1])
                        ex = self.example(*texts, where) if isinstance(texts, tuple) else texts
                        if not isinstance(ex, Example):
                            raise DataError(f"{where}: changed since it was indexed ({self.index_path}); "
                                            f"delete the index to rebuild it ({self.key})")
                        yield ex
            finally:
                for f in data:
                    f.close()

    @property
    def cache_key(self) -> str:
        """Identifies this file's content and parse settings (caches derived from it use it)."""
        return self.index_path.stem

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_fds"] = None
        return state

    def __del__(self) -> None:
        fds = getattr(self, "_fds", None)
        if fds is not None and getattr(self, "_pid", None) == os.getpid():
            for fd in (fds[0], *fds[1]):
                try:
                    os.close(fd)
                except OSError:
                    pass
