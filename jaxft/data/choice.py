"""Evaluation-only task data: answer choice (`task: multiple_choice` / `classification`) and
generation (`task: generation`) sources, read from JSONL files or Hugging Face datasets.

Answer choice: every example becomes its answer options, each a (context, continuation) pair
of texts, and the index of the right one: the model scores ``log p(continuation | context)``
per option (`jaxft.eval.choice`).  Zero-shot multilingual benchmarks come in a few layouts
(`choice_format`), read here as the common prompt formats of mT0 / BLOOMZ / lm-eval:

| format      | fields                                                     | options                          |
|-------------|------------------------------------------------------------|----------------------------------|
| generic     | prompt, choices (list), label (index, or the right choice's text) | (prompt, choice)          |
| xnli        | premise, hypothesis, label (0 entail, 1 neutral, 2 contra) | ("<p> Question: <h> True, False or Neither? Answer:", True/Neither/False) |
| xcopa       | premise, question (cause / effect), choice1, choice2, label | ("<premise> because/therefore", choice) |
| xstorycloze | input_sentence_1..4, sentence_quiz1/2, answer_right_ending (1/2) | (the four sentences, ending) |
| xwinograd   | sentence (with "_"), option1, option2, answer ("1"/"2")    | (text up to "_" with the option, the rest) |

`classification`: ``text`` is the context, ``label`` the label as an index or one of the label
words ``choices``, which are the continuations.  `generation`: ``prompt`` (the text the model
continues), ``references`` (a text or a list of texts; default field ``references``, else
``reference``) and an optional per-record ``lang``; or `type: text` with ``src_path`` (prompts)
and ``tgt_path`` (references), line by line.

The field names are the record's own (the HF datasets of XNLI / XCOPA / XStoryCloze / XWinograd
use these); ``fields`` maps them otherwise ({prompt: question, choices: options, label: answer};
``a.b``: field b of the nested record a; ``f1,f2``: several fields as one list), and for
classification / generation ``src_field`` / ``tgt_field`` name text|prompt / label|references.
A missing field or a label out of range is a `DataError` naming file:line (dataset:index) and
the config key to set.  Sources are read in order and only as far as needed (``limit``).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from jaxft.config.schema import SourceConfig
from jaxft.config.schema_data import EVAL_TYPES, eval_fields
from jaxft.data.readers import CHOICE_TASKS, DataError, read_text_lines
from jaxft.data.sources import keyed_sources
from jaxft.paths import is_remote, local_copy

XNLI_WORDS = ("True", "Neither", "False")
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class ChoiceExample:
    options: tuple[tuple[str, str], ...]  # (context, continuation) per answer option
    label: int  # index of the right option
    where: str = ""  # file:line


@dataclasses.dataclass(frozen=True)
class GenerationExample:
    prompt: str
    references: tuple[str, ...]  # one or more
    lang: str | None  # the record's `lang`, else the source's tgt_lang / src_lang
    where: str = ""  # file:line


def task_sources(sources: Sequence[SourceConfig], base_dir: Path, section: str,
                 tasks: Sequence[str] = CHOICE_TASKS) -> list[tuple[str, SourceConfig]]:
    """The sources of ``sources`` (data.dev or data.test) with one of ``tasks``, expanded
    (names, absolute paths) and keyed, as `jaxft.data.sources.keyed_sources` does."""
    return [(key, src) for key, src in keyed_sources(sources, base_dir, section=section) if src.task in tasks]


def choice_sources(sources: Sequence[SourceConfig], base_dir: Path, section: str) -> list[tuple[str, SourceConfig]]:
    """The `multiple_choice` / `classification` sources of ``sources`` (`task_sources`)."""
    return task_sources(sources, base_dir, section, CHOICE_TASKS)


def _checked_source(src: SourceConfig, base_dir: Path, key: str) -> SourceConfig:
    allowed = EVAL_TYPES[src.task]
    if src.type not in allowed:
        raise DataError(f"{key}.type: task {src.task} reads {' / '.join(allowed)} sources, not {src.type}")
    known = eval_fields(src.task, src.choice_format)
    for name in src.fields:
        if name not in known:
            what = f"choice_format {src.choice_format}" if src.task == "multiple_choice" else f"task {src.task}"
            raise DataError(f"{key}.fields.{name}: not a field of {what} (one of: {', '.join(known)})")
    resolve = {f: str(base_dir / p) for f in ("path", "src_path", "tgt_path")
               if (p := getattr(src, f)) and not is_remote(p) and not Path(p).is_absolute()}
    return dataclasses.replace(src, **resolve)


def task_records(src: SourceConfig, base_dir: Path, key: str) -> Iterator[tuple[str, Mapping]]:
    """(file:line or dataset:index, record) of a JSONL file (``path``) or an HF dataset (type hf:
    a ``save_to_disk`` folder or ``hf_name``), in order; ``max_examples`` records at most."""
    src = _checked_source(src, base_dir, key)
    if src.type == "hf":
        from jaxft.data.records import HfSource

        class _Rows(HfSource):
            def _check_first(self) -> None:  # the task's own fields are checked when each record is read
                pass

        rows = _Rows(src, key)
        return ((rows.where(i), rows.record(i)) for i in range(len(rows)))
    if not src.path:
        raise DataError(f"{key}.path: task {src.task} reads a JSONL file: set path")
    return _jsonl_records(local_copy(src.path), key, src.max_examples)  # a URL: read through a local copy


def _jsonl_records(path: Path, key: str, max_examples: int | None) -> Iterator[tuple[str, Mapping]]:
    if not path.is_file():
        raise DataError(f"{key}.path: {path}: no such file")
    n = 0
    for lineno, line in enumerate(read_text_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: not a JSON object")
        yield where, rec
        n += 1
        if max_examples and n >= max_examples:
            return


def read_choice_source(src: SourceConfig, base_dir: Path, key: str, limit: int | None = None) -> list[ChoiceExample]:
    """The first ``limit`` (default all) examples of one `multiple_choice` / `classification` source."""
    if src.task == "classification" and len(src.choices) < 2:
        raise DataError(f"{key}.choices: task classification needs the label words (at least two)")
    out = []
    for where, rec in task_records(src, Path(base_dir), key):
        out.append(parse_choice_record(rec, src, where, key))
        if limit and len(out) >= limit:
            break
    return _nonempty(out, src, key)


def _lookup(rec: Any, name: str) -> Any:
    """``rec[name]``; ``a.b``: ``rec[a][b]``; ``f1,f2``: [rec[f1], rec[f2]] (``_MISSING`` if absent)."""
    if "," in name:
        values = [_lookup(rec, part.strip()) for part in name.split(",")]
        return _MISSING if _MISSING in values else values
    if name in rec:
        return rec[name]
    head, dot, rest = name.partition(".")
    if dot and head in rec and hasattr(rec[head], "__contains__") and hasattr(rec[head], "__getitem__"):
        return _lookup(rec[head], rest)
    return _MISSING


def _field_name(src: SourceConfig, name: str) -> str | None:
    """The record's field for the task's field ``name``: ``fields``, else src_field / tgt_field."""
    if name in src.fields:
        return src.fields[name]
    alias = {"text": src.src_field, "prompt": src.src_field, "label": src.tgt_field, "references": src.tgt_field}
    return alias.get(name) if src.task != "multiple_choice" else None


def _getter(rec: Any, src: SourceConfig, where: str, key: str):
    what = f"choice_format {src.choice_format}, task {src.task}" if src.task == "multiple_choice" else \
        f"task {src.task}"

    def get(name: str, default: str | None = None) -> Any:
        field = _field_name(src, name) or default or name
        value = _lookup(rec, field) if hasattr(rec, "__contains__") else _MISSING
        if value is not _MISSING:
            return value
        keys = sorted(rec) if hasattr(rec, "keys") else []
        if name in src.fields:
            raise DataError(f"{where}: {key}.fields.{name}: the record has no field {field!r} (keys: {keys})")
        raise DataError(f"{where}: no field {field!r} ({what}; keys: {keys}); map it with {key}.fields.{name}")
    return get


def parse_choice_record(rec: Mapping, src: SourceConfig, where: str, key: str = "source") -> ChoiceExample:
    get = _getter(rec, src, where, key)
    if src.task == "classification":
        text, label = str(get("text")), get("label")
        words = src.choices
        index = words.index(label) if isinstance(label, str) and label in words else label
        return _checked(tuple((text, w) for w in words), index, where)
    fmt = src.choice_format
    if fmt == "generic":
        choices = get("choices")
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            raise DataError(f"{where}: field 'choices' must be a list of at least two texts")
        choices, label = [str(c) for c in choices], get("label")
        label = choices.index(label) if isinstance(label, str) and label in choices else label
        return _checked(tuple((str(get("prompt")), c) for c in choices), label, where)
    if fmt == "xnli":
        context = f"{get('premise')} Question: {get('hypothesis')} True, False or Neither? Answer:"
        return _checked(tuple((context, w) for w in (src.choices or XNLI_WORDS)), get("label"), where)
    if fmt == "xcopa":
        connector = {"cause": "because", "effect": "therefore"}.get(get("question"))
        if connector is None:
            raise DataError(f"{where}: field 'question' must be 'cause' or 'effect', got {get('question')!r}")
        context = f"{str(get('premise')).strip().rstrip('.')} {connector}"
        options = tuple((context, _lower_first(str(get(k)))) for k in ("choice1", "choice2"))
        return _checked(options, get("label"), where)
    if fmt == "xstorycloze":
        context = " ".join(str(get(f"input_sentence_{i}")) for i in range(1, 5))
        options = tuple((context, str(get(k))) for k in ("sentence_quiz1", "sentence_quiz2"))
        return _checked(options, _int(get("answer_right_ending"), where) - 1, where)
    sentence = str(get("sentence"))  # xwinograd: the options differ in the context
    if "_" not in sentence:
        raise DataError(f"{where}: field 'sentence' has no '_' blank")
    i = sentence.index("_")
    options = tuple((sentence[:i] + str(get(k)), sentence[i + 1:].strip()) for k in ("option1", "option2"))
    return _checked(options, _int(get("answer"), where) - 1, where)


def read_generation_source(src: SourceConfig, base_dir: Path, key: str,
                           limit: int | None = None) -> list[GenerationExample]:
    """The examples of one `generation` source: the first ``limit`` (default all) per language."""
    lang = src.tgt_lang or src.src_lang
    if src.type == "text":
        src = _checked_source(src, Path(base_dir), key)
        records = ((where, {"prompt": p, "references": r}) for where, p, r in _text_pairs(src, key))
    else:
        records = task_records(src, Path(base_dir), key)
    out, per_lang, own_langs = [], collections.Counter(), "lang" in src.fields
    for where, rec in records:
        ex = parse_generation_record(rec, src, where, key, lang)
        own_langs = own_langs or "lang" in rec
        if limit and per_lang[ex.lang] >= limit:
            if not own_langs:  # one language: the rest is not needed
                break
            continue
        per_lang[ex.lang] += 1
        out.append(ex)
    return _nonempty(out, src, key)


def _nonempty(examples: list, src: SourceConfig, key: str) -> list:
    if not examples:
        raise DataError(f"{key}: {src.path or src.src_path or src.hf_name}: no examples")
    return examples


def _text_pairs(src: SourceConfig, key: str) -> Iterator[tuple[str, str, str]]:
    n = 0
    pairs = itertools.zip_longest(read_text_lines(src.src_path), read_text_lines(src.tgt_path))
    for lineno, (p, r) in enumerate(pairs, 1):
        if p is None or r is None:
            raise DataError(f"{key}: {src.src_path} and {src.tgt_path} have different numbers of lines")
        if not (p.strip() or r.strip()):
            continue
        yield f"{src.src_path}:{lineno}", p, r
        n += 1
        if src.max_examples and n >= src.max_examples:
            return


def parse_generation_record(rec: Mapping, src: SourceConfig, where: str, key: str = "source",
                            lang: str | None = None) -> GenerationExample:
    get = _getter(rec, src, where, key)
    prompt = get("prompt")
    default = None if _field_name(src, "references") else "references" if "references" in rec else "reference"
    refs = get("references", default)
    refs = [refs] if isinstance(refs, (str, int, float)) else refs
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: the prompt is empty or not text")
    if (not isinstance(refs, (list, tuple)) or not refs
            or not all(isinstance(r, (str, int, float)) and not isinstance(r, bool) and str(r).strip() for r in refs)):
        raise DataError(f"{where}: the references must be a non-empty text or list of non-empty texts")
    if "lang" in src.fields or "lang" in rec:
        lang = get("lang")
        lang = str(lang) if lang is not None else None
    return GenerationExample(prompt, tuple(str(r) for r in refs), lang, where)


def _int(value, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected an answer number, got {value!r}") from None


def _checked(options: tuple[tuple[str, str], ...], label, where: str) -> ChoiceExample:
    label = _int(label, where)
    if not 0 <= label < len(options):
        raise DataError(f"{where}: label {label} is not one of the {len(options)} options")
    if any(not cont.strip() for _, cont in options):
        raise DataError(f"{where}: an answer option is empty")
    return ChoiceExample(options, label, where)


def _lower_first(text: str) -> str:
    text = text.strip()
    return text[:1].lower() + text[1:]
