"""Answer-choice evaluation data (`task: multiple_choice` / `classification` sources).

Every example becomes its answer options, each a (context, continuation) pair of texts, and
the index of the right one: the model scores ``log p(continuation | context)`` per option
(`jaxft.eval.choice`).  Zero-shot multilingual benchmarks come in a few JSONL layouts
(`choice_format`), read here as the common prompt formats of mT0 / BLOOMZ / lm-eval:

| format      | fields                                                     | options                          |
|-------------|------------------------------------------------------------|----------------------------------|
| generic     | prompt, choices (list), label (index)                      | (prompt, choice)                 |
| xnli        | premise, hypothesis, label (0 entail, 1 neutral, 2 contra) | ("<p> Question: <h> True, False or Neither? Answer:", True/Neither/False) |
| xcopa       | premise, question (cause / effect), choice1, choice2, label | ("<premise> because/therefore", choice) |
| xstorycloze | input_sentence_1..4, sentence_quiz1/2, answer_right_ending (1/2) | (the four sentences, ending) |
| xwinograd   | sentence (with "_"), option1, option2, answer ("1"/"2")    | (text up to "_" with the option, the rest) |

`classification`: ``src_field`` (default ``text``) is the context, ``tgt_field`` (default
``label``) the label as an index or one of the label words ``choices``, which are the
continuations.  A missing field or a label out of range is a `DataError` naming file:line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from jaxft.config.schema import SourceConfig
from jaxft.data.readers import CHOICE_TASKS, DataError
from jaxft.data.sources import keyed_sources

XNLI_WORDS = ("True", "Neither", "False")


@dataclasses.dataclass(frozen=True)
class ChoiceExample:
    options: tuple[tuple[str, str], ...]  # (context, continuation) per answer option
    label: int  # index of the right option
    where: str = ""  # file:line


def choice_sources(sources: Sequence[SourceConfig], base_dir: Path, section: str) -> list[tuple[str, SourceConfig]]:
    """The `multiple_choice` / `classification` sources of ``sources`` (data.dev or data.test),
    expanded (names, absolute paths) and keyed, as `jaxft.data.sources.keyed_sources` does."""
    return [(key, src) for key, src in keyed_sources(sources, base_dir, section=section) if src.task in CHOICE_TASKS]


def read_choice_source(src: SourceConfig, base_dir: Path, key: str) -> list[ChoiceExample]:
    """The examples of one `multiple_choice` / `classification` JSONL source (``path``)."""
    if src.type != "jsonl" or not src.path:
        raise DataError(f"{key}: task {src.task} reads a JSONL file: set type: jsonl and path")
    if src.task == "classification" and len(src.choices) < 2:
        raise DataError(f"{key}.choices: task classification needs the label words (at least two)")
    path = Path(src.path) if Path(src.path).is_absolute() else base_dir / src.path
    if not path.is_file():
        raise DataError(f"{key}.path: {path}: no such file")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg})") from None
            out.append(parse_choice_record(rec, src, where))
            if src.max_examples and len(out) >= src.max_examples:
                break
    return out


def parse_choice_record(rec: dict, src: SourceConfig, where: str) -> ChoiceExample:
    def get(name):
        if not isinstance(rec, dict) or name not in rec:
            raise DataError(f"{where}: no field {name!r} (choice_format {src.choice_format}, task {src.task})")
        return rec[name]

    if src.task == "classification":
        text, label = str(get(src.src_field or "text")), get(src.tgt_field or "label")
        words = src.choices
        index = words.index(label) if isinstance(label, str) and label in words else label
        return _checked(tuple((text, w) for w in words), index, where)
    fmt = src.choice_format
    if fmt == "generic":
        choices = get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataError(f"{where}: field 'choices' must be a list of at least two texts")
        return _checked(tuple((str(get("prompt")), str(c)) for c in choices), get("label"), where)
    if fmt == "xnli":
        context = f"{get('premise')} Question: {get('hypothesis')} True, False or Neither? Answer:"
        return _checked(tuple((context, w) for w in (src.choices or XNLI_WORDS)), get("label"), where)
    if fmt == "xcopa":
        connector = {"cause": "because", "effect": "therefore"}.get(get("question"))
        if connector is None:
            raise DataError(f"{where}: field 'question' must be 'cause' or 'effect', got {rec['question']!r}")
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
