"""LoRA as tree surgery plus a variable type; the model class is never forked
and knows nothing about LoRA.

`apply_lora` puts, in place of every targeted `Linear`, a `LoRALinear` that
takes over its ``kernel``/``bias`` Variables (same paths) and holds an adapter
module at ``<linear>/lora/<name>`` with two `LoRAParam`s (an `nnx.Param`
subclass: Param filters still see them, a `LoRAParam` filter selects only
adapters):

    a  [*in_shape, rank]    logical axes in_axes + (None,)
    b  [rank, *out_shape]   logical axes (None,) + out_axes

so each factor is sharded like the kernel it adapts.  `LoRALinear` adds
``scale * (x . a) . b`` for each attached adapter (``scale = alpha / rank``).
``b`` starts at zero, so a freshly adapted model computes the base model.
The trained adapter applies ``peft.lora.dropout`` to its own input (HF PEFT:
``b(a(dropout(x)))``), in training only (`jaxft.models.dropout`).
Several named adapters can coexist (a frozen language adapter under a trained
task adapter); what trains is `lora_trainable_filter`: only the adapter named
``peft.lora.name``.

Adapter files (``save_adapter``): ``adapter.safetensors`` (float32 ``a``/``b`` by
the adapted Linear's path, ``<linear>/lora/{a,b}``, no adapter name, so it can
be loaded under any name) + ``adapter.json``, and an HF PEFT folder ``peft/``
(`jaxft.peft.peft_format`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.config.schema import LoraConfig, ModelConfig
from jaxft.interop.hf import path_str
from jaxft.models.dropout import check_rate, dropout
from jaxft.models.layers import Linear
from jaxft.sharding import to_host

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "adapter.json"


class LoRAParam(nnx.LoRAParam):
    """A LoRA factor.  Subclasses flax's `nnx.LoRAParam`, an `nnx.Param`: Param filters include it."""


class LoRA(nnx.Module):
    """One adapter of one Linear: ``y += scale * (dropout(x) . a) . b``.  ``merged``: the
    term is folded into the kernel (by `merge_lora`) and not added again."""

    def __init__(self, a: jax.Array, b: jax.Array, *, scale: float, in_axes: tuple, out_axes: tuple,
                 dtype: Any, dropout_rate: float = 0.0):
        self.a = LoRAParam(a, out_sharding=tuple(in_axes) + (None,))
        self.b = LoRAParam(b, out_sharding=(None,) + tuple(out_axes))
        self.scale = float(scale)
        self.dtype = dtype
        self.merged = False
        self.dropout_rate = check_rate("peft.lora.dropout", dropout_rate)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def delta(self) -> jax.Array:
        """``scale * a @ b`` in the kernel's shape ``in_shape + out_shape``, float32."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        r = self.rank
        return (self.scale * (a.reshape(-1, r) @ b.reshape(r, -1))).reshape(a.shape[:-1] + b.shape[1:])

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if self.merged:
            return y
        n_in = self.a.ndim - 1
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        x = dropout(x, self.dropout_rate)
        h = jax.lax.dot_general(x.astype(self.dtype), self.a[...].astype(self.dtype), (contract, ((), ())))
        d = jax.lax.dot_general(h, self.b[...].astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())),
                                preferred_element_type=y.dtype)
        return y + d * jnp.asarray(self.scale, y.dtype)


class LoRALinear(Linear):
    """A `Linear` with named adapters ``lora/<name>``, each adding its low-rank term.
    Made by `attach` from a `Linear`, whose ``kernel``/``bias`` Variables it takes over."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        for adapter in self.lora.values():
            y = adapter(x, y)
        return y


# --------------------------------------------------------------------------- tree surgery


def _retyped(module: nnx.Module, cls: type) -> nnx.Module:
    """A ``cls`` holding ``module``'s attributes, the very same Variables (pickle's protocol)."""
    new = cls.__new__(cls)
    new.__setstate__(module.__getstate__())
    return new


def _slots(model: nnx.Module) -> dict[str, tuple[nnx.Module, str | int]]:
    """``(parent module, key in it)`` of every `Linear` by its path: where `attach` swaps."""
    modules = dict(nnx.iter_modules(model))
    return {path_str(p): (modules[p[:-1]], p[-1]) for p, m in modules.items() if p and isinstance(m, Linear)}


def _get(parent: nnx.Module, key: str | int) -> nnx.Module:
    return parent[key] if isinstance(parent, (nnx.List, nnx.Dict)) else getattr(parent, key)


def _put(parent: nnx.Module, key: str | int, module: nnx.Module) -> None:
    if isinstance(parent, (nnx.List, nnx.Dict)):
        parent[key] = module
    else:
        setattr(parent, key, module)


def linears(model: nnx.Module) -> dict[str, Linear]:
    """Every `Linear` (incl. `LoRALinear`) of the model by its path (``layers/0/attn/q``)."""
    return {path_str(p): m for p, m in nnx.iter_modules(model) if isinstance(m, Linear)}


def adapters(model: nnx.Module, name: str | None = None) -> Iterator[tuple[str, LoRALinear, str, LoRA]]:
    """``(linear path, linear, adapter name, adapter)`` for the adapters named ``name`` (all if None)."""
    for path, lin in linears(model).items():
        if isinstance(lin, LoRALinear):
            for n, ad in list(lin.lora.items()):
                if name is None or n == name:
                    yield path, lin, n, ad


def _sharding_ctx():
    """flax's eager sharding needs a mesh; without one keep the axes as metadata only."""
    return nnx.use_eager_sharding(False) if jax.sharding.get_abstract_mesh().empty else contextlib.nullcontext()


def _attach(parent: nnx.Module, key: str | int, name: str, a: jax.Array, b: jax.Array, scale: float,
            dropout_rate: float = 0.0) -> LoRA:
    lin = _get(parent, key)
    kernel = lin.kernel.get_value()
    axes = tuple(lin.kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)
    n = lin.n_in
    if tuple(a.shape[:-1]) + tuple(b.shape[1:]) != tuple(kernel.shape) or a.shape[-1] != b.shape[0]:
        raise ValueError(f"LoRA {name!r}: factors {list(a.shape)} x {list(b.shape)} do not fit the kernel "
                         f"{list(kernel.shape)}")
    if not isinstance(lin, LoRALinear):
        lin = _retyped(lin, LoRALinear)
        lin.lora = nnx.Dict()
        _put(parent, key, lin)
    elif name in lin.lora:
        raise ValueError(f"peft.lora.name: an adapter named {name!r} is already attached")
    dtype = kernel.dtype
    with _sharding_ctx():
        adapter = LoRA(jnp.asarray(a, dtype), jnp.asarray(b, dtype), scale=scale, in_axes=axes[:n],
                       out_axes=axes[n:], dtype=lin.dtype, dropout_rate=dropout_rate)
    lin.lora[name] = adapter
    return adapter


def attach(model: nnx.Module, path: str, name: str, a: jax.Array, b: jax.Array, scale: float) -> LoRA:
    """Attach adapter ``name`` (factors ``a``, ``b``) to the Linear at ``path`` of ``model``;
    a plain `Linear` is replaced there by a `LoRALinear` with the same Variables."""
    slots = _slots(model)
    if path not in slots:
        raise ValueError(f"LoRA {name!r}: no Linear at {path!r}")
    return _attach(*slots[path], name, a, b, scale)


# --------------------------------------------------------------------------- the trainer's hooks


def apply_lora(model: nnx.Module, cfg: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Load the frozen adapters of ``cfg.load``, then attach the trained adapter
    ``cfg.name`` to every Linear whose kernel path matches a ``cfg.targets`` regex."""
    check_rate("peft.lora.dropout", cfg.dropout)
    if cfg.rank < 1:
        raise ValueError(f"peft.lora.rank: must be >= 1, got {cfg.rank}")
    if cfg.init not in ("kaiming", "gaussian"):
        raise ValueError(f"peft.lora.init: unknown {cfg.init!r}; known: kaiming, gaussian")
    try:
        regexes = [re.compile(t) for t in cfg.targets]
    except re.error as e:
        raise ValueError(f"peft.lora.targets: bad regex: {e}") from None
    for directory in cfg.load:
        load_adapter(model, directory)
    targets = {p: lin for p, lin in linears(model).items() if any(r.search(f"{p}/kernel") for r in regexes)}
    if not targets:
        raise ValueError(f"peft.lora.targets: {list(cfg.targets)} match no Linear kernel; kernels are e.g. "
                         f"{sorted(f'{p}/kernel' for p in linears(model))[:4]}")
    slots = _slots(model)
    for path, lin in targets.items():
        shape = lin.kernel.get_value().shape
        in_shape, out_shape = shape[:lin.n_in], shape[lin.n_in:]
        key = rngs.params()
        if cfg.init == "kaiming":  # PEFT: kaiming_uniform_(a=sqrt(5)) on A [r, in] = U(+-1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(math.prod(in_shape))
            a = jax.random.uniform(key, (*in_shape, cfg.rank), jnp.float32, -bound, bound)
        else:  # PEFT "gaussian": N(0, (1/r)^2)
            a = jax.random.normal(key, (*in_shape, cfg.rank), jnp.float32) / cfg.rank
        _attach(*slots[path], cfg.name, a, jnp.zeros((cfg.rank, *out_shape), jnp.float32), cfg.alpha / cfg.rank,
                cfg.dropout)
    log.info("LoRA %r (rank %d, alpha %g) on %d Linear kernels", cfg.name, cfg.rank, cfg.alpha, len(targets))
    return model


def lora_trainable_filter(cfg: LoraConfig):
    """nnx filter: only the `LoRAParam`s of adapter ``cfg.name`` train."""

    def is_trainable(path: tuple, value: Any) -> bool:
        return (isinstance(value, LoRAParam) and len(path) >= 3 and str(path[-3]) == "lora"
                and str(path[-2]) == cfg.name)

    return is_trainable


# --------------------------------------------------------------------------- files


def _model_summary(cfg: ModelConfig) -> dict:
    return {"family": cfg.family, "preset": cfg.preset, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
            "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "kv_heads": cfg.kv_heads,
            "head_dim": cfg.dim_per_head, "mlp_dim": cfg.mlp_dim, "init_from": cfg.init_from}


def save_adapter(out_dir: Path, model: nnx.Module, cfg: LoraConfig, model_cfg: ModelConfig) -> Path:
    """Write adapter ``cfg.name`` alone: ``adapter.safetensors`` + ``adapter.json`` and
    an HF PEFT folder ``peft/`` (when the model's HF family can express it).
    Every process must call this (arrays are gathered); process 0 writes."""
    from safetensors.numpy import save_file

    from jaxft.peft.peft_format import save_peft

    out_dir = Path(out_dir)
    found = {path: ad for path, _, _, ad in adapters(model, cfg.name)}
    if not found:
        raise ValueError(f"peft.lora.name: the model has no adapter named {cfg.name!r}")
    factors = {path: (np.asarray(to_host(ad.a), np.float32), np.asarray(to_host(ad.b), np.float32))
               for path, ad in found.items()}
    scales = {ad.scale for ad in found.values()}
    if len(scales) != 1:
        raise ValueError(f"LoRA {cfg.name!r}: adapters with different scales {sorted(scales)} cannot be saved")
    scale = scales.pop()
    if jax.process_index() != 0:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"{path}/lora/{k}": v for path, (a, b) in factors.items() for k, v in (("a", a), ("b", b))}
    save_file(tensors, str(out_dir / ADAPTER_FILE))
    others = sorted({n for _, _, n, _ in adapters(model)} - {cfg.name})
    meta = {"format": "jaxft-lora", "name": cfg.name, "rank": cfg.rank, "alpha": cfg.alpha, "scale": scale,
            "targets": list(cfg.targets), "init": cfg.init, "modules": sorted(factors),
            "stacked_on": others, "model": _model_summary(model_cfg)}
    try:
        meta["peft"] = str(save_peft(out_dir / "peft", factors, scale, cfg, model_cfg, stacked_on=others))
    except ValueError as e:  # an adapter file must not fail the end of a run
        log.warning("LoRA %r: no HF PEFT export: %s", cfg.name, e)
        meta["peft"] = None
        meta["peft_skipped"] = str(e)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``(adapter.json, {linear path: (a, b)})`` of a saved adapter."""
    from jaxft.config.errors import read_json
    from jaxft.interop.safetensors_io import load_tensors

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / META_FILE).is_file() or not (adapter_dir / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a LoRA adapter folder (needs {META_FILE} and {ADAPTER_FILE})")
    meta = read_json(adapter_dir / META_FILE, "LoRA adapter metadata")
    tensors = load_tensors(adapter_dir / ADAPTER_FILE)
    paths = sorted(k.removesuffix("/lora/a") for k in tensors if k.endswith("/lora/a"))
    return meta, {p: (tensors[f"{p}/lora/a"], tensors[f"{p}/lora/b"]) for p in paths}


def load_adapter(model: nnx.Module, adapter_dir: str | Path, *, name: str | None = None,
                 scale: float = 1.0) -> nnx.Module:
    """Attach a saved adapter (our format) under ``name`` (default: its saved name),
    its term multiplied by ``scale``.  Whether it trains is the filter's business."""
    meta, factors = read_adapter(adapter_dir)
    name = name or meta["name"]
    slots = _slots(model)
    missing = [p for p in factors if p not in slots]
    if missing:
        raise ValueError(f"{adapter_dir}: adapter modules not in this model: {missing[:4]}")
    for path, (a, b) in factors.items():
        _attach(*slots[path], name, a, b, float(meta["scale"]) * scale)
    return model


# --------------------------------------------------------------------------- merge


def _set_kernel(lin: Linear, value: jax.Array) -> None:
    old = lin.kernel.get_value()
    value = value.astype(old.dtype)
    if isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer):
        value = jax.device_put(value, old.sharding)  # keep the kernel's sharding (jit in_shardings)
    lin.kernel.set_value(value)


def merge_lora(model: nnx.Module, name: str | None = None, *, drop: bool = False) -> nnx.Module:
    """Fold ``scale * a @ b`` of adapter ``name`` (all if None) into the kernels.
    The adapters stay, marked merged (not added again; `unmerge_lora` reverses),
    unless ``drop``: then they are removed, and a `LoRALinear` left without
    adapters becomes a plain `Linear` again (same Variables)."""
    slots = _slots(model) if drop else {}
    for path, lin, n, ad in list(adapters(model, name)):
        if not ad.merged:
            _set_kernel(lin, lin.kernel.get_value().astype(jnp.float32) + ad.delta())
        if drop:
            del lin.lora[n]
            if not len(lin.lora):
                del lin.lora
                _put(*slots[path], _retyped(lin, Linear))
        else:
            ad.merged = True
    return model


def unmerge_lora(model: nnx.Module, name: str | None = None) -> nnx.Module:
    """Subtract merged adapters' terms from the kernels again; they are live adapters again."""
    for _, lin, _, ad in adapters(model, name):
        if ad.merged:
            _set_kernel(lin, lin.kernel.get_value().astype(jnp.float32) - ad.delta())
            ad.merged = False
    return model


def merge_adapter_dir_into(model: nnx.Module, adapter_dir: str | Path, scale: float = 1.0) -> nnx.Module:
    """Add a saved adapter's ``scale * a @ b`` to the kernels (for `peft.compose`); no adapter stays."""
    tmp = "composing"
    load_adapter(model, adapter_dir, name=tmp, scale=scale)
    return merge_lora(model, tmp, drop=True)
