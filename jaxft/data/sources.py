"""Data sources: expand the config's source list; open each source for random access.

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
* ``arrayrecord`` / ``parquet`` / ``hf``: ArrayRecord shards of JSON records,
  Parquet files, Hugging Face datasets (``jaxft.data.records``); fields as for
  ``tfds``.  ``{src}``/``{tgt}`` in ``src_field``/``tgt_field`` are substituted,
  so one-column-per-language (FLORES-style) sets give any direction.

Task ``chat`` reads a list of messages (``messages_field``, default ``messages``) from
jsonl / arrayrecord / parquet / hf records (``jaxft.data.chat_messages``, ``jaxft.data.chat``).

TSV, JSONL and text files are read through a cached line-offset index
(``jaxft.data.index``): the bad-line policy is applied once, when the index is
built.  The other types are checked record by record when read.  Every text is
stripped of surrounding whitespace and byte-order marks.  Files are read as
bytes and decoded line by line, so one bad line cannot hide others.

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
| chat: messages not a list of objects / a role not system, user or assistant / a content not text / no assistant message | same, counted as ``messages`` / ``role`` / ``content`` / ``no_assistant`` |
| chat: no messages field in the first record (JSONL) | error: names file, keys and ``messages_field`` |
| missing path / folder without shards / empty glob (arrayrecord, parquet, hf) | error: names the path and config key |
| not an ArrayRecord / Parquet file, not a save_to_disk folder, no such split | error: names the file and config key |
| HF dataset not loadable (not found, offline, config / split)  | error: names ``hf:name[split]`` and the config key |
| ``datasets`` not installed (type hf)                          | error: ``pip install 'jaxft[hf]'``          |
| Parquet files with different columns                          | error: names the file                       |
| bad record of arrayrecord / tfds / parquet / hf (not a JSON object, field missing, empty, invalid UTF-8) | checked when read: counted skip or error naming ``file:index`` / ``dataset:index`` |
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
from jaxft.data.index import LineSource
from jaxft.data.readers import EVAL_TASKS, MONOLINGUAL_TASKS, REASONS, DataError, Example, ReadStats, Skipped, Source
from jaxft.paths import is_remote

__all__ = ["MONOLINGUAL_TASKS", "REASONS", "SOURCES", "DataError", "Example", "ReadStats", "Skipped", "Source",
           "expand_sources", "keyed_sources", "open_source", "read_source"]

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
    if path is None or is_remote(path):  # a URL (gs://...) is kept as written
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else Path(base_dir) / p)


def _finish(src: SourceConfig, key: str, base_dir: Path, split: str | None) -> SourceConfig:
    subs = {"src": src.src_lang or "", "tgt": src.tgt_lang or ""}
    if split is not None:
        subs["split"] = split
    paths = {f: _resolve(_substitute(getattr(src, f), subs), base_dir)
             for f in ("path", "src_path", "tgt_path", "tfds_data_dir")}
    src = dataclasses.replace(src, **paths, tfds_name=_substitute(src.tfds_name, subs),
                              tfds_split=_substitute(src.tfds_split, subs),
                              src_field=_substitute(src.src_field, subs), tgt_field=_substitute(src.tgt_field, subs),
                              hf_name=_substitute(src.hf_name, subs), hf_split=_substitute(src.hf_split, subs))
    if src.type == "tfds":
        if not src.tfds_name:
            raise DataError(f"{key}.tfds_name: required for type tfds")
    elif src.type == "hf":
        if (src.path is None) == (src.hf_name is None):
            raise DataError(f"{key}: type hf needs `path` (a save_to_disk folder) or `hf_name` (a hub id), not both")
    elif src.type == "text" and src.path is None:
        if not (src.src_path and src.tgt_path):
            raise DataError(f"{key}: type text needs `path` (lm) or `src_path` and `tgt_path`")
    elif src.path is None:
        raise DataError(f"{key}.path: required for type {src.type}")
    if src.type == "text" and src.path is not None and src.task not in MONOLINGUAL_TASKS:
        raise DataError(f"{key}: monolingual text (`path`) needs task {' / '.join(MONOLINGUAL_TASKS)}; "
                        f"use src_path/tgt_path for pairs")
    if src.task == "chat" and src.type not in ("jsonl", "arrayrecord", "parquet", "hf"):
        raise DataError(f"{key}.type: task chat reads records holding a list of messages: "
                        f"use jsonl, arrayrecord, parquet or hf, not {src.type}")
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
        elif src.hf_name is not None:
            name = src.hf_name.removeprefix("hf:").rstrip("/").rsplit("/", 1)[-1]
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
        if src.task in EVAL_TASKS and section == "data.train":
            raise DataError(f"{key}.task: {src.task} is for evaluation only (data.dev / data.test): "
                            "it is scored, not trained on")
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


def _record_sources() -> dict[str, type[Source]]:
    from jaxft.data import records  # TFDS / ArrayRecord / Parquet / HF: heavy imports, only when used

    return records.RECORD_SOURCES


SOURCES: dict[str, type[Source]] = {"tsv": LineSource, "jsonl": LineSource, "text": LineSource}


def open_source(src: SourceConfig, *, key: str | None = None, bad_lines: str = "skip",
                index_dir: str | None = None) -> Source:
    """Random access to one expanded source (see ``expand_sources``), nothing read into memory.

    ``key`` is the source's config key for error messages; ``bad_lines`` is
    ``data.bad_lines`` (see the module docstring for the policy); ``index_dir`` is
    ``data.index_dir`` (the line-index cache of TSV / JSONL / text files).
    """
    if bad_lines not in ("skip", "error"):
        raise ValueError(f"data.bad_lines must be skip or error, got {bad_lines!r}")
    kinds = SOURCES if src.type in SOURCES else _record_sources()
    if src.type not in kinds:
        raise DataError(f"{key or src.name}.type: unknown source type {src.type!r}")
    _check_local(src, key or src.name)
    return kinds[src.type](src, key or f"source {src.name!r}", bad_lines, index_dir=index_dir)


def _check_local(src: SourceConfig, key: str) -> None:
    """URLs (gs://...) are read for tsv / jsonl / text (through local copies: `jaxft.data.index`)."""
    if src.type not in SOURCES and src.path and is_remote(src.path):
        raise DataError(f"{key}.path: type {src.type} reads local files only; copy {src.path} to a local "
                        "disk (URLs work for tsv, jsonl and text sources)")


def read_source(
    src: SourceConfig, *, key: str | None = None, bad_lines: str = "skip", index_dir: str | None = None,
) -> tuple[list[Example], ReadStats]:
    """Every example of one expanded source, in order, in memory: for small sources (dev
    sets, tests); training reads through ``open_source``.  The stats count the records
    skipped by the bad-record policy, whether found when indexing or when read."""
    source = open_source(src, key=key, bad_lines=bad_lines, index_dir=index_dir)
    examples, skipped = [], []
    for ex in source:  # one pass: each bad record is read (and logged) once
        (examples if isinstance(ex, Example) else skipped).append(ex)
    stats = source.stats
    if not source.checked_up_front:
        stats.examples = len(examples)
        stats.skipped.update(ex.reason for ex in skipped)
        if not examples:
            raise source.fail(source.where(0).rsplit(":", 1)[0],
                              f"no usable examples (skipped: {dict(stats.skipped)})")
    if src.max_examples is not None:
        examples = examples[: src.max_examples]
    return examples, stats
