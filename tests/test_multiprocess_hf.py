"""HF import and export from two processes (4 CPU devices each, gloo) over fsdp-sharded parameters.

Export: `save_hf` writes the same checkpoint, byte for byte, as one process: process 0 writes
each file's header first and gathers the tensors one at a time in the file's order, and process
1 takes part in the same gathers in the same order (a different order dies in gloo).
Import: `load_hf` with a mesh places each process's slices of the stored tensors and changes
their layout on the devices, as one process does; a float32 import + export gives back the
checkpoint it read, byte for byte."""

import os
import re
import subprocess
import sys

import pytest
from trainutil import free_port

pytestmark = [pytest.mark.slow, pytest.mark.serial]

SCRIPT = r"""
import sys
import numpy as np
from jaxft.sharding import init_distributed
coordinator, pid, out, src = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
if pid >= 0:
    init_distributed(coordinator, 2, pid)
import jax
from flax import nnx
from jaxft.config.schema import MeshConfig, ModelConfig
from jaxft.interop.hf import abstract_params, load_hf, path_str, save_hf
from jaxft.sharding import make_mesh

cfg = ModelConfig(family="decoder", vocab_size=64, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, mlp_dim=32,
                  max_seq_len=32)
mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1)) if pid >= 0 else None
flat, shardings = abstract_params(cfg, mesh)
rng = np.random.default_rng(0)
values = []
for p, v in flat:
    a = rng.normal(0, 0.02, v.shape).astype(np.float32)
    if mesh is not None:
        a = jax.make_array_from_callback(a.shape, shardings[path_str(p)], lambda idx, a=a: a[idx])
    values.append((p, v.replace(a)))
if src:  # import, then export what was imported
    cfg, state = load_hf(src, dtype="float32", mesh=mesh)
    if mesh is not None:
        from jaxft.interop import placement
        assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state))
        assert placement._LAYOUT_FNS  # kernels were transposed on the devices, not by numpy
    save_hf(cfg, state, out, dtype="float32", max_shard_size=2500)
else:
    save_hf(cfg, nnx.from_flat_state(values), out, dtype=DTYPE, max_shard_size=2500)
"""


def run(out, *, processes: int, src="", dtype="bfloat16") -> None:
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4".strip(), JAX_PLATFORMS="cpu")
    coordinator = f"127.0.0.1:{free_port()}"
    script = SCRIPT.replace("DTYPE", repr(dtype))
    pids = range(processes) if processes > 1 else [-1]
    procs = [subprocess.Popen([sys.executable, "-c", script, coordinator, str(i), str(out), str(src)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in pids]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]


def same_files(a, b) -> None:
    files = sorted(p.name for p in a.iterdir())
    assert sum(f.endswith(".safetensors") for f in files) > 2  # several shards, so the order matters
    assert sorted(p.name for p in b.iterdir()) == files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_two_process_export_equals_one_process(tmp_path):
    run(tmp_path / "multi", processes=2)
    run(tmp_path / "single", processes=1)
    same_files(tmp_path / "single", tmp_path / "multi")


def test_two_process_import_then_export_gives_back_the_checkpoint(tmp_path):
    run(tmp_path / "src", processes=1, dtype="float32")
    run(tmp_path / "multi", processes=2, src=tmp_path / "src")
    same_files(tmp_path / "src", tmp_path / "multi")
