"""Device mesh from config and the ONE logical-axis rules table.

Parameters and activations are annotated with logical axis names
(``embed``, ``mlp``, ``heads`` ...).  This table maps them onto the three mesh
axes.  DP, FSDP and FSDP+TP are not separate code paths: they are mesh shapes
(``configs/mesh/*.yaml``) under this same table.

- data:   pure data parallelism (batch only).
- fsdp:   batch *and* parameter sharding (ZeRO-3 style: weights gathered per layer).
- tensor: Megatron-style tensor parallelism over heads / mlp / vocab.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxft.config.schema import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes).  Unlisted logical names are replicated.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("norm", None),
)


class MeshError(ValueError):
    pass


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve -1 (at most one) into the remaining device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise MeshError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    for name, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise MeshError(f"mesh.{name}: must be a positive size or -1, got {s}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise MeshError(
                f"mesh: {n_devices} devices are not divisible by the fixed axes {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise MeshError(
            f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but {n_devices} are available")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Activate the mesh and the logical rules (needed for sharded init and constraints)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
        yield mesh


def logical_to_spec(logical: Sequence[str | None]) -> P:
    """Logical names -> PartitionSpec.  A mesh axis already used by an earlier
    dimension is not reused (activations ``(batch, length, embed)`` keep
    ``embed`` replicated because ``batch`` already took ``fsdp``)."""
    rules = dict(LOGICAL_RULES)
    used: set[str] = set()
    out = []
    for name in logical:
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        if not axes or used.intersection(axes):
            out.append(None)
            continue
        used.update(axes)
        out.append(target)
    return P(*out)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding for [batch, ...] host data: batch over data+fsdp, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op when no mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical))


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Make `spec` valid for `shape`: a spec of another rank (e.g. Adafactor's
    factored moments, which inherit their parameter's metadata) is replicated,
    and a mesh axis that does not divide its dimension (a vocabulary of 32001
    over tensor=2) is dropped for that dimension."""
    if len(spec) > len(shape):
        return P()
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if dim % size == 0 else None)
    return P(*out)


def to_host(x) -> np.ndarray:
    """A (possibly multi-process sharded) array or nnx Variable as one host numpy array.
    Every process must call this for a non-addressable array (it is a collective)."""
    if isinstance(x, nnx.Variable):
        x = x.get_value()
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def tree_shardings(abstract: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of an abstract pytree of nnx Variables (a model's
    state, or a train state whose optimizer moments inherit their parameter's
    logical axes), from the logical axis metadata, fitted to each leaf's shape."""
    specs = nnx.get_partition_spec(abstract)
    return jax.tree.map(lambda s, a: NamedSharding(mesh, fit_spec(s, a.shape, mesh)), specs, abstract,
                        is_leaf=lambda x: isinstance(x, P))


def sharded_abstract(fn: Callable[[], Any], mesh: Mesh) -> tuple[Any, Any]:
    """(ShapeDtypeStructs carrying their shardings, the shardings) of what `fn()`
    builds: the restore target of a checkpoint and the input of AOT lowering."""
    abstract = jax.eval_shape(fn)
    shardings = tree_shardings(abstract, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings), shardings


def init_distributed(coordinator: str | None = None, num_processes: int = 1, process_id: int = 0) -> None:
    """Multi-process set-up: explicit with a coordinator (local runs; gloo collectives on CPU),
    automatic on TPU VMs."""
    import os

    if coordinator:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_ACCELERATOR_TYPE"):
        jax.distributed.initialize()
