"""Chat records (``task: chat``): the ``messages`` list of one record, checked and kept as text.

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}``
(any other keys of a message are dropped) with at least one assistant message.  The readers
(``jaxft.data.readers``) check every record with ``record_messages`` under the bad-record
policy (``data.bad_lines``) and keep the conversation as canonical JSON in the Example's
``tgt`` (``src`` is ""), so every record format (JSONL, ArrayRecord, Parquet, HF datasets)
hands ``jaxft.data.chat`` the same thing.  The field may also hold the list as a JSON string.

A leaf module (no jaxft imports): the readers and ``jaxft.data.chat`` both use it.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant")
DEFAULT_FIELD = "messages"
# Reasons a chat record is bad (merged into ``jaxft.data.readers.REASONS``).
REASONS = {
    "messages": "messages is not a non-empty list of {role, content} objects",
    "role": "a message's role is not system, user or assistant",
    "content": "a message's content is missing or not text",
    "no_assistant": "no assistant message (nothing to train on)",
}


def _as_list(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return "utf8"
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return None
    return value.tolist() if hasattr(value, "tolist") else value  # numpy arrays of dicts


def _checked(rec: Any, field: str | None) -> list[dict[str, str]] | str:
    """The messages of a dict-like record, or the reason they are bad (``record_messages``)."""
    field = field or DEFAULT_FIELD
    if not hasattr(rec, "get") or field not in rec:
        return "field"
    value = _as_list(rec[field])
    if value == "utf8":
        return "utf8"
    if not isinstance(value, (list, tuple)) or not value:
        return "messages"
    out = []
    for m in value:
        if not hasattr(m, "get"):
            return "messages"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return "role"
        if not isinstance(content, str):
            return "content"
        out.append({"role": role, "content": content})
    return out


def record_messages(rec: Any, field: str | None) -> str:
    """The conversation of a dict-like record as canonical JSON, or the reason it is bad: a
    key of ``REASONS``, ``"field"`` (no such field) or ``"utf8"``."""
    out = _checked(rec, field)
    if isinstance(out, str):
        return out
    if not any(m["role"] == "assistant" for m in out):
        return "no_assistant"
    return json.dumps(out, ensure_ascii=False)


def prompt_messages(rec: Any, where: str, field: str | None = None) -> list[dict[str, str]]:
    """The conversation of an inference record (``jaxft chat --messages``), checked as in training
    but ending with a user turn (the reply is generated after it) and needing no assistant one;
    a bad record raises ``ValueError`` naming ``where``."""
    out = _checked(rec, field)
    if out == "field":
        raise ValueError(f"{where}: no {field or DEFAULT_FIELD!r} field")
    if isinstance(out, str):
        raise ValueError(f"{where}: {REASONS.get(out, 'invalid UTF-8')}")
    if out[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message is {out[-1]['role']!r}, not 'user' (the reply follows it)")
    return out


def load_messages(text: str) -> list[dict[str, str]]:
    """The messages of an Example's ``tgt`` (written by ``record_messages``)."""
    return json.loads(text)


def plain_text(text: str) -> str:
    """The message contents of an Example's ``tgt``, one per line (a tokenizer's training text)."""
    return "\n".join(m["content"] for m in load_messages(text) if m["content"].strip())
