"""LoRA's pieces: the adapter variable type and module, the adapted `Linear`, and the
tree surgery that attaches adapters to a model and merges them into its kernels.
(`jaxft.peft.lora` builds adapters from the config and reads / writes them.)

An adapter of one Linear holds two `LoRAParam`s (an `nnx.Param` subclass: Param
filters still see them, a `LoRAParam` filter selects only adapters):

    a  [*in_shape, rank]    logical axes in_axes + (None,)
    b  [rank, *out_shape]   logical axes (None,) + out_axes

so each factor is sharded like the kernel it adapts.  `LoRALinear` adds
``scale * (dropout(x) . a) . b`` for each attached adapter.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.interop.hf import path_str
from jaxft.models.dropout import check_rate, dropout
from jaxft.models.layers import Linear, dense


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
        x = dropout(x, self.dropout_rate)
        h = dense(x.astype(self.dtype), self.a[...].astype(self.dtype), self.a.ndim - 1)
        d = dense(h, self.b[...].astype(self.dtype), 1, out_dtype=y.dtype, master=self.b[...])
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



# --------------------------------------------------------------------------- merge


def set_variable(var: nnx.Variable, value: jax.Array) -> None:
    """Set a Variable to ``value`` in its dtype, keeping its sharding (jit in_shardings)."""
    old = var.get_value()
    value = value.astype(old.dtype)
    if isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer):
        value = jax.device_put(value, old.sharding)
    var.set_value(value)


def _set_kernel(lin: Linear, value: jax.Array) -> None:
    set_variable(lin.kernel, value)


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
