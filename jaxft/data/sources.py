"""Data sources: expand the config's source list, read each source into Examples.

Formats (``SourceConfig.type``):

* ``tsv``: a header row names the columns; ``src_field``/``tgt_field`` pick
  columns by name (default: the first two; for ``lm`` the first).  Without a
  header (``header: false``) they are 0-based column numbers.  No quoting: a
  tab always separates columns.
* ``jsonl``: one JSON object per line.  Fields default to ``src``/``tgt``
  (translation; also HF-style ``{"translation": {lang: text}}``),
  ``inputs``/``targets`` (prompt, xP3) or Alpaca ``instruction`` + ``input``
  -> ``output`` when those keys are present, ``text`` (lm).
* ``text``: ``src_path`` + ``tgt_path``, line-aligned pairs; or ``path``,
  one monolingual text per line (task ``lm``).
* ``tfds``: ``tfds.data_source(tfds_name, split=tfds_split,
  data_dir=tfds_data_dir)`` (array_record); fields default to the language
  codes (translation datasets hold ``{lang: text}``), ``inputs``/``targets``,
  ``text``.

Every text is stripped of surrounding whitespace and byte-order marks.  Files
are read as bytes and decoded line by line, so one bad line cannot hide others.

Bad input policy:

| input                                               | behaviour                                   |
|-----------------------------------------------------|---------------------------------------------|
| missing file / TFDS dataset                         | error: names file and config key            |
| empty file (no line but a header or blank lines)    | error: names file and config key            |
| column / field name not in the header / 1st record  | error: names file, column and config key    |
| unknown language code                               | error: names the config key                 |
| text pair files with different line counts          | error: names both files and both counts     |
| no usable example left after skipping               | error: names file and the skip counts       |
| wrong column count (TSV)                            | ``data.bad_lines``: ``skip`` (counted as ``columns``) or ``error`` naming ``file:line`` |
| JSON decode error, not an object (JSONL)            | same, counted as ``json``                   |
| field missing / not text in a later record (JSONL)  | same, counted as ``field``                  |
| empty source or target text                         | same, counted as ``empty``                  |
| invalid UTF-8                                       | same, counted as ``utf8``                   |
| blank line (or blank line pair)                     | always skipped, counted as ``blank``        |
| byte-order mark, surrounding whitespace             | stripped, not counted                       |
| sequence longer than ``data.seq_len`` tokens        | ``data.overlong`` (see ``jaxft.data.tasks``) |

Skipped lines are counted per reason in ``ReadStats.skipped``; the first 3 per
file are logged as ``file:line: reason``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from jaxft.config.schema import SourceConfig
from jaxft.data.languages import UnknownLanguageError, language_name
from jaxft.data.readers import MONOLINGUAL_TASKS, READERS, REASONS, DataError, Example, Reader, ReadStats

__all__ = ["MONOLINGUAL_TASKS", "REASONS", "DataError", "Example", "ReadStats", "expand_sources",
           "keyed_sources", "read_source"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------- config


def _split_direction(direction: str, key: str) -> tuple[str, str]:
    parts = direction.split("-")
    candidates = []
    for i in range(1, len(parts)):
        src, tgt = "-".join(parts[:i]), "-".join(parts[i:])
        try:
            language_name(src), language_name(tgt)
        except UnknownLanguageError:
            continue
        candidates.append((src, tgt))
    if len(candidates) != 1:
        why = "ambiguous" if candidates else "not <src>-<tgt> with known language codes"
        raise DataError(f"{key}: direction {direction!r} is {why}")
    return candidates[0]


def _check_lang(code: str | None, key: str) -> None:
    if code is None:
        return
    try:
        language_name(code)
    except UnknownLanguageError as e:
        raise DataError(f"{key}: {e}") from None


def _substitute(value: str | None, subs: dict[str, str]) -> str | None:
    if value is None:
        return None
    for name, sub in subs.items():
        value = value.replace("{" + name + "}", sub)
    return value


def _resolve(path: str | None, base_dir: Path) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else Path(base_dir) / p)


def _finish(src: SourceConfig, key: str, base_dir: Path, split: str | None) -> SourceConfig:
    subs = {"src": src.src_lang or "", "tgt": src.tgt_lang or ""}
    if split is not None:
        subs["split"] = split
    paths = {f: _resolve(_substitute(getattr(src, f), subs), base_dir)
             for f in ("path", "src_path", "tgt_path", "tfds_data_dir")}
    src = dataclasses.replace(src, **paths, tfds_name=_substitute(src.tfds_name, subs),
                              tfds_split=_substitute(src.tfds_split, subs))
    if src.type == "tfds":
        if not src.tfds_name:
            raise DataError(f"{key}.tfds_name: required for type tfds")
    elif src.type == "text" and src.path is None:
        if not (src.src_path and src.tgt_path):
            raise DataError(f"{key}: type text needs `path` (lm) or `src_path` and `tgt_path`")
    elif src.path is None:
        raise DataError(f"{key}.path: required for type {src.type}")
    if src.type == "text" and src.path is not None and src.task not in MONOLINGUAL_TASKS:
        raise DataError(f"{key}: monolingual text (`path`) needs task {' / '.join(MONOLINGUAL_TASKS)}; "
                        f"use src_path/tgt_path for pairs")
    if src.task == "translation" and not (src.src_lang and src.tgt_lang):
        raise DataError(f"{key}: translation needs src_lang and tgt_lang (or directions)")
    if src.max_examples is not None and src.max_examples < 1:
        raise DataError(f"{key}.max_examples: must be >= 1")
    if src.weight is not None and not src.weight > 0:
        raise DataError(f"{key}.weight: must be > 0")
    if src.name is None:
        if src.src_lang and src.tgt_lang:
            name = f"{src.src_lang}-{src.tgt_lang}"
        elif src.type == "tfds":
            name = src.tfds_name
        else:
            name = Path(src.path or src.src_path).stem
        src = dataclasses.replace(src, name=name)
    return src


def keyed_sources(
    sources: Sequence[SourceConfig], base_dir: Path, *, section: str = "data.train",
    split: str | None = None,
) -> list[tuple[str, SourceConfig]]:
    """Like ``expand_sources``, paired with each source's config key."""
    out: list[tuple[str, SourceConfig]] = []
    for i, src in enumerate(sources):
        key = f"{section}[{i}]"
        _check_lang(src.src_lang, f"{key}.src_lang")
        _check_lang(src.tgt_lang, f"{key}.tgt_lang")
        if not src.directions:
            out.append((key, _finish(src, key, base_dir, split)))
            continue
        if src.src_lang or src.tgt_lang:
            raise DataError(f"{key}: set either directions or src_lang/tgt_lang, not both")
        for j, direction in enumerate(src.directions):
            dkey = f"{key}.directions[{j}]"
            s, t = _split_direction(direction, dkey)
            one = dataclasses.replace(src, directions=(), src_lang=s, tgt_lang=t,
                                      name=f"{src.name}/{s}-{t}" if src.name else None)
            out.append((dkey, _finish(one, dkey, base_dir, split)))
    seen: dict[str, str] = {}
    for key, src in out:
        if src.name in seen:
            raise DataError(f"{key}: source name {src.name!r} already used by {seen[src.name]}")
        seen[src.name] = key
    return out


def expand_sources(
    sources: Sequence[SourceConfig], base_dir: Path, *, section: str = "data.train",
    split: str | None = None,
) -> list[SourceConfig]:
    """One source per direction, with languages, names and absolute paths filled in.

    ``{src}``/``{tgt}`` (and ``{split}`` when ``split`` is given) in paths are
    substituted; errors name the config key (``data.train[1].directions[0]``).
    """
    return [s for _, s in keyed_sources(sources, base_dir, section=section, split=split)]


def read_source(
    src: SourceConfig, *, key: str | None = None, bad_lines: str = "skip"
) -> tuple[list[Example], ReadStats]:
    """Read one expanded source (see ``expand_sources``) into memory.

    ``key`` is the source's config key for error messages; ``bad_lines`` is
    ``data.bad_lines`` (see the module docstring for the policy).
    """
    if bad_lines not in ("skip", "error"):
        raise ValueError(f"data.bad_lines must be skip or error, got {bad_lines!r}")
    r = Reader(src, key or f"source {src.name!r}", bad_lines)
    READERS[src.type](r)
    r.stats.examples = len(r.examples)
    if not r.examples:
        where = src.path or src.src_path or f"tfds:{src.tfds_name}"
        raise r.fail(where, f"no usable examples (skipped: {dict(r.stats.skipped)})")
    bad = {k: v for k, v in r.stats.skipped.items() if k != "blank"}
    if bad:
        log.info("%s: read %d examples, skipped %s", src.name, len(r.examples), bad)
    return r.examples, r.stats
