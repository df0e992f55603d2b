"""A jaxft LoRA adapter as an HF PEFT folder (``adapter_config.json`` +
``adapter_model.safetensors``), loadable with ``peft.PeftModel.from_pretrained``
on the HF export of the base model (`jaxft.interop.save_hf`).

Naming reuses the interop family mapping (`jaxft.interop.families`): the HF
tensor of our kernel ``layers/0/attn/q/kernel`` is
``model.layers.0.self_attn.q_proj.weight``, so the module is
``model.layers.0.self_attn.q_proj`` and PEFT's keys are
``base_model.model.<module>.lora_{A,B}.weight``.  HF ``nn.Linear`` computes
``x W^T`` with W ``[out, in]``; our kernel is ``in_shape + out_shape``, and the
family stores it as ``kernel.reshape(in, out).T``.  Then
``delta W = s B A`` with ``A = a.reshape(in, r).T`` [r, in] and
``B = b.reshape(r, out).T`` [out, r].

A fused HF Linear made of several of our kernels (BLOOM's ``query_key_value``:
q, k, v interleaved per head along its output) carries one PEFT adapter of rank
``R = r_q + r_k + r_v``: A is the factors' A stacked ``[R, in]``, and B
``[3 H hd, R]`` is block-diagonal in the rank, each member's B rows put where the
family puts that member's output rows (found by probing the family's ``to_hf``
with index-valued kernels, so any row permutation of concatenated outputs works).
Its rank (and, when it differs, alpha) go in PEFT's ``rank_pattern`` /
``alpha_pattern`` under the full module name, like every Linear whose rank or
alpha differ from ``r`` / ``lora_alpha``; rsLoRA is ``use_rslora``.  Any
remaining difference between our scale and PEFT's is folded into B.

``modules_to_save`` tensors are written as PEFT writes them,
``base_model.model.<module>.weight`` (the whole HF module: all its tensors), and
listed by full module name.  PEFT saves a copy of each listed module, so a saved
embedding is written to every HF module holding it: ``lm_head`` when tied, and an
encoder-decoder's ``{encoder,decoder}.embed_tokens`` (modules of their own whose weight
transformers ties to ``shared``; the copy of ``shared`` alone is never used).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from jaxft.config.schema import LoraConfig, ModelConfig
from jaxft.peft.lora_targets import alpha_for, lora_scale

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _param_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape by path, from abstract shapes (nothing allocated)."""
    from flax import nnx

    from jaxft.interop.hf import path_str
    from jaxft.models.registry import abstract_model

    abstract = abstract_model(model_cfg)
    return {path_str(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def _rows(tensor, shapes: list[tuple[int, ...]], n_in: int) -> np.ndarray | None:
    """Row ``i`` of the HF weight ``[sum out, n_in]`` the family builds from these kernels is
    output ``src[i]`` of the kernels' concatenated outputs: ``src``, or None if the family's
    layout is not such a row permutation (probed with index-valued kernels)."""
    outs = [math.prod(s) // n_in for s in shapes]
    if any(o * n_in != math.prod(s) for o, s in zip(outs, shapes)):
        return None
    starts = np.cumsum([0] + outs[:-1])
    by_out = [np.broadcast_to(start + np.arange(o, dtype=np.float64) + 1, (n_in, o)).reshape(s)
              for start, o, s in zip(starts, outs, shapes)]
    by_in = [np.broadcast_to(np.arange(n_in, dtype=np.float64)[:, None] + 1, (n_in, o)).reshape(s)
             for o, s in zip(outs, shapes)]
    try:
        w_out, w_in = np.asarray(tensor.to_hf(*by_out)), np.asarray(tensor.to_hf(*by_in))
    except Exception:  # noqa: BLE001 - any failure means "not this layout"
        return None
    total = sum(outs)
    if w_out.shape != (total, n_in) or w_in.shape != (total, n_in):
        return None
    src = w_out[:, 0].astype(np.int64) - 1
    if (not np.array_equal(w_out, np.broadcast_to(w_out[:, :1], w_out.shape))
            or not np.array_equal(w_in, np.broadcast_to(np.arange(n_in) + 1.0, w_in.shape))
            or not np.array_equal(np.sort(src), np.arange(total))):
        return None
    return src


def _linear_tensors(model_cfg: ModelConfig, family) -> dict[str, object]:
    """Our kernel path -> the family tensor (an HF ``.weight``) made of our kernels that holds it."""
    return {o: t for t in family.tensors(model_cfg) if t.ours and t.hf.endswith(".weight")
            and all(o.endswith("/kernel") for o in t.ours) for o in t.ours}


def peft_modules(model_cfg: ModelConfig, paths: list[str]) -> tuple[str, dict[str, object]]:
    """``(HF model_type, {HF module name: family tensor})`` of the adapted Linears at ``paths``;
    ValueError if one cannot be expressed."""
    from jaxft.interop.families import family_for_model

    family = family_for_model(model_cfg)
    family.to_hf_config(model_cfg)  # raises if HF cannot express this model at all
    by_kernel = _linear_tensors(model_cfg, family)
    modules = {}
    for path in paths:
        t = by_kernel.get(f"{path}/kernel")
        if t is None:
            raise ValueError(f"{path}/kernel has no HF nn.Linear weight in {family.model_type!r}")
        modules[t.hf.removesuffix(".weight")] = t
    return family.model_type, modules


def _target_modules(names: list[str], all_linear: list[str]) -> list[str]:
    """Short names (``q_proj``) when they select exactly these modules, else the full names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {m for m in all_linear if m.rsplit(".", 1)[-1] in short}
    return short if selected == set(names) else sorted(names)


def _pattern_keys(pattern: dict[str, float], modules: list[str]) -> dict[str, float]:
    """PEFT matches a pattern key ``k`` to module ``m`` by ``re.match(rf"(.*\\.)?({k})$", m)``, first
    key first: full module names, escaped when a plain name would also match another module."""
    def first(keys, m):
        return next((k for k in keys if re.match(rf"(.*\.)?({k})$", m)), None)

    plain_ok = all(first(pattern, m) == (m if m in pattern else None) for m in modules)
    return pattern if plain_ok else {re.escape(k): v for k, v in pattern.items()}


def _factor_module(t, members: dict, shapes: dict, fold: float) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``(A [R, in], B [out, R])`` of the HF Linear ``t`` from our members' ``(a, b, scale)``;
    each member's term is multiplied by ``its scale / fold``."""
    a0 = next(iter(members.values()))[0]
    n_in = math.prod(a0.shape[:-1])
    kernel_shapes = [shapes[o] for o in t.ours]
    src = _rows(t, kernel_shapes, n_in)
    if src is None:
        raise ValueError(f"{t.ours[0]} has no plain HF nn.Linear weight ({t.hf} is in another layout)")
    outs = [math.prod(s) // n_in for s in kernel_shapes]
    starts = np.cumsum([0] + outs[:-1])
    rank = sum(a.shape[-1] for a, _, _ in members.values())
    A = np.zeros((rank, n_in), np.float64)
    B = np.zeros((len(src), rank), np.float64)
    col = 0
    for o, start, n_out in zip(t.ours, starts, outs):
        if o not in members:
            continue
        a, b, s = members[o]
        r = a.shape[-1]
        A[col:col + r] = a.reshape(n_in, r).T
        rows = np.nonzero((src >= start) & (src < start + n_out))[0]
        B[rows, col:col + r] = (b.reshape(r, n_out).T * (s / fold))[src[rows] - start]
        col += r
    return A, B


def _saved_tensors(model_cfg: ModelConfig, family, saved: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PEFT's modules_to_save tensors ``{HF tensor name: value}`` (whole modules) from ours."""
    tensors, hf_of = family.tensors(model_cfg), {}
    for t in tensors:
        for o in t.ours:
            hf_of[o] = t
    lost = [p for p in saved if p not in hf_of]
    if lost:
        raise ValueError(f"peft.lora.modules_to_save: {lost[0]} has no HF tensor in {family.model_type!r}")
    out = {}
    for t in {id(hf_of[p]): hf_of[p] for p in saved}.values():
        missing = [o for o in t.ours if o not in saved]
        if missing:
            raise ValueError(f"peft.lora.modules_to_save: HF {t.hf} is made of {', '.join(t.ours)}; {missing[0]} "
                             "is not saved (add it)")
        out[t.hf] = np.asarray(t.to_hf(*(saved[o] for o in t.ours)), np.float32)
    modules = {h.rsplit(".", 1)[0] for h in out}
    for t in tensors:
        if t.hf.rsplit(".", 1)[0] in modules and t.hf not in out:
            if t.ours:
                raise ValueError(f"peft.lora.modules_to_save: HF module {t.hf.rsplit('.', 1)[0]} also holds "
                                 f"{t.hf} ({', '.join(t.ours)}), which is not saved")
            out[t.hf] = np.asarray(t.to_hf(), np.float32)
    if "embed/embedding" in saved:
        shared = hf_of["embed/embedding"].hf
        copies = ["lm_head.weight"] if model_cfg.tie_embeddings else []
        if model_cfg.family != "decoder":  # HF embeds with {encoder,decoder}.embed_tokens, tied to shared
            copies += [f"{shared.removesuffix('shared.weight')}{s}.embed_tokens.weight" for s in ("encoder", "decoder")]
            if not shared.endswith("shared.weight") or not all(
                    any(re.match(r, c) for r in family.ignorable) for c in copies[-2:]):
                raise ValueError(f"peft.lora.modules_to_save: the saved embedding ({shared}) has no known input "
                                 f"embedding modules in {family.model_type!r}")
        for c in copies:  # PEFT saves a copy of each module: every one holding the embedding gets it
            out[c] = out[shared]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_peft(out_dir: Path, factors: dict[str, tuple[np.ndarray, np.ndarray]], scale: float, cfg: LoraConfig,
              model_cfg: ModelConfig, *, stacked_on: list[str] = (), scales: dict[str, float] | None = None,
              saved: dict[str, np.ndarray] | None = None) -> Path:
    """Write ``factors`` ({linear path: (a, b)}) as an HF PEFT LoRA folder; each Linear's term is
    ``scales[path]`` (default ``scale``) ``* a @ b``; ``saved`` ({parameter path: value}) are the
    modules_to_save tensors (with the other tensors of their modules).

    Only this adapter is written: with ``stacked_on`` adapters the base it applies
    to is the base with those merged (noted in the config's ``base_model_name_or_path``).
    """
    from safetensors.numpy import save_file

    from jaxft.interop.families import family_for_model

    if cfg.rank < 1:
        raise ValueError(f"peft.lora.rank: must be >= 1, got {cfg.rank}")
    scales = {p: float((scales or {}).get(p, scale)) for p in factors}
    _, modules = peft_modules(model_cfg, sorted(factors))
    family = family_for_model(model_cfg)
    shapes = _param_shapes(model_cfg)
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, t in sorted(modules.items()):
        members = {o: (*factors[o.removesuffix("/kernel")], scales[o.removesuffix("/kernel")])
                   for o in t.ours if o.removesuffix("/kernel") in factors}
        s_ref = next(iter(members.values()))[2]
        rank = sum(a.shape[-1] for a, _, _ in members.values())
        alpha = alpha_for(s_ref, rank, cfg.rslora)
        if rank != cfg.rank:
            rank_pattern[name] = rank
        if not math.isclose(alpha, cfg.alpha, rel_tol=1e-9):
            alpha_pattern[name] = alpha
        fold = lora_scale(alpha_pattern.get(name, cfg.alpha), rank, cfg.rslora)  # the scale PEFT applies
        A, B = _factor_module(t, members, shapes, fold)
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(A, np.float32)
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(B, np.float32)
    hf_saved = _saved_tensors(model_cfg, family, saved) if saved else {}
    tensors.update({f"base_model.model.{k}": v for k, v in hf_saved.items()})
    all_linear = [t.hf.removesuffix(".weight") for t in family.tensors(model_cfg) if t.hf.endswith(".weight")]
    targets = _target_modules(list(modules), all_linear)
    selected = [m for m in all_linear if m in modules or m.rsplit(".", 1)[-1] in targets]
    base = model_cfg.init_from[3:] if (model_cfg.init_from or "").startswith("hf:") else None
    if stacked_on:
        base = f"{base or 'base'} + merged adapters {', '.join(stacked_on)}"
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if model_cfg.family == "decoder" else "SEQ_2_SEQ_LM",
        "base_model_name_or_path": base,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": bool(cfg.rslora),
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in hf_saved}) or None,
        "inference_mode": True,
        "rank_pattern": _pattern_keys(rank_pattern, selected),
        "alpha_pattern": _pattern_keys(alpha_pattern, selected),
        "revision": None,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
