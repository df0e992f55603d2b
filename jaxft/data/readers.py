"""Per-format readers (TSV, JSONL, text, TFDS) -> Examples, with the bad-line policy.

The policy table and the public entry point (``read_source``) are in
``jaxft.data.sources``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jaxft.config.errors import invalid_utf8
from jaxft.config.schema import SourceConfig

log = logging.getLogger(__name__)

REASONS = {
    "columns": "wrong number of columns",
    "json": "not a JSON object",
    "field": "field missing or not text",
    "empty": "empty source or target text",
    "utf8": "invalid UTF-8",
}
_LOGGED_PER_FILE = 3
# Tasks on monolingual text (the text is the Example's ``tgt``, ``src`` is "").
MONOLINGUAL_TASKS = ("lm", "span_corruption", "infilling")


class DataError(ValueError):
    """Bad data or data config; the message is one line naming file and key."""


@dataclasses.dataclass(frozen=True)
class Example:
    src: str  # prompt-side text ("" for lm)
    tgt: str  # target text
    src_lang: str | None
    tgt_lang: str | None
    task: str  # "translation" | "prompt" | "lm" | "span_corruption" | "infilling"


@dataclasses.dataclass
class ReadStats:
    source: str
    records: int = 0  # lines / records looked at (header excluded)
    examples: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "records": self.records, "examples": self.examples,
                "skipped": dict(sorted(self.skipped.items()))}


class Reader:
    """Shared bookkeeping for one source: stats, bad-line policy, limits."""

    def __init__(self, src: SourceConfig, key: str, bad_lines: str):
        self.src, self.key, self.policy = src, key, bad_lines
        self.stats = ReadStats(source=src.name or "?")
        self.examples: list[Example] = []
        self._logged = collections.Counter()

    def fail(self, where: str, msg: str) -> DataError:
        return DataError(f"{where}: {msg} ({self.key})")

    def bad(self, where: str, reason: str, file: str) -> None:
        msg = f"{where}: {REASONS[reason]}"
        if self.policy == "error":
            raise DataError(f"{msg} ({self.key}; data.bad_lines: skip would skip it)")
        self.stats.skipped[reason] += 1
        if self._logged[file] < _LOGGED_PER_FILE:
            self._logged[file] += 1
            log.warning("skipping %s", msg)

    def add(self, where: str, file: str, src: str, tgt: str) -> bool:
        """Adds an example; False once ``max_examples`` is reached."""
        src, tgt = _clean(src), _clean(tgt)
        if not tgt or (self.src.task not in MONOLINGUAL_TASKS and not src):
            self.bad(where, "empty", file)
            return True
        self.examples.append(Example(src, tgt, self.src.src_lang, self.src.tgt_lang, self.src.task))
        return self.src.max_examples is None or len(self.examples) < self.src.max_examples


def _clean(text: str) -> str:
    return text.strip().strip("\ufeff").strip()


def read_text_lines(path: str | Path, name: str | None = None) -> Iterator[str]:
    """The lines of a UTF-8 text file (or binary stream) without line ends or a leading
    byte-order mark, read lazily; invalid UTF-8 raises ``DataError`` naming ``file:line``."""
    name = str(path) if name is None else name
    with (open(path, "rb") if isinstance(path, (str, Path)) else contextlib.nullcontext(path)) as f:
        for n, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(str(invalid_utf8(name, raw, e, n - 1))) from None
            yield line.removeprefix("\ufeff") if n == 1 else line


def _read_lines(path: str, r: Reader, what: str) -> list[bytes]:
    p = Path(path)
    if p.is_dir():
        raise r.fail(path, f"{what} is a folder, not a file")
    if not p.is_file():
        raise r.fail(path, f"{what} does not exist")
    lines = p.read_bytes().split(b"\n")
    if lines and lines[-1] in (b"", b"\r"):
        lines.pop()
    if not any(_clean(line.decode("utf-8", "replace")) for line in lines):
        raise r.fail(path, "file is empty")
    return [line.rstrip(b"\r") for line in lines]


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_tsv(r: Reader) -> None:
    path = r.src.path
    lines = _read_lines(path, r, "file")
    src_f, tgt_f = r.src.src_field, r.src.tgt_field
    lm = r.src.task in MONOLINGUAL_TASKS
    start = 0
    if r.src.header:
        head = _decode(lines[0])
        if head is None:
            raise r.fail(f"{path}:1", "header row is not valid UTF-8")
        names = [_clean(c) for c in head.split("\t")]
        n_cols, start = len(names), 1

        def col(field: str | None, default: int, which: str) -> int:
            if field is None:
                if default >= n_cols:
                    raise r.fail(path, f"header has {n_cols} column(s), need {default + 1}")
                return default
            if field not in names:
                raise r.fail(path, f"column {field!r} not in header {names} ({r.key}.{which})")
            return names.index(field)
    else:
        first = _decode(lines[0]) or ""
        n_cols = len(first.split("\t"))

        def col(field: str | None, default: int, which: str) -> int:
            idx = default if field is None else int(field) if str(field).isdigit() else -1
            if not 0 <= idx < n_cols:
                raise r.fail(path, f"column {field!r} not in 0..{n_cols - 1} ({r.key}.{which})")
            return idx

    tgt_c = col(tgt_f if not lm else (tgt_f or src_f), 0 if lm else 1, "tgt_field")
    src_c = None if lm else col(src_f, 0, "src_field")
    if start >= len(lines):
        raise r.fail(path, "file is empty (header only)")
    for n, raw in enumerate(lines[start:], start + 1):
        r.stats.records += 1
        where = f"{path}:{n}"
        text = _decode(raw)
        if text is None:
            r.bad(where, "utf8", path)
            continue
        if not _clean(text):
            r.stats.skipped["blank"] += 1
            continue
        cols = text.split("\t")
        if len(cols) != n_cols:
            r.bad(where, "columns", path)
            continue
        if not r.add(where, path, "" if lm else cols[src_c], cols[tgt_c]):
            break


def _pick(rec: dict, field: str) -> Any:
    if field in rec:
        return rec[field]
    nested = rec.get("translation")
    return nested.get(field) if isinstance(nested, dict) else None


def _fields(r: Reader, rec: dict) -> tuple[str | None, str | None]:
    """(src, tgt) texts of one record under the source's field rules."""
    s = r.src
    if s.task in MONOLINGUAL_TASKS:
        return "", _pick(rec, s.tgt_field or s.src_field or "text")
    if s.src_field or s.tgt_field or s.task == "translation":
        default = ("src", "tgt") if s.type == "jsonl" else (s.src_lang, s.tgt_lang)
        if s.task == "prompt":
            default = ("inputs", "targets")
        if s.task == "translation" and "src" not in rec and "translation" in rec:
            default = (s.src_lang, s.tgt_lang)
        return _pick(rec, s.src_field or default[0]), _pick(rec, s.tgt_field or default[1])
    if "inputs" not in rec and "instruction" in rec:  # Alpaca
        inp = rec.get("input") or ""
        inst = rec["instruction"]
        if isinstance(inst, str) and isinstance(inp, str):
            return (inst + "\n\n" + inp if inp.strip() else inst), rec.get("output")
        return None, None
    return rec.get("inputs"), rec.get("targets")


_INVALID_UTF8 = object()


def _as_text(value: Any) -> Any:
    """str, None (missing / not text) or ``_INVALID_UTF8``."""
    if isinstance(value, bytes):
        text = _decode(value)
        return _INVALID_UTF8 if text is None else text
    if hasattr(value, "tobytes") and getattr(value, "dtype", None) is not None and value.dtype.kind == "S":
        return _decode(value.tobytes())
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return _as_text(value.item())
    return value if isinstance(value, str) else None


def _take_record(r: Reader, rec: Any, where: str, file: str, first: bool) -> bool:
    src, tgt = _fields(r, rec)
    src, tgt = _as_text(src), _as_text(tgt)
    if _INVALID_UTF8 in (src, tgt):
        r.bad(where, "utf8", file)
        return True
    if src is None or tgt is None:
        if first:
            keys = sorted(rec) if isinstance(rec, dict) else []
            raise r.fail(where, f"record lacks the configured src/tgt fields (keys: {keys}); "
                         f"set {r.key}.src_field / tgt_field")
        r.bad(where, "field", file)
        return True
    return r.add(where, file, src, tgt)


def _read_jsonl(r: Reader) -> None:
    path = r.src.path
    first = True
    for n, raw in enumerate(_read_lines(path, r, "file"), 1):
        r.stats.records += 1
        where = f"{path}:{n}"
        text = _decode(raw)
        if text is None:
            r.bad(where, "utf8", path)
            continue
        text = _clean(text)
        if not text:
            r.stats.skipped["blank"] += 1
            continue
        try:
            rec = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            rec = None
        if not isinstance(rec, dict):
            r.bad(where, "json", path)
            continue
        more = _take_record(r, rec, where, path, first)
        first = False
        if not more:
            break


def _read_text(r: Reader) -> None:
    s = r.src
    if s.path is not None:  # monolingual, one text per line
        pairs: Iterator = ((None, line) for line in _read_lines(s.path, r, "file"))
        files = s.path
    else:
        src_lines = _read_lines(s.src_path, r, "source file")
        tgt_lines = _read_lines(s.tgt_path, r, "target file")
        if len(src_lines) != len(tgt_lines):
            raise r.fail(s.src_path, f"has {len(src_lines)} lines but {s.tgt_path} has "
                         f"{len(tgt_lines)}; text pair files must be line-aligned")
        pairs, files = zip(src_lines, tgt_lines), s.src_path
    for n, (raw_s, raw_t) in enumerate(pairs, 1):
        r.stats.records += 1
        where = f"{s.path}:{n}" if s.path else f"{s.src_path}:{n} / {s.tgt_path}:{n}"
        src = "" if raw_s is None else _decode(raw_s)
        tgt = _decode(raw_t)
        if src is None or tgt is None:
            r.bad(where, "utf8", files)
            continue
        if not _clean(src) and not _clean(tgt):
            r.stats.skipped["blank"] += 1
            continue
        if not r.add(where, files, src, tgt):
            break


def _read_tfds(r: Reader) -> None:
    import tensorflow_datasets as tfds  # heavy import; only when used

    s = r.src
    try:
        ds = tfds.data_source(s.tfds_name, split=s.tfds_split, data_dir=s.tfds_data_dir)
    except Exception as e:  # noqa: BLE001 - tfds raises many types; report one line
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise r.fail(f"tfds:{s.tfds_name}[{s.tfds_split}]", f"cannot open: {first_line}") from None
    name = f"tfds:{s.tfds_name}[{s.tfds_split}]"
    if len(ds) == 0:
        raise r.fail(name, "dataset split is empty")
    for i in range(len(ds)):
        r.stats.records += 1
        if not _take_record(r, ds[i], f"{name}:{i}", name, i == 0):
            break


READERS: dict[str, Callable[["Reader"], None]] = {"tsv": _read_tsv, "jsonl": _read_jsonl, "text": _read_text, "tfds": _read_tfds}
