"""`save_hf` from two processes (4 CPU devices each, gloo) over fsdp-sharded parameters writes
the same checkpoint, byte for byte, as one process: process 0 writes each file's header first
and gathers the tensors one at a time in the file's order, and process 1 takes part in the same
gathers in the same order (a different order would deadlock or mix up tensors)."""

import os
import re
import socket
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.serial]

SCRIPT = r"""
import sys
import numpy as np
from jaxft.sharding import init_distributed
coordinator, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if pid >= 0:
    init_distributed(coordinator, 2, pid)
import jax
from flax import nnx
from jaxft.config.schema import MeshConfig, ModelConfig
from jaxft.interop.hf import abstract_params, path_str, save_hf
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
save_hf(cfg, nnx.from_flat_state(values), out, dtype="bfloat16", max_shard_size=2500)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_export_equals_one_process(tmp_path):
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4".strip(), JAX_PLATFORMS="cpu")
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, coordinator, str(i), str(tmp_path / "multi")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    single = subprocess.run([sys.executable, "-c", SCRIPT, "", "-1", str(tmp_path / "single")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert sum(f.endswith(".safetensors") for f in files) > 2  # several shards, so the order matters
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == files
    for name in files:
        assert (tmp_path / "multi" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
