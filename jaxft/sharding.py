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
    """Resolve -1 (at most one) into the remaining device count of one slice."""
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


def _slices(devices: Sequence[jax.Device], cfg: MeshConfig) -> list[list[jax.Device]]:
    """The devices grouped by slice: by `slice_index` where the platform has it (TPU),
    else (CPU/GPU, for testing) in contiguous equal groups, one per DCN position."""
    n_dcn = cfg.dcn_data * cfg.dcn_fsdp
    for name in ("dcn_data", "dcn_fsdp"):
        if getattr(cfg, name) < 1:
            raise MeshError(f"mesh.{name}: must be >= 1, got {getattr(cfg, name)}")
    index = [getattr(d, "slice_index", None) for d in devices]
    if any(i is not None for i in index):
        groups: dict[int, list[jax.Device]] = {}
        for d, i in zip(devices, index):
            groups.setdefault(i or 0, []).append(d)
        if len(groups) != n_dcn:
            raise MeshError(f"mesh: the devices form {len(groups)} slice(s) but mesh.dcn_data x mesh.dcn_fsdp = "
                            f"{cfg.dcn_data} x {cfg.dcn_fsdp} = {n_dcn}; set them so their product is {len(groups)}")
        return [groups[k] for k in sorted(groups)]
    if len(devices) % n_dcn:
        raise MeshError(f"mesh: {len(devices)} devices do not split into mesh.dcn_data x mesh.dcn_fsdp = {n_dcn} slices")
    per = len(devices) // n_dcn
    return [list(devices[i * per:(i + 1) * per]) for i in range(n_dcn)]


def _slice_grid(devices: list[jax.Device], shape: tuple[int, int, int]) -> np.ndarray:
    if devices and devices[0].platform == "tpu" and len(devices) > 1:
        from jax.experimental import mesh_utils  # ICI-topology-aware order within a slice
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return np.asarray(devices).reshape(shape)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    slices = _slices(devices, cfg)
    shape = mesh_shape(cfg, len(slices[0]))
    if len(slices) == 1:
        if devices == jax.devices():
            return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
        return Mesh(_slice_grid(devices, shape), MESH_AXES, axis_types=axis_types)
    # [dcn_data, dcn_fsdp, data, fsdp, tensor] -> [dcn_data * data, dcn_fsdp * fsdp, tensor], DCN outermost
    grids = np.stack([_slice_grid(s, shape) for s in slices]).reshape((cfg.dcn_data, cfg.dcn_fsdp) + shape)
    full = grids.transpose(0, 2, 1, 3, 4).reshape(cfg.dcn_data * shape[0], cfg.dcn_fsdp * shape[1], shape[2])
    return Mesh(full, MESH_AXES, axis_types=axis_types)


def check_batch(global_batch: int, microbatches: int, mesh: Mesh) -> None:
    """The batch must split evenly over the data-parallel devices (one line, before compiling)."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if (global_batch // microbatches) % dp:
        raise MeshError(f"train.global_batch / train.microbatches = {global_batch // microbatches} rows per "
                        f"microbatch must be divisible by the {dp} data-parallel devices (mesh data x fsdp = "
                        f"{mesh.shape['data']} x {mesh.shape['fsdp']}, DCN factors included)")


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


def ways(axes: str | tuple[str, ...] | None, mesh: Any) -> int:
    """How many shards one PartitionSpec entry (a mesh axis, several, or None) makes on ``mesh``."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in names)


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Make `spec` valid for `shape`: a spec of another rank (e.g. Adafactor's
    factored moments, which inherit their parameter's metadata) is replicated,
    and a mesh axis that does not divide its dimension (a vocabulary of 32001
    over tensor=2) is dropped for that dimension."""
    if len(spec) > len(shape):
        return P()
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        out.append(axes if dim % ways(axes, mesh) == 0 else None)
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
    builds: the restore target of a checkpoint and the input of AOT lowering.  A ``fn`` that
    carries its ``abstract`` tree (`jaxft.train.state.InitFn`) is not traced again."""
    abstract = getattr(fn, "abstract", None)
    abstract = jax.eval_shape(fn) if abstract is None else abstract
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
    elif cluster_detected():
        jax.distributed.initialize()  # jax reads the workers from the TPU metadata server / SLURM / Open MPI


def cluster_detected() -> bool:
    """A multi-host environment `jax.distributed.initialize()` can set itself up from: a Cloud TPU VM
    (detected from its PCI devices, as jax does -- a plain `gcloud ... ssh` shell sets no TPU_*
    variable), GKE TPU variables, or a SLURM / Open MPI job of more than one task."""
    import os

    env = os.environ
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_ACCELERATOR_TYPE") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    try:
        from jax._src import hardware_utils  # what jax's own TPU VM detection reads (PCI ids)
        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError, OSError):
        return False
