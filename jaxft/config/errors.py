"""Where a config key was set, and the one-line error that names it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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
