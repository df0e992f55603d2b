"""Where a config key was set, the one-line error that names it, and one-line errors for
files that are not what they should be (bad UTF-8, bad JSON)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from jaxft.paths import as_path

Key = tuple[str | int, ...]  # ("data", "train", 2, "src_lang")
Tree = dict[str, Any]
Origins = dict[Key, "Origin"]


@dataclass(frozen=True)
class Origin:
    """Where a key was set: a file (and line), or ``--set``."""

    source: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source


class ConfigError(ValueError):
    """A config problem; ``str()`` is one line: ``file:line: key.path: message``."""

    def __init__(self, message: str, key: Key = (), origin: Origin | None = None):
        text = (f"{origin}: " if origin else "") + (f"{format_key(key)}: " if key else "") + message
        super().__init__(re.sub(r"\s*\n\s*", " ", text))


def format_key(key: Key) -> str:
    """``("data", "train", 2, "src_lang")`` -> ``data.train[2].src_lang``."""
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class FileFormatError(ValueError):
    """A file that is not what it should be (bad UTF-8, bad JSON...); ``str()`` is one
    line that starts with the file's path (and line, when known)."""


def utf8_position(raw: bytes, error: UnicodeDecodeError) -> tuple[int, int]:
    """(line, column), both from 1, of the first undecodable byte of ``raw``."""
    line = raw.count(b"\n", 0, error.start) + 1
    return line, error.start - raw.rfind(b"\n", 0, error.start)


def invalid_utf8(path: Any, raw: bytes, error: UnicodeDecodeError, line_offset: int = 0) -> FileFormatError:
    """``path:line: invalid UTF-8 (byte 0xff at column 5)``; ``line_offset`` is added to the line."""
    line, col = utf8_position(raw, error)
    return FileFormatError(f"{path}:{line + line_offset}: invalid UTF-8 "
                           f"(byte 0x{raw[error.start]:02x} at column {col})")


def read_json(path: Any, what: str = "JSON", *, expect: type | None = dict) -> Any:
    """The JSON content of ``path``; a file that is not UTF-8 JSON (of type ``expect``,
    an object by default) raises a one-line ``FileFormatError`` naming it (and line:column).
    OS errors (missing file, permissions) propagate."""
    raw = as_path(path).read_bytes()  # a local path or a URL
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise invalid_utf8(path, raw, e) from None
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}:{e.lineno}:{e.colno}: not valid {what}: {e.msg}") from None
    except RecursionError:
        raise FileFormatError(f"{path}: not valid {what}: nested too deeply") from None
    if expect is not None and not isinstance(data, expect):
        kinds = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
                 bool: "a boolean", type(None): "null"}
        raise FileFormatError(f"{path}: expected {kinds.get(expect, expect.__name__)} in this {what} file, "
                              f"got {kinds.get(type(data), type(data).__name__)}")
    return data
