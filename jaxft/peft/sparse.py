"""Lottery-Ticket Sparse Fine-Tuning (Ansell et al. 2022): masks and sparse diffs.

LT-SFT trains fully for `phase1_steps`, keeps the K entries that moved most
(|theta - theta0|), resets to theta0 and trains only those K entries.  The
trainer applies the boolean mask to *updates* (after the optimizer), so weight
decay cannot move frozen entries.  The result is a sparse difference
theta - theta0 that composes by addition (a language diff + a task diff).

Mask selection is exact-K with ONE global threshold over all maskable tensors,
found without concatenating them: scores are non-negative float32, whose bit
patterns (as int32) order like the floats, so a 31-step bisection over bit
patterns finds the K-th largest score t.  Each step is one jitted pass that
counts `score >= mid` per tensor (sharded arrays stay sharded; counts are
summed on the host in Python ints, so > 2**31 maskable entries are fine).
Entries with score > t are kept; ties at t are kept in (tensor order, row-major
flat index) order until exactly K.  Memory: one int32 score per maskable entry,
sharded like its parameter (the size of one float32 copy of the maskable
parameters), plus per-tensor temporaries.

On disk (`save_diff`)::

    diff.json           format, k, count, mask_type, tensors: {path: {shape, dtype, storage, count}}
    diff.safetensors    "<path>.indices" (int32, or int64 for tensors of >= 2**31 entries) and
                        "<path>.values" (float32) per sparse tensor; "<path>" for dense tensors
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxft.config.schema import SparseConfig

DIFF_JSON, DIFF_TENSORS, FORMAT = "diff.json", "diff.safetensors", "jaxft-sparse-diff"


# --------------------------------------------------------------------------- paths


def keypath_str(keypath: Sequence[Any]) -> str:
    """A jax key path over an nnx.State -> "layers/0/attn/q/kernel" (as `jaxft.train.state.path_str`)."""
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(getattr(k, "key", k)))
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and keypath[-1].name == "value":
        parts.pop()  # the array inside an nnx.Variable
    return "/".join(parts)


def flat_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
    """(paths, array leaves, treedef) of a params tree (nnx.State or nested dicts)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [keypath_str(kp) for kp, _ in flat], [x for _, x in flat], treedef


def classify(paths: Sequence[str], cfg: SparseConfig) -> list[str]:
    """Per path: "dense" (matches `cfg.dense`), "maskable" (matches `cfg.maskable`) or "frozen"."""
    dense = [re.compile(r) for r in cfg.dense]
    maskable = [re.compile(r) for r in cfg.maskable]
    out = []
    for p in paths:
        if any(r.search(p) for r in dense):
            out.append("dense")
        elif any(r.search(p) for r in maskable):
            out.append("maskable")
        else:
            out.append("frozen")
    return out


def resolve_k(k: float, total: int) -> int:
    if k < 0:
        raise ValueError(f"peft.sparse.k: must be >= 0, got {k}")
    if k >= 1:
        if k != int(k):
            raise ValueError(f"peft.sparse.k: a count (>= 1) must be a whole number, got {k}")
        n = int(k)
    else:
        n = int(round(k * total))
    if n > total:
        raise ValueError(f"peft.sparse.k: {n} entries requested but only {total} are maskable")
    return n


# --------------------------------------------------------------------------- mask selection


def _score_bits(kind: str, seed: int, idx: int, theta: jax.Array, theta0: jax.Array) -> jax.Array:
    if kind == "lt":
        s = jnp.abs(theta.astype(jnp.float32) - theta0.astype(jnp.float32))
    elif kind == "magnitude":
        s = jnp.abs(theta.astype(jnp.float32))
    else:  # random
        s = jax.random.uniform(jax.random.fold_in(jax.random.key(seed), idx), theta.shape, jnp.float32)
    s = jnp.where(jnp.isnan(s), 0.0, s)
    return jax.lax.bitcast_convert_type(s, jnp.int32)  # >= 0, ordered like the floats


@jax.jit
def _count_ge(bits: list[jax.Array], t: jax.Array) -> jax.Array:
    return jnp.stack([jnp.sum(b >= t, dtype=jnp.int32) for b in bits])


def _flat_cumsum(x: jax.Array) -> jax.Array:
    """Inclusive cumulative sum in row-major flat order, without reshaping (keeps sharding)."""
    if x.ndim <= 1:
        return jnp.cumsum(x)
    inner = jnp.cumsum(x, axis=-1)
    totals = inner[..., -1]
    return inner + (_flat_cumsum(totals) - totals)[..., None]


@jax.jit
def _select(bits: list[jax.Array], t: jax.Array, need: jax.Array) -> list[jax.Array]:
    out = []
    for i, b in enumerate(bits):
        ties = b == t
        rank = _flat_cumsum(ties.astype(jnp.int32))
        out.append((b > t) | (ties & (rank <= need[i])))
    return out


def topk_masks(bits: list[jax.Array], k: int) -> list[jax.Array]:
    """Exactly `k` True entries over all `bits` arrays: the largest, ties by (array, flat index)."""
    sizes = [int(b.size) for b in bits]
    total = sum(sizes)
    if k <= 0 or k >= total:
        return [jnp.full_like(b, k > 0, dtype=jnp.bool_) for b in bits]
    lo, hi = 0, 2 ** 31 - 1  # invariant: count(>= lo) >= k > count(>= hi) (NaNs were zeroed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sum(int(c) for c in np.asarray(_count_ge(bits, jnp.int32(mid)))) >= k:
            lo = mid
        else:
            hi = mid
    greater = np.asarray(_count_ge(bits, jnp.int32(hi))).astype(np.int64)
    ties = np.asarray(_count_ge(bits, jnp.int32(lo))).astype(np.int64) - greater
    remaining = k - int(greater.sum())
    need = []
    for n in ties:  # ties taken in tensor order
        take = min(int(n), remaining)
        need.append(take)
        remaining -= take
    return _select(bits, jnp.int32(lo), jnp.asarray(need, jnp.int32))


def select_mask(params: nnx.State, theta0: nnx.State, cfg: SparseConfig, *, seed: int) -> nnx.State:
    """Boolean tree shaped like `params` (same Variable types and metadata): exactly K
    maskable entries True by `cfg.mask_type`, `cfg.dense` tensors all True, the rest False."""
    paths, leaves, treedef = flat_with_paths(params)
    _, leaves0, treedef0 = flat_with_paths(theta0)
    if treedef0 != treedef:
        raise ValueError("select_mask: params and theta0 have different structures")
    kinds = classify(paths, cfg)
    idx = [i for i, c in enumerate(kinds) if c == "maskable"]
    k = resolve_k(cfg.k, sum(int(leaves[i].size) for i in idx))
    score = jax.jit(partial(_score_bits, cfg.mask_type, seed))
    bits = [score(i, leaves[i], leaves0[i]) for i in idx]
    chosen = dict(zip(idx, topk_masks(bits, k)))
    del bits
    out = []
    for i, (leaf, kind) in enumerate(zip(leaves, kinds)):
        if kind == "maskable":
            out.append(chosen[i])
        else:
            out.append(jnp.full_like(leaf, kind == "dense", dtype=jnp.bool_))
    return jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------------------- L1 pull (phase 1)


class L1PullState(NamedTuple):
    anchor: optax.Params  # the parameters at init (theta0)


def l1_pull(strength: float) -> optax.GradientTransformation:
    """grads += strength * sign(theta - theta0): the (sub)gradient of strength * |theta - theta0|_1,
    theta0 being the params this transformation was initialised with."""

    def init_fn(params):
        # a real copy: the anchor must not alias the (donated) params buffers
        return L1PullState(anchor=jax.tree.map(lambda p: jnp.array(p, copy=True), params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("l1_pull needs the params")
        updates = jax.tree.map(lambda g, p, a: g + (strength * jnp.sign(p - a)).astype(g.dtype),
                               updates, params, state.anchor)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)



# --------------------------------------------------------------------------- diffs on disk


@dataclasses.dataclass
class DiffTensor:
    shape: tuple[int, ...]
    dtype: str  # the parameter's dtype
    values: np.ndarray  # float32: the K stored deltas (sparse) or the whole delta (dense)
    indices: np.ndarray | None = None  # flat row-major indices; None = dense

    @property
    def dense(self) -> bool:
        return self.indices is None


@dataclasses.dataclass
class SparseDiff:
    tensors: dict[str, DiffTensor]
    meta: dict[str, Any]

    @property
    def count(self) -> int:
        return sum(int(t.values.size) for t in self.tensors.values() if not t.dense)


def _host(x: jax.Array) -> np.ndarray:
    """A replicated (or single-process) array on the host, without a cross-host gather."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def _sparse_entries(theta, theta0, mask, n):
    idx = jnp.nonzero(mask, size=n)
    return idx, theta.astype(jnp.float32)[idx] - theta0.astype(jnp.float32)[idx]


def _dense_delta(theta, theta0):
    return theta.astype(jnp.float32) - theta0.astype(jnp.float32)


def _replicated(x: jax.Array) -> dict[str, Any]:
    """jit kwargs: outputs replicated over `x`'s mesh (so every process can read them)."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return {"out_shardings": jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())}
    return {}


def save_diff(out_dir: Path, params: nnx.State, theta0: nnx.State, mask: nnx.State, cfg: SparseConfig) -> Path:
    """Write theta - theta0 where `mask` is True (sparse; `cfg.dense` tensors dense).
    Every process must call this (the device work is collective); only process 0 writes."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    paths, leaves, _ = flat_with_paths(params)
    _, leaves0, _ = flat_with_paths(theta0)
    _, masks, _ = flat_with_paths(mask)
    kinds = classify(paths, cfg)
    arrays: dict[str, np.ndarray] = {}
    tensors: dict[str, dict] = {}
    count = 0
    for path, theta, t0, m, kind in zip(paths, leaves, leaves0, masks, kinds):
        info = {"shape": list(theta.shape), "dtype": jnp.dtype(theta.dtype).name}
        if kind == "dense":
            arrays[path] = _host(jax.jit(_dense_delta, **_replicated(theta))(theta, t0))
            tensors[path] = {**info, "storage": "dense", "count": int(theta.size)}
            continue
        n = int(jnp.sum(m, dtype=jnp.int32))
        if n == 0:
            continue
        idx, vals = jax.jit(_sparse_entries, static_argnums=(3,), **_replicated(theta))(theta, t0, m, n)
        flat = np.ravel_multi_index(tuple(_host(i).astype(np.int64) for i in idx), theta.shape)
        arrays[f"{path}.indices"] = flat.astype(np.int64 if theta.size >= 2 ** 31 else np.int32)
        arrays[f"{path}.values"] = _host(vals)
        tensors[path] = {**info, "storage": "sparse", "count": n}
        count += n
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(arrays, str(out_dir / DIFF_TENSORS))
        meta = {"format": FORMAT, "version": 1, "k": count, "count": count, "mask_type": cfg.mask_type,
                "dense": [p for p, t in tensors.items() if t["storage"] == "dense"], "tensors": tensors}
        (out_dir / DIFF_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    return out_dir


def is_diff_dir(path: str | Path) -> bool:
    return (Path(path) / DIFF_JSON).is_file()


def load_diff(path: str | Path) -> SparseDiff:
    """A diff dir written by `save_diff` (or its diff.json)."""
    from jaxft.config.errors import read_json
    from jaxft.interop.safetensors_io import load_tensors

    path = Path(path)
    directory = path.parent if path.name == DIFF_JSON else path
    if not (directory / DIFF_JSON).is_file():
        raise FileNotFoundError(f"{directory}: no {DIFF_JSON} (not a sparse diff written by jaxft)")
    meta = read_json(directory / DIFF_JSON, "sparse diff metadata")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / DIFF_JSON}: format {meta.get('format')!r} is not {FORMAT!r}")
    arrays = load_tensors(directory / DIFF_TENSORS)
    tensors = {}
    for p, info in meta["tensors"].items():
        shape = tuple(info["shape"])
        if info["storage"] == "dense":
            tensors[p] = DiffTensor(shape, info["dtype"], arrays[p])
        else:
            tensors[p] = DiffTensor(shape, info["dtype"], arrays[f"{p}.values"], arrays[f"{p}.indices"])
    return SparseDiff(tensors, meta)


# --------------------------------------------------------------------------- applying diffs


@jax.jit
def _add_dense(x, delta, scale):
    return (x.astype(jnp.float32) + scale * delta).astype(x.dtype)


@jax.jit
def _add_sparse(x, idx, values, scale):
    new = x[idx].astype(jnp.float32) + scale * values
    return x.at[idx].set(new.astype(x.dtype), unique_indices=True)


def apply_diff(state_or_model: Any, diff: SparseDiff, scale: float = 1.0) -> Any:
    """theta += scale * delta at the stored entries.  A Module is updated in place (and
    returned); a State (or any params tree) is returned updated.  Raises ValueError for a
    diff tensor the parameters lack or whose shape differs."""
    if isinstance(state_or_model, nnx.Module):
        state = nnx.state(state_or_model, nnx.Param)
        nnx.update(state_or_model, apply_diff(state, diff, scale))
        return state_or_model
    paths, leaves, treedef = flat_with_paths(state_or_model)
    where = {p: i for i, p in enumerate(paths)}
    missing = [p for p in diff.tensors if p not in where]
    if missing:
        raise ValueError(f"diff tensor {missing[0]!r} is not a parameter of the model "
                         f"({len(missing)} missing; the model has e.g. {paths[:3]})")
    s = jnp.float32(scale)
    for p, t in diff.tensors.items():
        i = where[p]
        x = leaves[i]
        if tuple(x.shape) != t.shape:
            raise ValueError(f"diff tensor {p!r}: shape {t.shape} but the parameter has {tuple(x.shape)}")
        if t.dense:
            leaves[i] = _add_dense(x, jnp.asarray(t.values), s)
        else:
            idx = tuple(jnp.asarray(a, jnp.int32) for a in np.unravel_index(t.indices.astype(np.int64), t.shape))
            leaves[i] = _add_sparse(x, idx, jnp.asarray(t.values), s)
        if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding):
            leaves[i] = jax.device_put(leaves[i], x.sharding)  # a no-op unless XLA chose otherwise
    return jax.tree_util.tree_unflatten(treedef, leaves)


def revert_diff(state_or_model: Any, diff: SparseDiff, scale: float = 1.0) -> Any:
    """Undo `apply_diff(..., scale)`."""
    return apply_diff(state_or_model, diff, -scale)
