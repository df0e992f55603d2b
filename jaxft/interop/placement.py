"""Putting imported tensors on devices: host arrays onto their sharding, and the compiled
layout changes (transpose / reshape / cast) of `jaxft.interop.hf`'s import."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxft.interop.families.common import Tensor


def place(arr: np.ndarray, sharding: NamedSharding | None) -> jax.Array:
    if sharding is None:
        return jax.device_put(arr)  # about half the time of jnp.asarray on a CPU
    return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])


def stored_sharding(layout: tuple, sharding: NamedSharding, ndim: int, stored_ndim: int) -> NamedSharding:
    """The sharding of the stored (HF) array whose layout change gives ``sharding`` without
    communication: a reshape merges our dims row-major, so sharding our first dim of a merged
    group shards the merged dim in the same blocks; later dims of a group must be unsharded
    (else: replicated, each device then slices its own part)."""
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    kind = layout[0]
    if kind == "reshape" and stored_ndim != 1:
        return NamedSharding(sharding.mesh, P())
    groups = ([len(layout[2]), len(layout[1])] if kind == "linear" else [ndim] if kind == "reshape"
              else [1] * ndim)
    # our dims of each stored dim, in stored order (linear: HF [out, in], ours in + out)
    starts = [len(layout[1]), 0] if kind == "linear" else [sum(groups[:i]) for i in range(len(groups))]
    stored = []
    for start, size in zip(starts, groups):
        if any(spec[start + 1:start + size]):
            return NamedSharding(sharding.mesh, P())
        stored.append(spec[start])
    return NamedSharding(sharding.mesh, P(*stored))


_LAYOUT_FNS: dict[tuple, Any] = {}


def layout_fn(t: Tensor, shape: tuple, dtype: str, out_dtype: str, sharding: NamedSharding | None = None):
    """The compiled ``to_ours`` + cast of one layout for one input shape.  ``t.layout`` names the
    transform, so the first tensor's ``to_ours`` serves every tensor of that layout and shape."""
    key = (t.layout, shape, dtype, out_dtype, sharding)
    if key not in _LAYOUT_FNS:
        if len(_LAYOUT_FNS) > 256:
            _LAYOUT_FNS.clear()
        to_ours = t.to_ours
        _LAYOUT_FNS[key] = jax.jit(lambda w: to_ours(w)[0].astype(out_dtype), out_shardings=sharding)
    return _LAYOUT_FNS[key]


_EXPORT_FNS: dict[tuple, Any] = {}


def export_fn(t: Tensor, shape: tuple, dtype: str, out_dtype: str):
    """The compiled ``to_hf`` + cast of one layout-only tensor (export's mirror of `layout_fn`):
    the transpose and the cast to the stored dtype run on the devices holding the parameter,
    and the host receives the finished HF array (numpy's strided transpose and bfloat16 cast
    were most of `save_hf`'s time)."""
    key = (t.layout, shape, dtype, out_dtype)
    if key not in _EXPORT_FNS:
        if len(_EXPORT_FNS) > 256:
            _EXPORT_FNS.clear()
        to_hf = t.to_hf
        _EXPORT_FNS[key] = jax.jit(lambda w: to_hf(w).astype(out_dtype))
    return _EXPORT_FNS[key]
