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
``B = b.reshape(r, out).T`` [out, r].  A tensor the family stores in another
layout (BLOOM's fused, interleaved query_key_value) cannot carry a separate
adapter per q/k/v: export refuses it with a ValueError.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from jaxft.config.schema import LoraConfig, ModelConfig

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _plain_linear(tensor, shape: tuple[int, ...], n_out: int) -> bool:
    """Does the family store this kernel as ``kernel.reshape(in, out).T``?  (probed)"""
    probe = np.arange(math.prod(shape), dtype=np.float64).reshape(shape)
    try:
        got = np.asarray(tensor.to_hf(probe))
    except Exception:  # noqa: BLE001 - any failure means "not this layout"
        return False
    want = probe.reshape(-1, n_out).T
    return got.shape == want.shape and np.array_equal(got, want)


def peft_module_names(model_cfg: ModelConfig, paths: list[str], shapes: dict[str, tuple[int, ...]],
                      out_sizes: dict[str, int]) -> tuple[str, dict[str, str]]:
    """``(HF model_type, {linear path: HF module name})``; ValueError if one cannot be expressed."""
    from jaxft.interop.families import family_for_model

    family = family_for_model(model_cfg)
    family.to_hf_config(model_cfg)  # raises if HF cannot express this model at all
    by_ours = {t.ours[0]: t for t in family.tensors(model_cfg) if len(t.ours) == 1}
    names = {}
    for path in paths:
        t = by_ours.get(f"{path}/kernel")
        if t is None or not t.hf.endswith(".weight") or not _plain_linear(t, shapes[path], out_sizes[path]):
            raise ValueError(f"{path}/kernel has no plain HF nn.Linear weight in {family.model_type!r}")
        names[path] = t.hf.removesuffix(".weight")
    return family.model_type, names


def _target_modules(names: list[str], all_linear: list[str]) -> list[str]:
    """Short names (``q_proj``) when they select exactly these modules, else the full names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {m for m in all_linear if m.rsplit(".", 1)[-1] in short}
    return short if selected == set(names) else sorted(names)


def save_peft(out_dir: Path, factors: dict[str, tuple[np.ndarray, np.ndarray]], scale: float, cfg: LoraConfig,
              model_cfg: ModelConfig, *, stacked_on: list[str] = ()) -> Path:
    """Write ``factors`` ({linear path: (a, b)}) as an HF PEFT LoRA folder.

    PEFT applies ``lora_alpha / r``; any other effective ``scale`` is folded into B.
    Only this adapter is written: with ``stacked_on`` adapters the base it applies
    to is the base with those merged (noted in the config's ``base_model_name_or_path``).
    """
    from safetensors.numpy import save_file

    from jaxft.interop.families import family_for_model

    if cfg.rank < 1:
        raise ValueError(f"peft.lora.rank: must be >= 1, got {cfg.rank}")
    paths = sorted(factors)
    shapes = {p: a.shape[:-1] + b.shape[1:] for p, (a, b) in factors.items()}
    outs = {p: math.prod(b.shape[1:]) for p, (_, b) in factors.items()}
    _, names = peft_module_names(model_cfg, paths, shapes, outs)
    fold = scale / (cfg.alpha / cfg.rank)
    tensors = {}
    for path in paths:
        a, b = factors[path]
        r = a.shape[-1]
        prefix = f"base_model.model.{names[path]}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T, np.float32)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T * fold, np.float32)
    all_linear = [t.hf.removesuffix(".weight") for t in family_for_model(model_cfg).tensors(model_cfg)
                  if t.hf.endswith(".weight")]
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
        "target_modules": _target_modules(list(names.values()), all_linear),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
