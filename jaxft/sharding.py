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
from typing import Iterator, Sequence

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
