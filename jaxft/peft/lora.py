"""LoRA as tree surgery plus a variable type; the model class is never forked
and knows nothing about LoRA.  The pieces (`LoRAParam`, `LoRA`, `LoRALinear`,
`attach`, `merge_lora`) live in `jaxft.peft.lora_layers` and are re-exported here.

`apply_lora` puts, in place of every targeted `Linear`, a `LoRALinear` that
takes over its ``kernel``/``bias`` Variables (same paths) and holds an adapter
module at ``<linear>/lora/<name>`` with factors ``a [*in_shape, r]`` and
``b [r, *out_shape]``, sharded like the kernel.  It adds ``scale * (x . a) . b``
(``scale = alpha / r``, or ``alpha / sqrt(r)`` with ``peft.lora.rslora``; r and
alpha per Linear from ``rank_pattern`` / ``alpha_pattern``: `jaxft.peft.lora_targets`).
``b`` starts at zero, so a freshly adapted model computes the base model.
The trained adapter applies ``peft.lora.dropout`` to its own input (HF PEFT:
``b(a(dropout(x)))``), in training only (`jaxft.models.dropout`).
Several named adapters can coexist (a frozen language adapter under a trained
task adapter); what trains is `lora_trainable_filter`: the adapter named
``peft.lora.name`` and the parameters ``peft.lora.modules_to_save`` finds.

Adapter files (``save_adapter``): ``adapter.safetensors`` (float32 ``a``/``b`` by
the adapted Linear's path, ``<linear>/lora/{a,b}``, no adapter name, so it can
be loaded under any name; and the modules_to_save tensors by their own paths,
with the other parameters of their module, as PEFT saves whole modules) +
``adapter.json`` (per-Linear scales, the saved paths), and an HF PEFT folder
``peft/`` (`jaxft.peft.peft_format`).  Loading puts the saved tensors in place of
the base's (they are replaced, not added: they cannot be loaded with a scale).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.config.schema import LoraConfig, ModelConfig
from jaxft.interop.hf import path_str
from jaxft.models.dropout import check_rate
from jaxft.peft.lora_layers import (LoRA, LoRALinear, LoRAParam, _attach, _get, _slots, adapters, attach,
                                    linears, merge_lora, set_variable, unmerge_lora)
from jaxft.peft.lora_targets import (check_config, check_saved, compile_regexes, lora_scale, rank_alpha,
                                     saved_paths, target_kernels)
from jaxft.sharding import to_host

__all__ = ["LoRA", "LoRALinear", "LoRAParam", "adapters", "apply_lora", "attach", "linears", "load_adapter",
           "lora_trainable_filter", "merge_adapter_dir_into", "merge_lora", "read_adapter", "read_saved",
           "save_adapter", "unmerge_lora"]

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "adapter.json"


# --------------------------------------------------------------------------- the trainer's hooks


def param_paths(model: nnx.Module) -> list[str]:
    """Paths of the model's parameters, adapter factors excluded."""
    return [path_str(p) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if not isinstance(v, LoRAParam)]


def apply_lora(model: nnx.Module, cfg: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Load the frozen adapters of ``cfg.load``, then attach the trained adapter
    ``cfg.name`` to every Linear whose kernel path matches a ``cfg.targets`` regex."""
    check_rate("peft.lora.dropout", cfg.dropout)
    check_config(cfg)
    for directory in cfg.load:
        load_adapter(model, directory)
    kernels = {f"{p}/kernel": p for p in linears(model)}
    targets = target_kernels(cfg, list(kernels))
    if not targets:
        raise ValueError(f"peft.lora.targets: {list(cfg.targets)} match no Linear kernel; kernels are e.g. "
                         f"{sorted(kernels)[:4]}")
    params = param_paths(model)
    check_saved(cfg, saved_paths(cfg, params), targets, params)
    slots = _slots(model)
    for kernel_path in targets:
        path = kernels[kernel_path]
        lin = _get(*slots[path])
        rank, alpha = rank_alpha(cfg, kernel_path)
        shape = lin.kernel.get_value().shape
        in_shape, out_shape = shape[:lin.n_in], shape[lin.n_in:]
        key = rngs.params()
        if cfg.init == "kaiming":  # PEFT: kaiming_uniform_(a=sqrt(5)) on A [r, in] = U(+-1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(math.prod(in_shape))
            a = jax.random.uniform(key, (*in_shape, rank), jnp.float32, -bound, bound)
        else:  # PEFT "gaussian": N(0, (1/r)^2)
            a = jax.random.normal(key, (*in_shape, rank), jnp.float32) / rank
        _attach(*slots[path], cfg.name, a, jnp.zeros((rank, *out_shape), jnp.float32),
                lora_scale(alpha, rank, cfg.rslora), cfg.dropout)
    log.info("LoRA %r (rank %d, alpha %g%s) on %d Linear kernels%s", cfg.name, cfg.rank, cfg.alpha,
             ", rsLoRA" if cfg.rslora else "", len(targets),
             f"; trained fully: {', '.join(cfg.modules_to_save)}" if cfg.modules_to_save else "")
    return model


def lora_trainable_filter(cfg: LoraConfig):
    """nnx filter: the `LoRAParam`s of adapter ``cfg.name``, and the parameters (not
    adapter factors) a ``cfg.modules_to_save`` regex finds."""
    saved = compile_regexes("peft.lora.modules_to_save", cfg.modules_to_save)

    def is_trainable(path: tuple, value: Any) -> bool:
        if isinstance(value, LoRAParam):
            return len(path) >= 3 and str(path[-3]) == "lora" and str(path[-2]) == cfg.name
        return bool(saved) and isinstance(value, nnx.Param) and any(r.search(path_str(path)) for r in saved)

    return is_trainable


# --------------------------------------------------------------------------- files


def _model_summary(cfg: ModelConfig) -> dict:
    return {"family": cfg.family, "preset": cfg.preset, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
            "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "kv_heads": cfg.kv_heads,
            "head_dim": cfg.dim_per_head, "mlp_dim": cfg.mlp_dim, "init_from": cfg.init_from}


def _variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Every parameter Variable (adapter factors excluded) by its path: where saved tensors go."""
    modules = dict(nnx.iter_modules(model))
    out = {}
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if not isinstance(v, LoRAParam):
            out[path_str(p)] = _get(modules[p[:-1]], p[-1])
    return out


def saved_with_module(cfg: LoraConfig, paths: list[str]) -> list[str]:
    """The `modules_to_save` tensors and the other parameters of their modules (PEFT saves whole modules)."""
    modules = {p.rsplit("/", 1)[0] for p in saved_paths(cfg, paths)}
    return [p for p in paths if p.rsplit("/", 1)[0] in modules]


def save_adapter(out_dir: Path, model: nnx.Module, cfg: LoraConfig, model_cfg: ModelConfig) -> Path:
    """Write adapter ``cfg.name`` alone (+ its modules_to_save tensors): ``adapter.safetensors``
    + ``adapter.json`` and an HF PEFT folder ``peft/`` (when the model's HF family can express it).
    Every process must call this (arrays are gathered); process 0 writes."""
    from safetensors.numpy import save_file

    from jaxft.peft.peft_format import save_peft

    out_dir = Path(out_dir)
    found = {path: ad for path, _, _, ad in adapters(model, cfg.name)}
    if not found:
        raise ValueError(f"peft.lora.name: the model has no adapter named {cfg.name!r}")
    factors = {path: (np.asarray(to_host(ad.a), np.float32), np.asarray(to_host(ad.b), np.float32))
               for path, ad in found.items()}
    scales = {path: ad.scale for path, ad in found.items()}
    variables = _variables(model)
    saved = {p: np.asarray(to_host(variables[p].get_value()), np.float32)
             for p in saved_with_module(cfg, list(variables))}
    if jax.process_index() != 0:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"{path}/lora/{k}": v for path, (a, b) in factors.items() for k, v in (("a", a), ("b", b))}
    save_file({**tensors, **saved}, str(out_dir / ADAPTER_FILE))
    others = sorted({n for _, _, n, _ in adapters(model)} - {cfg.name})
    uniform = len(set(scales.values())) == 1
    meta = {"format": "jaxft-lora", "name": cfg.name, "rank": cfg.rank, "alpha": cfg.alpha,
            "scale": next(iter(scales.values())) if uniform else None, "rslora": cfg.rslora,
            "rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern),
            "scales": scales, "targets": list(cfg.targets), "init": cfg.init, "modules": sorted(factors),
            "modules_to_save": list(cfg.modules_to_save), "saved": sorted(saved),
            "stacked_on": others, "model": _model_summary(model_cfg)}
    try:
        meta["peft"] = str(save_peft(out_dir / "peft", factors, meta["scale"] or cfg.alpha / cfg.rank, cfg,
                                     model_cfg, stacked_on=others, scales=scales, saved=saved))
    except ValueError as e:  # an adapter file must not fail the end of a run
        log.warning("LoRA %r: no HF PEFT export: %s", cfg.name, e)
        meta["peft"] = None
        meta["peft_skipped"] = str(e)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def _read(adapter_dir: str | Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    from jaxft.config.errors import read_json
    from jaxft.interop.safetensors_io import load_tensors

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / META_FILE).is_file() or not (adapter_dir / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a LoRA adapter folder (needs {META_FILE} and {ADAPTER_FILE})")
    meta = read_json(adapter_dir / META_FILE, "LoRA adapter metadata")
    tensors = load_tensors(adapter_dir / ADAPTER_FILE)
    paths = sorted(k.removesuffix("/lora/a") for k in tensors if k.endswith("/lora/a"))
    saved = {p: tensors[p] for p in meta.get("saved") or ()}
    return meta, {p: (tensors[f"{p}/lora/a"], tensors[f"{p}/lora/b"]) for p in paths}, saved


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``(adapter.json, {linear path: (a, b)})`` of a saved adapter (scales: `adapter_scales`)."""
    meta, factors, _ = _read(adapter_dir)
    return meta, factors


def read_saved(adapter_dir: str | Path) -> dict[str, np.ndarray]:
    """The modules_to_save tensors of a saved adapter, by parameter path (empty if none)."""
    return _read(adapter_dir)[2]


def adapter_scales(meta: dict, paths) -> dict[str, float]:
    """Each adapted Linear's scale from adapter.json (per-Linear ``scales``, else the one ``scale``)."""
    scales = meta.get("scales") or {}
    return {p: float(scales[p] if p in scales else meta["scale"]) for p in paths}


def load_adapter(model: nnx.Module, adapter_dir: str | Path, *, name: str | None = None,
                 scale: float = 1.0) -> nnx.Module:
    """Attach a saved adapter (our format) under ``name`` (default: its saved name),
    its term multiplied by ``scale``, and put its modules_to_save tensors in place
    (only with ``scale`` 1).  Whether it trains is the filter's business."""
    meta, factors, saved = _read(adapter_dir)
    name = name or meta["name"]
    slots = _slots(model)
    variables = _variables(model) if saved else {}
    missing = [p for p in factors if p not in slots] + [p for p in saved if p not in variables]
    if missing:
        raise ValueError(f"{adapter_dir}: adapter modules not in this model: {missing[:4]}")
    if saved and scale != 1.0:
        raise ValueError(f"{adapter_dir}: its modules_to_save tensors ({', '.join(sorted(saved)[:3])}) replace "
                         f"the base's and cannot be applied with scale {scale:g} (only 1)")
    for path, value in saved.items():
        if tuple(value.shape) != tuple(variables[path].get_value().shape):
            raise ValueError(f"{adapter_dir}: {path} is {list(value.shape)} in the adapter, "
                             f"{list(variables[path].get_value().shape)} in this model")
    for path, s in adapter_scales(meta, factors).items():
        a, b = factors[path]
        _attach(*slots[path], name, a, b, s * scale)
    for path, value in saved.items():
        set_variable(variables[path], jnp.asarray(value))
    return model


def adapter_saves(adapter_dir: str | Path) -> list[str]:
    """The parameter paths a saved adapter replaces (its modules_to_save tensors); reads adapter.json only."""
    from jaxft.config.errors import read_json

    return list(read_json(Path(adapter_dir) / META_FILE, "LoRA adapter metadata").get("saved") or ())


def merge_adapter_dir_into(model: nnx.Module, adapter_dir: str | Path, scale: float = 1.0) -> nnx.Module:
    """Add a saved adapter's ``scale * a @ b`` to the kernels and put its modules_to_save
    tensors in place (for `peft.compose` / `jaxft compose`); no adapter stays."""
    tmp = "composing"
    load_adapter(model, adapter_dir, name=tmp, scale=scale)
    return merge_lora(model, tmp, drop=True)
