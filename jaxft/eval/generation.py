"""Generation evaluation (`task: generation` sources of data.dev / data.test): the model continues
each prompt with the `eval.decode` settings and its output is scored against the references.

Inputs: decoder-only models get ``[bos] prompt`` as the prefix (the prompt as written: no
`data.prompt_template`, no language tags), its start dropped when the prompt and `decode.max_len`
new tokens exceed `model.max_seq_len`; encoder-decoder models get ``prompt </s>`` as the encoder
input (its end kept within `data.encoder_seq_len` / `seq_len`) and generate from the decoder start
(`decode.forced_ids` still apply).  Decoding is `jaxft.eval.decode.decode_all`, as translation.

Two measures per source (and per language, when records carry a ``lang``):

- ``em``: exact match (%), the output equal to any reference after whitespace normalisation
  (`normalize`: surrounding whitespace stripped, each run of whitespace one space; case,
  punctuation and Unicode forms kept as they are);
- ``chrf``: corpus chrF (sacreBLEU's defaults, as `jaxft.eval.metrics`) with every reference of
  every example (a variable number per example: sacreBLEU's ``nrefs:var``).

Averages over sources are ``em`` / ``gen_chrf`` (``gen_`` keeps it apart from the translation
directions' ``chrf``), usable as `eval.best_metric`; the outputs go to ``generations.jsonl``
beside ``eval.json`` (`jaxft.eval.report.EvalReport.write`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from flax import nnx
from sacrebleu.metrics import CHRF

from jaxft.config.schema import DataConfig, DecodeConfig, ModelConfig
from jaxft.data.choice import GenerationExample, read_generation_source, task_sources
from jaxft.eval.decode import decode_all
from jaxft.eval.types import SplitModel
from jaxft.models.registry import is_encoder_decoder


def normalize(text: str) -> str:
    """What exact match compares: surrounding whitespace stripped, whitespace runs one space."""
    return " ".join(text.split())


def score_generation(outputs: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """{em, chrf, examples, chrf_signature} of ``outputs`` against each one's ``references``."""
    if len(outputs) != len(references) or not outputs:
        raise ValueError(f"generation: {len(outputs)} outputs for {len(references)} reference lists")
    hits = [normalize(o) in {normalize(r) for r in refs} for o, refs in zip(outputs, references)]
    width = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    chrf = CHRF()
    score = chrf.corpus_score(list(outputs), streams)
    return {"em": 100.0 * float(np.mean(hits)), "chrf": float(score.score), "examples": len(outputs),
            "chrf_signature": str(chrf.get_signature())}


def generation_inputs(prompts: Sequence[str], tokenizer, model_cfg: ModelConfig, data_cfg: DataConfig,
                      max_new: int) -> list[list[int]]:
    """Token ids per prompt (see the module docstring)."""
    if is_encoder_decoder(model_cfg):
        S = data_cfg.encoder_seq_len or data_cfg.seq_len
        return [tokenizer.encode(p)[-(S - 1):] + [tokenizer.eos_id] if S > 1 else [tokenizer.eos_id]
                for p in prompts]
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    budget = max(1, model_cfg.max_seq_len - max_new)
    return [(bos + tokenizer.encode(p))[-budget:] for p in prompts]


def generate_texts(model: nnx.Module | SplitModel, tokenizer, model_cfg: ModelConfig, data_cfg: DataConfig,
                   prompts: Sequence[str], decode: DecodeConfig, batch_size: int = 16, *,
                   on_batch: Callable[[int], object] | None = None) -> list[str]:
    """The best output of each prompt as text (without its eos)."""
    if not prompts:
        return []
    seqs = generation_inputs(prompts, tokenizer, model_cfg, data_cfg, decode.max_len)
    decode = dataclasses.replace(decode, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                 decoder_start_id=model_cfg.decoder_start_id)
    results = decode_all(model, seqs, config=decode, batch_size=batch_size,
                         encoder_decoder=is_encoder_decoder(model_cfg), on_batch=on_batch)
    n_forced = len(decode.forced_ids)
    return [tokenizer.decode(best[0][0][n_forced:]) for best in results]


def _groups(name: str, examples: Sequence[GenerationExample]) -> dict[str, list[GenerationExample]]:
    """One group per language in the order met: ``name``, or ``name/lang`` with several languages."""
    by_lang: dict[str | None, list[GenerationExample]] = {}
    for ex in examples:
        by_lang.setdefault(ex.lang, []).append(ex)
    if len(by_lang) == 1:
        return {name: examples}
    return {f"{name}/{lang or '-'}": group for lang, group in by_lang.items()}


def evaluate_generation(model: nnx.Module | SplitModel, tokenizer, model_cfg: ModelConfig, data_cfg: DataConfig, *,
                        base_dir, decode: DecodeConfig, split: str = "dev", batch_size: int = 16,
                        max_examples: int | None = None, progress_bar: Callable | None = None
                        ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Per `generation` source of ``data.<split>`` (per language with records of several): its
    language, task, `score_generation` values; and every output as a record ({} and [] when there
    is none).  ``max_examples`` per language; ``progress_bar(total, desc)``: a bar (or None)."""
    sources = getattr(data_cfg, split)
    rows: dict[str, dict[str, Any]] = {}
    outputs: list[dict[str, Any]] = []
    for key, src in task_sources(sources, Path(base_dir), f"data.{split}", ("generation",)):
        examples = read_generation_source(src, Path(base_dir), key, limit=max_examples)
        for name, group in _groups(src.name, examples).items():
            bar = progress_bar(len(group), name) if progress_bar else None
            try:
                texts = generate_texts(model, tokenizer, model_cfg, data_cfg, [ex.prompt for ex in group], decode,
                                       batch_size, on_batch=bar.update if bar else None)
            finally:
                if bar:
                    bar.close()
            rows[name] = {"lang": group[0].lang, "task": "generation",
                          **score_generation(texts, [ex.references for ex in group])}
            outputs += [{"source": name, "lang": ex.lang, "prompt": ex.prompt, "references": list(ex.references),
                         "output": text, "em": normalize(text) in {normalize(r) for r in ex.references}}
                        for ex, text in zip(group, texts)]
    return rows, outputs


def generation_averages(rows: Sequence[Mapping]) -> dict[str, Any]:
    """Macro averages over generation sources: ``em``, ``gen_chrf`` ({} when none)."""
    if not rows:
        return {}
    return {"em": float(np.mean([r["em"] for r in rows])), "gen_chrf": float(np.mean([r["chrf"] for r in rows])),
            "n_generation_sources": len(rows)}


def generation_markdown(rows: Mapping[str, Mapping], tiers: Mapping[str, Mapping]) -> str:
    """The generation table: one row per source (language), the average and the tiers."""
    lines = ["| source | language | EM | chrF | n |", "|---|---|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r.get('lang') or '–'} | {r['em']:.2f} | {r['chrf']:.2f} | {r['examples']} |")
    avg = generation_averages(list(rows.values()))
    n = sum(r["examples"] for r in rows.values())
    lines.append(f"| **average** ({avg['n_generation_sources']} sources) | | {avg['em']:.2f} | {avg['gen_chrf']:.2f} "
                 f"| {n} |")
    for tier, t in tiers.items():
        if t.get("sources"):
            lines.append(f"| **{tier}** ({len(t['sources'])} sources) | | {t['em']:.2f} | {t['gen_chrf']:.2f} | "
                         f"{sum(rows[k]['examples'] for k in t['sources'])} |")
    signatures = sorted({r["chrf_signature"] for r in rows.values()})
    lines += ["", "Exact match (%) against any reference after whitespace normalisation; corpus chrF "
              + ", ".join(f"`{s}`" for s in signatures) + "."]
    return "\n".join(lines) + "\n"
