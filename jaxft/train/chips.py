"""TPU generations as data, and abstract TPU devices for planning on a CPU-only machine.

`jaxft plan` compiles the real train step for a slice it does not have: libtpu (the
``jaxft[tpu]`` extra) describes a topology and `jax.experimental.topologies` turns it
into compile-only devices.  The figures below feed the roofline estimate; the memory
verdict comes from the compiler itself (its usable HBM is a little under the chip's).

Slice names follow Cloud TPU: ``v4-128`` / ``v5p-256`` count TensorCores (two per chip),
``v5e-16`` (``v5litepod-16``) / ``v6e-16`` count chips.  A libtpu topology string
(``v5p:4x4x8``) is accepted as is.  Two traps are handled here: v4 needs
``chip_config_name="megacore"`` (else libtpu returns half-chip devices), and libtpu calls
v5e ``v5e:``, not ``v5litepod:``.
"""

from __future__ import annotations

import dataclasses
import math
import re

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # v4 / v5e / v5p / v6e
    hbm_bytes: int  # per chip, vendor figure
    usable_hbm: int  # what the compiler lets a program use (libtpu 0.0.42's out-of-memory errors)
    peak_bf16: float  # dense bf16 FLOP/s per chip
    hbm_bw: float  # bytes/s per chip
    ici_bw: float  # bytes/s per chip, all links together (vendor "interchip interconnect BW")
    dcn_bw: float  # bytes/s per chip across slices (a host's data-centre NIC shared by its chips)
    cores_in_name: int  # TensorCores per chip as counted in the slice name
    dims: int  # torus dimensions of a slice
    chip_config: str | None = None


# Cloud TPU system-architecture pages (per chip).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GIB, int(30.75 * GIB), 275e12, 1228e9, 300e9, 100e9 / 8 / 4, 2, 3, "megacore"),
    "v5e": Chip("v5e", 16 * GIB, int(15.75 * GIB), 197e12, 819e9, 200e9, 200e9 / 8 / 8, 1, 2),
    "v5p": Chip("v5p", 95 * GIB, int(95.74 * GIB), 459e12, 2765e9, 600e9, 200e9 / 8 / 4, 2, 3),
    "v6e": Chip("v6e", 32 * GIB, int(31.25 * GIB), 918e12, 1640e9, 448e9, 400e9 / 8 / 8, 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v4": "v4", "v5p": "v5p", "v5e": "v5e", "v6e": "v6e"}


class TopologyError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    shape: tuple[int, ...]  # chips per slice along each torus axis
    num_slices: int = 1

    @property
    def name(self) -> str:
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def n_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    def describe(self) -> str:
        cores = self.chips_per_slice * self.chip.cores_in_name
        one = f"{self.chip.name}-{cores} ({self.name}, {self.chips_per_slice} chips)"
        return one if self.num_slices == 1 else f"{self.num_slices} x {one}"


def _torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The most cubic power-of-two shape (the shapes Cloud TPU slices come in), smallest axes first."""
    if chips < 1 or chips & (chips - 1):
        raise TopologyError(f"--topology: {chips} chips is not a power of two; give a libtpu shape such as v5p:4x4x8")
    shape = [1] * dims
    if dims == 3 and chips >= 4:  # 3D slices start at 2x2x1
        shape = [2, 2, 1]
        chips //= 4
    while chips > 1:  # 2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4 -> 4x4x8 ...; 1x2 -> 2x2 -> 2x4 -> 4x4 ...
        i = min(range(dims), key=lambda a: (shape[a], -a))
        shape[i] *= 2
        chips //= 2
    return tuple(shape)


def parse_topology(text: str, num_slices: int = 1) -> Topology:
    """``v5p-256`` / ``v5litepod-16`` / ``v6e-8`` / ``v5p:4x4x8`` -> a Topology."""
    if num_slices < 1:
        raise TopologyError(f"--num-slices: must be >= 1, got {num_slices}")
    m = re.fullmatch(r"(v\d+[a-z]*?)(?:pod)?(?:-(\d+)|:(\d+(?:x\d+)*))", text.strip().lower())
    gen = m and ALIASES.get(m.group(1))
    if not gen:
        raise TopologyError(f"--topology: {text!r} is not a TPU slice; expected e.g. v5p-256, v5e-16, v6e-8, v4-128 "
                            f"or a libtpu shape v5p:4x4x8 (generations: {', '.join(CHIPS)})")
    chip = CHIPS[gen]
    if m.group(3):
        shape = tuple(int(s) for s in m.group(3).split("x"))
        if len(shape) != chip.dims:
            raise TopologyError(f"--topology: {chip.name} slices have {chip.dims} axes, got {text!r}")
        return Topology(chip, shape, num_slices)
    cores = int(m.group(2))
    if cores % chip.cores_in_name:
        raise TopologyError(f"--topology: {text!r}: {chip.name} slice names count {chip.cores_in_name} cores per chip")
    return Topology(chip, _torus_shape(cores // chip.cores_in_name, chip.dims), num_slices)


def abstract_devices(topology: Topology) -> list:
    """Compile-only devices of the slice(s), from libtpu (no TPU needed)."""
    import os

    # compile-only devices touch no chip: several planners (or test workers) may run at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:  # the describing library (the jaxft[tpu] extra)
        raise TopologyError("--topology: planning for TPUs needs libtpu: pip install 'jaxft[tpu]' (or 'jax[tpu]')")
    try:
        from jax.experimental import topologies
        kwargs = {"chip_config_name": topology.chip.chip_config} if topology.chip.chip_config else {}
        if topology.num_slices > 1:
            kwargs["num_slices"] = topology.num_slices
        desc = topologies.get_topology_desc(topology.name, "tpu", **kwargs)
    except Exception as e:  # noqa: BLE001 - libtpu refusing the shape
        raise TopologyError(f"--topology: libtpu refused {topology.name}: {str(e).splitlines()[0]}") from e
    devices = list(desc.devices)
    if len(devices) != topology.n_chips:
        raise TopologyError(f"--topology: libtpu gave {len(devices)} devices for {topology.describe()}, "
                            f"expected {topology.n_chips}")
    return devices
