"""Value checks on a built config: impossible values are refused with one line
naming the key and the file/line that set it."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

from jaxft.config.errors import ConfigError, Key, Origin
from jaxft.config.schema import Config
from jaxft.config.schema_data import EVAL_TYPES, SourceConfig, eval_fields


class Check(NamedTuple):
    """``ok(cfg)`` must hold; errors name ``keys[0]`` and the file of the first key that was set."""

    keys: tuple[str, ...]
    ok: Callable[[Config], bool]
    message: str  # str.format'ed with c=cfg


def _get(cfg: Any, key: str) -> Any:
    return functools.reduce(lambda obj, name: getattr(obj, name, None), key.split("."), cfg)


def _bound(key: str, op: Literal[">", ">="], low: float, below: float | None = None) -> Check:
    """``key op low`` (and ``key < below``); ``None`` (an unset optional) passes."""
    def ok(c: Config) -> bool:
        v = _get(c, key)
        return v is None or ((v > low if op == ">" else v >= low) and (below is None or v < below))
    return Check((key,), ok, f"must be {op} {low}" if below is None else f"must be in [{low}, {below})")


def _learned_with_data(c: Config) -> bool:
    return c.model.position == "learned" and bool(c.data.train or c.data.dev)


_CHECKS: tuple[Check, ...] = (
    *(_bound(f"model.{k}", ">", 0) for k in (
        "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim", "max_seq_len")),
    _bound("model.rope_scaling.factor", ">", 0),
    *(_bound(f"model.{k}", ">=", 0, 1) for k in ("dropout", "attention_dropout", "activation_dropout")),
    _bound("peft.lora.dropout", ">=", 0, 1),
    Check(("model.d_model", "model.n_heads", "model.head_dim"),
          lambda c: c.model.head_dim is not None or c.model.d_model % c.model.n_heads == 0,
          "must be a multiple of model.n_heads={c.model.n_heads} (or set model.head_dim)"),
    Check(("model.n_kv_heads", "model.n_heads"), lambda c: c.model.n_heads % c.model.kv_heads == 0,
          "must divide model.n_heads={c.model.n_heads}"),
    *(Check((f"mesh.{k}",), lambda c, k=k: _get(c.mesh, k) == -1 or _get(c.mesh, k) >= 1,
            "must be -1 (all remaining devices) or >= 1") for k in ("data", "fsdp", "tensor")),
    Check(("mesh",), lambda c: [c.mesh.data, c.mesh.fsdp, c.mesh.tensor].count(-1) <= 1,
          "must have at most one axis set to -1"),
    _bound("data.seq_len", ">", 0),
    _bound("data.temperature", ">", 0),
    *(_bound(f"train.{k}", ">", 0) for k in ("steps", "global_batch", "microbatches", "log_every")),
    Check(("train.global_batch", "train.microbatches"), lambda c: c.train.global_batch % c.train.microbatches == 0,
          "must be a multiple of train.microbatches={c.train.microbatches}"),
    *(_bound(f"train.{k}", ">=", 0) for k in ("dev_every", "z_loss")),
    _bound("train.label_smoothing", ">=", 0, 1),
    _bound("train.loss_chunk", ">=", 0),
    _bound("train.loss_chunk_mib", ">=", 0),
    Check(("train.distill.alpha",), lambda c: 0 <= c.train.distill.alpha <= 1, "must be in [0, 1]"),
    _bound("train.distill.temperature", ">", 0),
    _bound("train.distill.top_k", ">=", 0),
    Check(("train.distill.teacher",), lambda c: c.train.distill.teacher is None
          or c.train.distill.teacher.startswith(("run:", "hf:")),
          "expected 'run:<run dir>' or 'hf:<folder or org/name>'"),
    *(_bound(f"optimizer.{k}", ">=", 0) for k in ("lr", "warmup_steps", "end_lr_ratio", "weight_decay")),
    *(_bound(f"optimizer.{k}", ">", 0) for k in ("decay_steps", "clip_norm")),
    *(_bound(f"optimizer.{k}", ">=", 0, 1) for k in ("b1", "b2")),
    Check(("optimizer.warmup_steps", "train.steps"), lambda c: c.optimizer.warmup_steps <= c.train.steps,
          "must be <= train.steps={c.train.steps}"),
    _bound("checkpoint.every", ">=", 0),
    _bound("checkpoint.every_minutes", ">=", 0),
    _bound("optimizer.adafactor_decay_rate", ">", 0, 1),
    _bound("train.max_nonfinite", ">", 0),
    _bound("train.spike_factor", ">=", 0),
    _bound("train.spike_window", ">", 0),
    _bound("checkpoint.keep", ">", 0),
    # Sequence lengths vs model.max_seq_len: a hard limit only for learned absolute
    # position embeddings (model.position: learned, mBART), whose table has
    # max_seq_len (+ position_offset) rows and would be read past its end (JAX
    # clamps the index: silently wrong positions).  Elsewhere max_seq_len is the
    # pretraining context, not a limit: RoPE / ALiBi and sinusoidal (M2M100 / NLLB)
    # positions are computed for any position, and T5's relative buckets saturate
    # at relative_max_distance (mT0 fine-tunes mT5 with 1024-token inputs).  Only
    # checked when data sources are configured (a preset alone uses no data.seq_len).
    Check(("data.seq_len", "model.max_seq_len", "model.position"),
          lambda c: not _learned_with_data(c) or c.data.seq_len <= c.model.max_seq_len,
          "must be <= model.max_seq_len={c.model.max_seq_len} (the learned position table of "
          "model.position: learned has that many rows)"),
    Check(("data.encoder_seq_len", "model.max_seq_len", "model.position"),
          lambda c: (not _learned_with_data(c) or c.model.family == "decoder"
                     or c.data.encoder_seq_len is None or c.data.encoder_seq_len <= c.model.max_seq_len),
          "must be <= model.max_seq_len={c.model.max_seq_len} (the learned position table of "
          "model.position: learned has that many rows)"),
)


def _origin_of(key: Key, origins: Mapping[Key, Origin], fallback: Origin | None) -> Origin | None:
    """The origin of ``key``, else of its closest set ancestor, else ``fallback``."""
    for n in range(len(key), 0, -1):
        if key[:n] in origins:
            return origins[key[:n]]
    return fallback


def source_problems(src: SourceConfig, section: str) -> list[tuple[Key, str]]:
    """(key below the source, message) for each problem of one source of ``data.<section>`` with an
    evaluation-only task (multiple_choice / classification / generation) or a `fields` mapping."""
    if src.task not in EVAL_TYPES:
        return [(("fields",), "only for tasks multiple_choice / classification / generation "
                              "(other tasks: src_field / tgt_field)")] if src.fields else []
    out: list[tuple[Key, str]] = []
    if section == "train":
        out.append((("task",), f"{src.task} is for evaluation only (data.dev / data.test): it is scored, "
                               "not trained on"))
    if src.type not in EVAL_TYPES[src.task]:
        out.append((("type",), f"task {src.task} reads {' / '.join(EVAL_TYPES[src.task])} sources, not {src.type}"))
    known = eval_fields(src.task, src.choice_format)
    what = f"choice_format {src.choice_format}" if src.task == "multiple_choice" else f"task {src.task}"
    aliases = {"text": "src_field", "prompt": "src_field", "label": "tgt_field", "references": "tgt_field"}
    for name, value in src.fields.items():
        if name not in known:
            out.append((("fields", name), f"not a field of {what} (one of: {', '.join(known)})"))
        elif not value.strip():
            out.append((("fields", name), "must name a field of the records"))
        elif src.task != "multiple_choice" and name in aliases and getattr(src, aliases[name]) not in (None, value):
            out.append((("fields", name), f"{aliases[name]} names this field too; set one of them"))
    if src.fields and src.type == "text":
        out.append((("fields",), "type text has no named fields (src_path: prompts, tgt_path: references)"))
    return out


def validate(cfg: Config, origins: Mapping[Key, Origin] | None = None, fallback: str | None = None) -> Config:
    """Reject impossible values (``_CHECKS``, then each source's `source_problems`); returns ``cfg``
    unchanged when all hold."""
    origins = origins or {}
    for check in _CHECKS:
        if check.ok(cfg):
            continue
        keys = [tuple(k.split(".")) for k in check.keys]
        origin = next((origins[k] for k in keys if k in origins), None)
        origin = origin or _origin_of(keys[0], origins, Origin(fallback) if fallback else None)
        value = _get(cfg, check.keys[0])
        value_text = "" if dataclasses.is_dataclass(value) else f", got {value!r}"
        raise ConfigError(check.message.format(c=cfg) + value_text, keys[0], origin)
    for section in ("train", "dev", "test"):
        for i, src in enumerate(getattr(cfg.data, section)):
            for sub, message in source_problems(src, section)[:1]:
                key = ("data", section, i, *sub)
                raise ConfigError(message, key, _origin_of(key, origins, Origin(fallback) if fallback else None))
    return cfg
