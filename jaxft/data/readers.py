"""Records -> Examples: the Example type, the bad-record policy, per-format parsing, and
``Source``, random access to one expanded source's examples.

Sources stay on disk: a ``Source`` holds an index (``jaxft.data.index`` for TSV / JSONL /
text files; the formats' own for ArrayRecord, TFDS, Parquet and Hugging Face datasets,
``jaxft.data.records``), never a list of its examples.  The policy table and the public
entry points (``open_source``, ``read_source``) are in ``jaxft.data.sources``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxft.config.errors import invalid_utf8
from jaxft.config.schema import SourceConfig
from jaxft.data.chat_messages import REASONS as CHAT_REASONS
from jaxft.data.chat_messages import record_messages

log = logging.getLogger(__name__)

REASONS = {
    "columns": "wrong number of columns",
    "json": "not a JSON object",
    "field": "field missing or not text",
    "empty": "empty source or target text",
    "utf8": "invalid UTF-8",
    **CHAT_REASONS,  # task: chat (jaxft.data.chat_messages)
}
_LOGGED_PER_FILE = 3
# Tasks on monolingual text (the text is the Example's ``tgt``, ``src`` is "").
MONOLINGUAL_TASKS = ("lm", "span_corruption", "infilling")
CHOICE_TASKS = ("multiple_choice", "classification")  # evaluation only: jaxft.data.choice
# Evaluation only: scored by their own measures (jaxft.eval.choice / generation), never trained on,
# no dev loss (read by jaxft.data.choice, not as Examples)
EVAL_TASKS = (*CHOICE_TASKS, "generation")


class DataError(ValueError):
    """Bad data or data config; the message is one line naming file and key."""


@dataclasses.dataclass(frozen=True)
class Example:
    src: str  # prompt-side text ("" for lm and chat)
    tgt: str  # target text (chat: the messages as JSON, jaxft.data.chat_messages)
    src_lang: str | None
    tgt_lang: str | None
    task: str  # "translation" | "prompt" | "lm" | "span_corruption" | "infilling" | "chat"
    where: str = dataclasses.field(default="", compare=False)  # "file:line" / "dataset:index"


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A record of a lazily checked source that the bad-record policy skips (``data.bad_lines:
    skip``); ``reason`` is a key of ``REASONS``."""

    reason: str
    where: str


@dataclasses.dataclass
class ReadStats:
    source: str
    records: int = 0  # lines / records looked at (header excluded)
    examples: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "records": self.records, "examples": self.examples,
                "skipped": dict(sorted(self.skipped.items()))}


def clean(text: str) -> str:
    return text.strip().strip("\ufeff").strip()


def decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


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


# ------------------------------------------------------------- record fields


def _pick(rec: dict, field: str) -> Any:
    if field in rec:
        return rec[field]
    nested = rec.get("translation")
    return nested.get(field) if isinstance(nested, dict) else None


def record_fields(s: SourceConfig, rec: Any) -> tuple[Any, Any]:
    """(src, tgt) values of one dict-like record under the source's field rules (None: missing)."""
    if not hasattr(rec, "get") or not hasattr(rec, "__contains__"):
        return None, None
    if s.task in MONOLINGUAL_TASKS:
        return "", _pick(rec, s.tgt_field or s.src_field or "text")
    if s.src_field or s.tgt_field or s.task == "translation":
        default = ("src", "tgt") if s.type in ("jsonl", "arrayrecord") else (s.src_lang, s.tgt_lang)
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


INVALID_UTF8 = object()


def as_text(value: Any) -> Any:
    """str, None (missing / not text) or ``INVALID_UTF8``: text fields may come as bytes or
    numpy scalars (TFDS, ArrayRecord)."""
    if isinstance(value, bytes):
        text = decode(value)
        return INVALID_UTF8 if text is None else text
    if hasattr(value, "tobytes") and getattr(value, "dtype", None) is not None and value.dtype.kind == "S":
        return as_text(value.tobytes())
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return as_text(value.item())
    return value if isinstance(value, str) else None


def record_texts(s: SourceConfig, rec: Any) -> tuple[str, str] | str:
    """(src, tgt) texts of one dict-like record, or the reason it is bad (``field`` / ``utf8``;
    task chat: ("", the conversation as JSON) or a reason of ``jaxft.data.chat_messages``)."""
    if s.task == "chat":
        out = record_messages(rec, s.messages_field)
        return out if out in REASONS else ("", out)
    src, tgt = record_fields(s, rec)
    src, tgt = as_text(src), as_text(tgt)
    if INVALID_UTF8 in (src, tgt):
        return "utf8"
    if src is None or tgt is None:
        return "field"
    return src, tgt


def missing_fields_error(key: str, where: str, rec: Any, task: str | None = None) -> DataError:
    """The error for a first record that lacks the configured fields (a config mistake, not bad data)."""
    keys = sorted(rec) if hasattr(rec, "keys") else []
    if task == "chat":
        return DataError(f"{where}: record lacks the messages field (keys: {keys}); set {key}.messages_field")
    return DataError(f"{where}: record lacks the configured src/tgt fields (keys: {keys}); "
                     f"set {key}.src_field / tgt_field")


# ----------------------------------------------------------------- sources


class Source:
    """Random access to the examples of one expanded source (``jaxft.data.sources.expand_sources``).

    ``source[i]`` is an ``Example`` or, for a source whose records are checked only when read
    (``checked_up_front`` False: ArrayRecord, TFDS, Parquet, HF datasets), a ``Skipped``
    record under ``data.bad_lines: skip`` (``error`` raises ``DataError`` naming
    ``dataset:index``).  Sources are picklable (worker processes re-open their files) and
    hold an index, never the examples.
    """

    checked_up_front = True  # every index is a usable Example (the index build applied the policy)

    def __init__(self, config: SourceConfig, key: str, bad_lines: str):
        if bad_lines not in ("skip", "error"):
            raise ValueError(f"data.bad_lines must be skip or error, got {bad_lines!r}")
        self.config, self.key, self.bad_lines = config, key, bad_lines
        self.stats = ReadStats(source=config.name or "?")
        self._logged = collections.Counter()

    @property
    def name(self) -> str:
        return self.config.name

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Example | Skipped:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Example | Skipped]:
        return (self[i] for i in range(len(self)))

    def where(self, i: int) -> str:
        """``file:line`` or ``dataset:index`` of example ``i``."""
        raise NotImplementedError

    def fail(self, where: str, msg: str) -> DataError:
        return DataError(f"{where}: {msg} ({self.key})")

    def bad(self, where: str, reason: str, file: str, *, count: bool = True) -> Skipped:
        """The bad-record policy: ``error`` raises naming ``where``; ``skip`` logs the first 3
        per file (and counts the reason in ``stats`` when ``count``)."""
        msg = f"{where}: {REASONS[reason]}"
        if self.bad_lines == "error":
            raise DataError(f"{msg} ({self.key}; data.bad_lines: skip would skip it)")
        if count:
            self.stats.skipped[reason] += 1
        if self._logged[file] < _LOGGED_PER_FILE:
            self._logged[file] += 1
            log.warning("skipping %s", msg)
        return Skipped(reason, where)

    def example(self, src: str, tgt: str, where: str) -> Example | str:
        """The cleaned Example, or ``"empty"``."""
        src, tgt = clean(src), clean(tgt)
        if not tgt or (self.config.task not in (*MONOLINGUAL_TASKS, "chat") and not src):
            return "empty"
        c = self.config
        return Example(src, tgt, c.src_lang, c.tgt_lang, c.task, where)

    def from_record(self, rec: Any, where: str, file: str) -> Example | Skipped:
        """A dict-like record -> Example, or the policy applied (lazily checked sources)."""
        texts = record_texts(self.config, rec)
        out = self.example(*texts, where) if isinstance(texts, tuple) else texts
        return self.bad(where, out, file, count=False) if isinstance(out, str) else out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_logged"] = collections.Counter()
        return state


# ------------------------------------------------------------ line formats


class LineFormat:
    """How one line (one line of each of two line-aligned files for text pairs) of a TSV,
    JSONL or text source becomes ``(src, tgt)`` texts: ``parse`` returns them, the reason a
    line is bad (a key of ``REASONS``), or None for a blank line."""

    header_lines = 0

    def __init__(self, source: Source):
        self.source, self.config = source, source.config
        self.lm = self.config.task in MONOLINGUAL_TASKS

    @property
    def files(self) -> tuple[str, ...]:
        c = self.config
        return (c.path,) if c.path is not None else (c.src_path, c.tgt_path)

    def parse(self, *raws: bytes) -> tuple[str, str] | str | None:
        raise NotImplementedError


def _first_line(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.readline().rstrip(b"\n").rstrip(b"\r")


class TsvFormat(LineFormat):
    def __init__(self, source: Source):
        super().__init__(source)
        c, fail, path = self.config, source.fail, self.config.path
        if c.header:
            head = decode(_first_line(path))
            if head is None:
                raise fail(f"{path}:1", "header row is not valid UTF-8")
            names = [clean(x) for x in head.split("\t")]
            self.n_cols, self.header_lines = len(names), 1

            def col(field: str | None, default: int, which: str) -> int:
                if field is None:
                    if default >= self.n_cols:
                        raise fail(path, f"header has {self.n_cols} column(s), need {default + 1}")
                    return default
                if field not in names:
                    raise fail(path, f"column {field!r} not in header {names} ({source.key}.{which})")
                return names.index(field)
        else:
            self.n_cols = len((decode(_first_line(path)) or "").split("\t"))

            def col(field: str | None, default: int, which: str) -> int:
                idx = default if field is None else int(field) if str(field).isdigit() else -1
                if not 0 <= idx < self.n_cols:
                    raise fail(path, f"column {field!r} not in 0..{self.n_cols - 1} ({source.key}.{which})")
                return idx

        src_f, tgt_f = c.src_field, c.tgt_field
        self.tgt_c = col(tgt_f if not self.lm else (tgt_f or src_f), 0 if self.lm else 1, "tgt_field")
        self.src_c = None if self.lm else col(src_f, 0, "src_field")

    def parse(self, raw: bytes) -> tuple[str, str] | str | None:
        text = decode(raw)
        if text is None:
            return "utf8"
        if not clean(text):
            return None
        cols = text.split("\t")
        if len(cols) != self.n_cols:
            return "columns"
        return ("" if self.src_c is None else cols[self.src_c]), cols[self.tgt_c]


class FirstRecordLacksFields(Exception):
    """Raised by ``JsonlFormat.parse`` for a first JSON object without the configured fields."""

    def __init__(self, record: dict):
        super().__init__("first record lacks the configured fields")
        self.record = record


class JsonlFormat(LineFormat):
    def __init__(self, source: Source):
        super().__init__(source)
        self.seen_object = False  # a first object without the fields is a config error

    def parse(self, raw: bytes) -> tuple[str, str] | str | None:
        text = decode(raw)
        if text is None:
            return "utf8"
        text = clean(text)
        if not text:
            return None
        try:
            rec = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            return "json"
        if not isinstance(rec, dict):
            return "json"
        out = record_texts(self.config, rec)
        if out == "field" and not self.seen_object:
            raise FirstRecordLacksFields(rec)
        self.seen_object = True
        return out


class TextFormat(LineFormat):
    """Monolingual text (``path``: one text per line) or line-aligned pairs (``src_path`` +
    ``tgt_path``)."""

    def parse(self, *raws: bytes) -> tuple[str, str] | str | None:
        texts = [decode(r) for r in raws]
        if None in texts:
            return "utf8"
        if not any(clean(t) for t in texts):
            return None
        return ("", texts[0]) if len(texts) == 1 else (texts[0], texts[1])


LINE_FORMATS: dict[str, type[LineFormat]] = {"tsv": TsvFormat, "jsonl": JsonlFormat, "text": TextFormat}
