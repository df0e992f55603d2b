"""Per-direction scores -> averages, resource-tier averages, JSON and Markdown.

``EvalReport(scores, tiers)`` takes ``{direction: DirectionScores}`` (from
``jaxft.eval.metrics.score_direction``) and an optional tier map such as
``{"high": ["de", "fr"], "mid": ["hi"], "low": ["yo", "en-sat_Olck"]}``.

Tier entries are **languages or direction names**: an entry equal to the
name of a direction in the report (case-insensitive) is that direction, any
other entry is a language.  A direction belongs to a tier when an entry is
the direction itself, its target language
(``DirectionScores.tgt_lang``) or its source language (the direction name
minus the ``-<tgt_lang>`` suffix, so ``eng_Latn-deu_Latn`` and ``en-zh-Hant``
both split correctly).  Languages compare by their FLORES-200 code where they
have one, so ``de``, ``deu`` and ``deu_Latn`` are the same entry.  This lets a
single list of non-English languages tier both ``en-xx`` and ``xx-en``.  A
direction matching two tiers is an error (list the non-English side, not
``en``); directions in no tier count in the overall average only and are
listed as ``untiered``.

All averages are macro averages over directions (each direction weighs the
same, whatever its number of segments) of the unrounded scores.
``settings`` (what was scored: model, checkpoint, split, the target-language tag style)
go into both formats.  ``write(out_dir)`` writes ``eval.json`` and ``eval.md`` (and, with generation
sources, their outputs as ``generations.jsonl``) as one folder, atomically (`jaxft.outputs.safe_output`).

Answer-choice (`jaxft.eval.choice`) and generation (`jaxft.eval.generation`) sources have their own
tables, one row per source with its language; their tier averages take the sources whose language
is in a tier's entries.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence

from jaxft.data.langcodes import LangCodeError, flores_code
from jaxft.eval.choice import choice_averages, choice_markdown
from jaxft.eval.generation import generation_averages, generation_markdown
from jaxft.eval.metrics import DirectionScores
from jaxft.outputs import atomic_write_text, is_main_process, safe_output
from jaxft.paths import as_path

METRICS = ("bleu", "chrf", "chrfpp")
_HEADERS = {"bleu": "BLEU", "chrf": "chrF", "chrfpp": "chrF++"}


def _norm(code: str) -> str:
    key = code.strip().replace("-", "_").lower()
    try:
        return flores_code(key)
    except LangCodeError:
        return key


def _sides(direction: str, tgt_lang: str) -> tuple[str | None, str]:
    """(source, target) of a direction; source is None if the name does not end in -tgt."""
    suffix = "-" + tgt_lang
    if direction.lower().endswith(suffix.lower()) and len(direction) > len(suffix):
        return direction[: -len(suffix)], tgt_lang
    return None, tgt_lang


def _mean(scores: Sequence[DirectionScores]) -> dict:
    out: dict = {"n_directions": len(scores)}
    for m in METRICS:
        out[m] = sum(getattr(s, m) for s in scores) / len(scores) if scores else None
    return out


class EvalReport:
    """Scores of several directions with overall and per-tier macro averages."""

    def __init__(self, scores: Mapping[str, DirectionScores],
                 tiers: Mapping[str, Sequence[str]] | None = None, *, settings: Mapping[str, object] | None = None,
                 choices: Mapping[str, Mapping] | None = None, generations: Mapping[str, Mapping] | None = None,
                 outputs: Sequence[Mapping] = ()):
        if not scores and not choices and not generations:
            raise ValueError("EvalReport: no directions to report")
        self.scores = dict(scores)
        self.choices = dict(choices or {})  # answer-choice sources: jaxft.eval.choice.evaluate_choices
        self.generations = dict(generations or {})  # generation sources: jaxft.eval.generation
        self.outputs = list(outputs)  # their outputs (generations.jsonl)
        self.settings = {k: v for k, v in (settings or {}).items() if v is not None}  # model, split, tag_style...
        for name, entries in (tiers or {}).items():
            if isinstance(entries, str) or not all(isinstance(e, str) for e in entries):
                raise TypeError(f"tier {name!r}: expected a list of languages or directions, "
                                f"got {entries!r}")
        self.tiers = {name: list(entries) for name, entries in (tiers or {}).items()}
        self.tier_of = self._assign_tiers()

    def _assign_tiers(self) -> dict[str, str | None]:
        names = {d.strip().lower() for d in self.scores}
        # an entry naming a direction of this report is that direction, else a language
        keys = {name: {e.strip().lower() if e.strip().lower() in names else "lang:" + _norm(e)
                       for e in entries}
                for name, entries in self.tiers.items()}
        out: dict[str, str | None] = {}
        for direction, s in self.scores.items():
            src, tgt = _sides(direction, s.tgt_lang)
            langs = {"lang:" + _norm(x) for x in (src, tgt) if x}
            mine = {direction.strip().lower()} | langs
            hits = [name for name, k in keys.items() if k & mine]
            if len(hits) > 1:
                raise ValueError(f"direction {direction!r} matches tiers {hits}; "
                                 "list each language in one tier only (the non-English side)")
            out[direction] = hits[0] if hits else None
        return out

    # ------------------------------------------------------------- numbers

    def averages(self) -> dict:
        """Macro averages over all directions: {bleu, chrf, chrfpp, n_directions}, over the
        answer-choice sources when there are any: {acc, acc_norm, n_choice_sources}, and over the
        generation sources when there are any: {em, gen_chrf, n_generation_sources}."""
        return {**_mean(list(self.scores.values())), **choice_averages(list(self.choices.values())),
                **generation_averages(list(self.generations.values()))}

    def tier_averages(self) -> dict[str, dict]:
        """Per tier (in the tier map's order): macro averages and the directions."""
        out = {}
        for name in self.tiers:
            members = [d for d, t in self.tier_of.items() if t == name]
            out[name] = {**_mean([self.scores[d] for d in members]), "directions": members}
        return out

    def untiered(self) -> list[str]:
        return [d for d, t in self.tier_of.items() if t is None] if self.tiers else []

    def signatures(self) -> dict[str, dict[str, list[str]]]:
        """metric -> signature -> directions using it (BLEU differs by tokenizer)."""
        out: dict[str, dict[str, list[str]]] = {m: {} for m in METRICS}
        for direction, s in self.scores.items():
            for m in METRICS:
                out[m].setdefault(getattr(s, f"{m}_signature"), []).append(direction)
        return out

    # ------------------------------------------------------------- formats

    def to_dict(self) -> dict:
        return {
            "directions": {d: {**s.to_dict(), "tier": self.tier_of[d]}
                           for d, s in self.scores.items()},
            "signatures": self.signatures(),
            "averages": self.averages(),
            "tiers": self.tier_averages(),
            "untiered": self.untiered(),
            **({"choices": self.choices, "choice_tiers": self._choice_tiers()} if self.choices else {}),
            **({"generations": self.generations, "generation_tiers": self._generation_tiers()}
               if self.generations else {}),
            **({"settings": self.settings} if self.settings else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def _source_tiers(self, rows: Mapping[str, Mapping], averages) -> dict[str, dict]:
        out = {}
        for name, entries in self.tiers.items():
            langs = {_norm(e) for e in entries}
            members = [k for k, c in rows.items() if c.get("lang") and _norm(c["lang"]) in langs]
            out[name] = {**averages([rows[k] for k in members]), "sources": members}
        return out

    def _choice_tiers(self) -> dict[str, dict]:
        return self._source_tiers(self.choices, choice_averages)

    def _generation_tiers(self) -> dict[str, dict]:
        return self._source_tiers(self.generations, generation_averages)

    def to_markdown(self) -> str:
        text = self._directions_markdown() if self.scores else ""
        if self.choices:
            text += ("\n" if text else "") + choice_markdown(self.choices, self._choice_tiers())
        if self.generations:
            text += ("\n" if text else "") + generation_markdown(self.generations, self._generation_tiers())
        if self.settings and not self.scores:
            text += "Settings: " + "; ".join(f"{k.replace('_', ' ')} `{v}`" for k, v in self.settings.items())
            text += ".\n"
        return text

    def _directions_markdown(self) -> str:
        def row(label: str, values: Mapping, n) -> str:
            cells = [f"{values[m]:.2f}" if values[m] is not None else "–" for m in METRICS]
            return f"| {label} | " + " | ".join(cells) + f" | {n} |"

        lines = ["| direction | BLEU | chrF | chrF++ | n |", "|---|---:|---:|---:|---:|"]
        for d, s in self.scores.items():
            lines.append(row(d, s.to_dict(), s.n))
        avg = self.averages()
        total = sum(s.n for s in self.scores.values())
        lines.append(row(f"**average** ({avg['n_directions']} directions)", avg, total))
        for name, t in self.tier_averages().items():
            n = sum(self.scores[d].n for d in t["directions"])
            lines.append(row(f"**{name}** ({t['n_directions']} directions)", t, n))
        lines.append("")
        lines.append("Macro averages over directions. Signatures: " + "; ".join(
            self._signature_text(m, sigs) for m, sigs in self.signatures().items()) + ".")
        eps = {s.chrf_eps_smoothing for s in self.scores.values()}
        if True in eps:
            which = "all" if eps == {True} else "some"
            lines.append(f"chrF and chrF++ use eps smoothing ({which} directions).")
        if self.untiered():
            lines.append("Untiered: " + ", ".join(self.untiered()) + ".")
        if self.settings:
            lines.append("Settings: " + "; ".join(f"{k.replace('_', ' ')} `{v}`" for k, v in self.settings.items())
                         + ".")
        return "\n".join(lines) + "\n"

    def _signature_text(self, metric: str, sigs: Mapping[str, list[str]]) -> str:
        if len(sigs) == 1:
            return f"{_HEADERS[metric]} `{next(iter(sigs))}`"
        parts = [f"`{sig}` ({', '.join(ds)})" for sig, ds in sigs.items()]
        return f"{_HEADERS[metric]} " + ", ".join(parts)

    def write(self, out_dir: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
              overwrite: bool = True, flag: str = "output") -> tuple[pathlib.Path, pathlib.Path]:
        """Write ``eval.json`` and ``eval.md`` (and ``generations.jsonl``) as the folder ``out_dir``; returns
        the paths of the first two.

        Through `jaxft.outputs.safe_output`: ``out_dir`` may not be, contain or lie
        inside one of ``inputs`` (`jaxft eval --out`: the run dir, the config and
        its data); an existing ``out_dir`` is replaced only with ``overwrite`` (the
        default: training rewrites ``eval/step_<n>`` when a resumed run evaluates
        that step again) and only when it is a report folder jaxft wrote.  Both texts
        are built before anything is touched and the folder is renamed into place
        when complete, so a failure leaves the previous results intact.  Only
        process 0 writes; ``flag`` names ``out_dir`` in errors.
        """
        texts = {"eval.json": self.to_json(), "eval.md": self.to_markdown()}
        if self.outputs:
            texts["generations.jsonl"] = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in self.outputs)
        with safe_output(out_dir, inputs, overwrite=overwrite, flag=flag) as tmp:
            if is_main_process():
                for name, text in texts.items():
                    atomic_write_text(tmp / name, text)
        out = as_path(out_dir)  # a local path or a URL
        return out / "eval.json", out / "eval.md"
