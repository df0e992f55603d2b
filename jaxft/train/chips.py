"""TPU generations and NVIDIA GPU nodes as data, and abstract devices for planning on a CPU-only machine.

`jaxft plan` compiles the real train step for a slice it does not have: libtpu (the
``jaxft[tpu]`` extra) describes a topology and `jax.experimental.topologies` turns it
into compile-only devices.  The figures below feed the roofline estimate; the memory
verdict comes from the compiler itself (its usable HBM is a little under the chip's).

GPU nodes (``h100-8``, ``h200-16`` = two 8-GPU nodes, ``a100-4``) are compiled the same way by
XLA:GPU through the CUDA PJRT plugin (the ``jaxft[gpu-plan]`` extra: the plugin alone, no CUDA
libraries, no GPU), from a description of the device (`gpu_target_config`).  A GPU program may
use what jax's allocator is given: ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the memory (jax's
default 0.75), so the verdict is against that (`usable_bytes`).

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
    platform: str = "tpu"
    kind: str = ""  # the device kind XLA:GPU reports (GPUs)


# Cloud TPU system-architecture pages (per chip).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GIB, int(30.75 * GIB), 275e12, 1228e9, 300e9, 100e9 / 8 / 4, 2, 3, "megacore"),
    "v5e": Chip("v5e", 16 * GIB, int(15.75 * GIB), 197e12, 819e9, 200e9, 200e9 / 8 / 8, 1, 2),
    "v5p": Chip("v5p", 95 * GIB, int(95.74 * GIB), 459e12, 2765e9, 600e9, 200e9 / 8 / 4, 2, 3),
    "v6e": Chip("v6e", 32 * GIB, int(31.25 * GIB), 918e12, 1640e9, 448e9, 400e9 / 8 / 8, 1, 2),
}
MIB = 1024**2
# NVIDIA SXM GPUs as HGX / DGX nodes ship them (8 per node), per GPU: memory as nvidia-smi reports it,
# dense bf16 (no sparsity), HBM bandwidth, NVLink (all links together) and, between nodes, one
# 200 Gb/s (A100) / 400 Gb/s (H100, H200) NIC per GPU: vendor data sheets.
GPUS: dict[str, Chip] = {
    "a100": Chip("a100", 81920 * MIB, 81920 * MIB, 312e12, 2039e9, 600e9, 25e9, 1, 1, platform="gpu",
                 kind="NVIDIA A100-SXM4-80GB"),
    "h100": Chip("h100", 81559 * MIB, 81559 * MIB, 989e12, 3352e9, 900e9, 50e9, 1, 1, platform="gpu",
                 kind="NVIDIA H100 80GB HBM3"),
    "h200": Chip("h200", 143771 * MIB, 143771 * MIB, 989e12, 4800e9, 900e9, 50e9, 1, 1, platform="gpu",
                 kind="NVIDIA H200"),
}
GPUS_PER_NODE = 8
CUDNN = 90800  # the cuDNN version the plan compiles for (9.8, as jax's CUDA 12 wheels require at least)
# What XLA:GPU's compiler asks of a device (CUDA device attributes): compute capability, SMs, SM clock
# (GHz), L2, shared memory per SM and per block (opt-in)
_SM = {"a100": ((8, 0), 108, 1.41, 40 * MIB, 167936, 166912),
       "h100": ((9, 0), 132, 1.98, 50 * MIB, 233472, 232448),
       "h200": ((9, 0), 132, 1.98, 50 * MIB, 233472, 232448)}
# The device kinds jax reports -> the chips above (TPU v5e reports "TPU v5 lite", v5p "TPU v5").
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5p": "v5p", "TPU v5": "v5p",
                "TPU v6 lite": "v6e", "TPU v6e": "v6e", "NVIDIA A100": "a100", "NVIDIA H100": "h100",
                "NVIDIA H200": "h200"}


def chip_of_kind(device_kind: str) -> Chip | None:
    """The chip whose table row describes a device of this kind (longest matching prefix), or None."""
    names = [k for k in DEVICE_KINDS if device_kind.startswith(k)]
    if not names:
        return None
    name = DEVICE_KINDS[max(names, key=len)]
    return CHIPS.get(name) or GPUS[name]


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
        if self.chip.platform == "gpu":  # the CUDA plugin's topology: slices x hosts x devices per host
            return f"1x{self.shape[0]}x{self.shape[1]}"
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def nodes(self) -> int:
        return self.shape[0] if self.chip.platform == "gpu" else 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def n_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    def describe(self) -> str:
        if self.chip.platform == "gpu":
            return (f"{self.chip.name}-{self.n_chips} ({self.nodes} node{'s' * (self.nodes > 1)} x {self.shape[1]} "
                    f"{self.chip.kind})")
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
    gpu = re.fullmatch(r"(a100|h100|h200)(?:-(\d+))?", text.strip().lower())
    if gpu:
        return _gpu_topology(GPUS[gpu.group(1)], int(gpu.group(2) or GPUS_PER_NODE), num_slices, text)
    m = re.fullmatch(r"(v\d+[a-z]*?)(?:pod)?(?:-(\d+)|:(\d+(?:x\d+)*))", text.strip().lower())
    gen = m and ALIASES.get(m.group(1))
    if not gen:
        raise TopologyError(f"--topology: {text!r} is not a TPU slice; expected e.g. v5p-256, v5e-16, v6e-8, v4-128 "
                            f"or a libtpu shape v5p:4x4x8 (generations: {', '.join(CHIPS)}), or GPUs: "
                            f"{', '.join(g + '-8' for g in GPUS)}")
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


def _gpu_topology(chip: Chip, n: int, num_slices: int, text: str) -> Topology:
    if num_slices != 1:
        raise TopologyError(f"--num-slices: GPU nodes are counted in the name ({chip.name}-16: two "
                            f"{GPUS_PER_NODE}-GPU nodes), not in slices")
    if n < 1 or (n <= GPUS_PER_NODE and n & (n - 1)) or (n > GPUS_PER_NODE and n % GPUS_PER_NODE):
        raise TopologyError(f"--topology: {text!r}: give 1, 2, 4 or 8 GPUs of one node, or whole "
                            f"{GPUS_PER_NODE}-GPU nodes ({chip.name}-16, {chip.name}-32, ...)")
    return Topology(chip, (max(1, n // GPUS_PER_NODE), min(n, GPUS_PER_NODE)))


def usable_bytes(chip: Chip) -> int:
    """What one program may use: the compiler's usable HBM on a TPU; on a GPU what jax's allocator
    is given, ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (default 0.75) of the memory."""
    import os

    if chip.platform != "gpu":
        return chip.usable_hbm
    text = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
    try:
        fraction = float(text)
    except ValueError:
        raise TopologyError(f"XLA_PYTHON_CLIENT_MEM_FRACTION: {text!r} is not a number") from None
    if not 0 < fraction <= 1:
        raise TopologyError(f"XLA_PYTHON_CLIENT_MEM_FRACTION: {text} is not in (0, 1]")
    return int(chip.hbm_bytes * fraction)


def gpu_target_config(chip: Chip) -> str:
    """The device description XLA:GPU compiles for (a `stream_executor.GpuTargetConfigProto` in text)."""
    (major, minor), sms, ghz, l2, smem_core, smem_optin = _SM[chip.name]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core} threads_per_core_limit: 2048 core_count: {sms} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bw)} l2_cache_size: {l2} clock_rate_ghz: {ghz}
  device_memory_size: {chip.hbm_bytes} shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {CUDNN // 10000} minor: {CUDNN // 100 % 100} }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{chip.kind}"
"""


def _abstract_gpus(topology: Topology) -> list:
    """Compile-only GPUs from the CUDA PJRT plugin (the jaxft[gpu-plan] extra; no GPU, no CUDA libraries)."""
    import importlib.util

    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise TopologyError(f"--topology: planning for {topology.chip.name.upper()} GPUs needs the CUDA PJRT plugin: "
                            "pip install 'jaxft[gpu-plan]' (jax-cuda12-plugin; no GPU needed)")
    try:
        from jax.experimental import topologies
        desc = topologies.get_topology_desc(platform="cuda", topology=topology.name,
                                            target_config=gpu_target_config(topology.chip))
    except Exception as e:  # noqa: BLE001 - the plugin not loaded (a CUDA platform requested without a GPU)
        raise TopologyError(f"--topology: the CUDA plugin refused {topology.describe()}: {str(e).splitlines()[0]} "
                            "(run with JAX_PLATFORMS=cpu)") from e
    _cudnn_version_without_cudnn()
    return list(desc.devices)


def _cudnn_version_without_cudnn() -> None:
    """jax asks the cuDNN library for its version where it traces cuDNN attention; a planning host
    has no cuDNN, and compiling the call needs none (cuDNN builds its graph when the program runs).
    Without the library, the version the plan compiles for (`CUDNN`) answers."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused
    except ImportError:  # another jax: its cuDNN attention then fails to trace, and says why
        return
    try:
        fused.check_cudnn_version()
    except RuntimeError:  # "cuDNN not found"
        fused.check_cudnn_version = lambda: CUDNN


def abstract_devices(topology: Topology) -> list:
    """Compile-only devices of the slice(s), from libtpu (no TPU needed), or of the GPU node(s)."""
    import os

    if topology.chip.platform == "gpu":
        devices = _abstract_gpus(topology)
        if len(devices) != topology.n_chips:
            raise TopologyError(f"--topology: the CUDA plugin gave {len(devices)} devices for {topology.describe()}")
        return devices

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


def topology_target(topology: Topology) -> dict:
    """`jaxft.train.plan.plan`'s keyword arguments for the slice or node(s)."""
    capacity = usable_bytes(topology.chip)
    target = topology.describe()
    if topology.chip.platform == "gpu":
        target += f", {capacity / topology.chip.hbm_bytes:.2f} of each GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION)"
    return {"target": target, "chip": topology.chip, "peak": topology.chip.peak_bf16,
            "capacity": capacity, "num_slices": topology.num_slices, "topology": topology}
