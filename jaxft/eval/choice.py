"""Zero-shot answer-choice evaluation: rank each example's options by the model's
log-likelihood of the option's continuation given its context (`jaxft.data.choice`).

Decoder-only: ``[bos] context continuation`` with the continuation tokens weighted
(no eos: the continuation continues the context).  Encoder-decoder: the context
(+ eos) is the encoder input and ``continuation + eos`` the decoder target (the target
is a whole answer, as rank classification does for T5 / mT0).  An over-long context
loses its start; the continuation is always scored whole.

Two accuracies per source: ``acc`` (the option with the highest summed log-likelihood)
and ``acc_norm`` (highest log-likelihood per UTF-8 byte of the continuation, lm-eval's
length normalisation).  Options are scored in batches of unpacked rows over the
sequence in chunks (`jaxft.train.losses.scan_chunks`), so no [B, L, V] logits exist whole.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.config.schema import DataConfig, ModelConfig
from jaxft.data.choice import ChoiceExample, choice_sources, read_choice_source
from jaxft.data.seq2seq import pad_seq2seq_row
from jaxft.data.tasks import pad_row
from jaxft.eval.types import SplitModel, split_model
from jaxft.models.registry import is_encoder_decoder, model_input_keys
from jaxft.models.scan import merged
from jaxft.train.losses import scan_chunks

CHUNK = 256  # sequence tokens per chunk of the per-row log-likelihood


@dataclasses.dataclass(frozen=True)
class ChoiceScores:
    loglik: np.ndarray  # [n, max options] summed log-likelihood (-inf where an example has fewer)
    nbytes: np.ndarray  # [n, max options] UTF-8 bytes of each continuation
    labels: np.ndarray  # [n]

    def metrics(self) -> dict[str, float]:
        norm = self.loglik / np.maximum(self.nbytes, 1)
        return {"acc": 100.0 * float(np.mean(np.argmax(self.loglik, 1) == self.labels)),
                "acc_norm": 100.0 * float(np.mean(np.argmax(norm, 1) == self.labels)),
                "examples": int(len(self.labels))}


def option_row(context: str, continuation: str, tokenizer, model_cfg: ModelConfig, data_cfg: DataConfig
               ) -> dict[str, np.ndarray]:
    """One option as an unpacked row (the keys of a training row of the model's kind)."""
    cont = tokenizer.encode(continuation)
    ctx = tokenizer.encode(context) if context else []
    L = data_cfg.seq_len
    if is_encoder_decoder(model_cfg):
        S = data_cfg.encoder_seq_len or L
        enc = ctx[-(S - 1):] + [tokenizer.eos_id] if S > 1 else [tokenizer.eos_id]
        tgt = (cont + [tokenizer.eos_id])[:L]
        start = model_cfg.decoder_start_id or 0
        feats = {"enc_inputs": enc, "inputs": [start] + tgt[:-1], "targets": tgt, "weights": [1.0] * len(tgt)}
        return pad_seq2seq_row(feats, S, L)
    head = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ctx
    cont = cont[:L]
    head = head[max(0, len(head) + len(cont) - (L + 1)):]  # keep the context's end
    tokens = head + cont
    weights = [0.0] * (len(head) - 1) + [1.0] * len(cont)
    return pad_row({"inputs": tokens[:-1], "targets": tokens[1:], "weights": weights}, L)


@functools.lru_cache(maxsize=8)
def _row_loglik_fn(graphdef: nnx.GraphDef, keys: tuple[str, ...]):
    """One jitted scorer per model structure: evaluations during training reuse its compilation."""
    def loglik(states, batch):
        with merged(graphdef, *states) as model:  # stacked layers: one scan over the stored arrays
            return _loglik(model, batch)

    def _loglik(model, batch):
        hidden = model.hidden(*[batch[k] for k in keys])

        def sums(h_BCD, t_BC, w_BC):
            logp_BCV = jax.nn.log_softmax(model.logits(h_BCD).astype(jnp.float32), axis=-1)
            tok_BC = jnp.take_along_axis(logp_BCV, t_BC[..., None], axis=-1)[..., 0]
            return (jnp.sum(tok_BC * w_BC, axis=1),)

        logical = (("batch", "length", "embed"), ("batch", "length"), ("batch", "length"))
        return scan_chunks(sums, (hidden, batch["targets"], batch["weights"]), logical, chunk=CHUNK)[0]

    return jax.jit(loglik)


def score_choices(model: nnx.Module | SplitModel, tokenizer, model_cfg: ModelConfig, data_cfg: DataConfig,
                  examples: Sequence[ChoiceExample], *, batch_size: int = 16) -> ChoiceScores:
    """Every option of every example scored, in batches of ``batch_size`` rows."""
    graphdef, states = split_model(model)
    fn = _row_loglik_fn(graphdef, model_input_keys(model_cfg))
    flat = [(i, j, ctx, cont) for i, ex in enumerate(examples) for j, (ctx, cont) in enumerate(ex.options)]
    width = max((len(ex.options) for ex in examples), default=0)
    loglik = np.full((len(examples), width), -np.inf)
    nbytes = np.ones((len(examples), width), np.int64)
    for start in range(0, len(flat), batch_size):
        part = flat[start:start + batch_size]
        rows = [option_row(ctx, cont, tokenizer, model_cfg, data_cfg) for _, _, ctx, cont in part]
        rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (batch_size - len(rows))  # fixed shape
        batch: dict[str, Any] = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        values = np.asarray(jax.device_get(fn(states, batch)))
        for (i, j, _, cont), v in zip(part, values):
            loglik[i, j], nbytes[i, j] = v, len(cont.encode("utf-8"))
    return ChoiceScores(loglik, nbytes, np.asarray([ex.label for ex in examples], np.int64))


def evaluate_choices(model: nnx.Module | SplitModel, tokenizer, model_cfg: ModelConfig, data_cfg: DataConfig, *,
                     base_dir, split: str = "dev", batch_size: int = 16,
                     max_examples: int | None = None) -> dict[str, dict[str, Any]]:
    """Per `multiple_choice` / `classification` source of ``data.<split>``: its language
    (``src_lang``), task and `ChoiceScores.metrics` -- {} when there is none."""
    sources = data_cfg.dev if split == "dev" else getattr(data_cfg, split)
    out = {}
    for key, src in choice_sources(sources, Path(base_dir), f"data.{split}"):
        examples = read_choice_source(src, Path(base_dir), key, limit=max_examples)
        scores = score_choices(model, tokenizer, model_cfg, data_cfg, examples, batch_size=batch_size)
        out[src.name] = {"lang": src.src_lang, "task": src.task, **scores.metrics()}
    return out


def choice_averages(rows: Sequence[Mapping]) -> dict[str, Any]:
    """Macro averages of ``acc`` / ``acc_norm`` over answer-choice sources ({} when none)."""
    if not rows:
        return {}
    return {"acc": float(np.mean([r["acc"] for r in rows])), "acc_norm": float(np.mean([r["acc_norm"] for r in rows])),
            "n_choice_sources": len(rows)}


def choice_markdown(choices: Mapping[str, Mapping], tiers: Mapping[str, Mapping]) -> str:
    """The accuracy table: one row per source (language, task), the average and the tiers."""
    lines = ["| source | language | task | acc | acc_norm | n |", "|---|---|---|---:|---:|---:|"]
    for name, c in choices.items():
        lines.append(f"| {name} | {c.get('lang') or '–'} | {c['task']} | {c['acc']:.2f} | {c['acc_norm']:.2f} "
                     f"| {c['examples']} |")
    avg = choice_averages(list(choices.values()))
    n = sum(c["examples"] for c in choices.values())
    lines.append(f"| **average** ({avg['n_choice_sources']} sources) | | | {avg['acc']:.2f} | {avg['acc_norm']:.2f} "
                 f"| {n} |")
    for tier, t in tiers.items():
        if t.get("sources"):
            lines.append(f"| **{tier}** ({len(t['sources'])} sources) | | | {t['acc']:.2f} | {t['acc_norm']:.2f} | "
                         f"{sum(choices[k]['examples'] for k in t['sources'])} |")
    lines += ["", "Accuracy (%) of ranking the answer options by log-likelihood; acc_norm per byte of the answer."]
    return "\n".join(lines) + "\n"
