"""`jaxft plan --topology h100-8`: the train step compiled by XLA:GPU for GPU nodes this machine does
not have (the CUDA PJRT plugin's compile-only devices), judged against what jax's allocator is given.

The plugin lives in `.venv/gpu-plan` (Makefile), outside the venv: the compiling runs in subprocesses
that put it on their path."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxft.train import chips
from jaxft.train.chips import GPUS, TopologyError, parse_topology, topology_target, usable_bytes

PLUGIN = Path(sys.prefix) / "gpu-plan"
MIB = 2**20
TINY = textwrap.dedent("""\
    run_dir: run
    model: {preset: tiny-llama, vocab_size: 2048, d_model: 128, n_layers: 2, n_heads: 4, n_kv_heads: 2,
            mlp_dim: 384, max_seq_len: 128}
    data: {seq_len: 128}
    train: {global_batch: 16, steps: 10}
""")


def test_gpu_names_become_nodes():
    t = parse_topology("h100-8")
    assert (t.name, t.n_chips, t.nodes, t.describe()) == ("1x1x8", 8, 1, "h100-8 (1 node x 8 NVIDIA H100 80GB HBM3)")
    t = parse_topology("H200-16")
    assert (t.name, t.n_chips, t.nodes) == ("1x2x8", 16, 2)
    assert parse_topology("a100-4").name == "1x1x4"
    assert parse_topology("h100").n_chips == 8  # one node
    for bad in ("h100-12", "h100-3", "h100-0", "h300-8"):
        with pytest.raises(TopologyError, match="--topology"):
            parse_topology(bad)
    with pytest.raises(TopologyError, match="--num-slices: GPU nodes are counted in the name"):
        parse_topology("h100-8", num_slices=2)


def test_device_kinds_name_their_chip_and_peak(monkeypatch):
    """The running MFU's peak comes from the same table as the plans' (one source of vendor figures)."""
    import jax

    from jaxft.train import metric_sinks

    kinds = {"TPU v5 lite": ("v5e", 197e12), "TPU v5": ("v5p", 459e12), "TPU v5p": ("v5p", 459e12),
             "TPU v6 lite": ("v6e", 918e12), "TPU v4": ("v4", 275e12), "NVIDIA H100 80GB HBM3": ("h100", 989e12),
             "NVIDIA H200": ("h200", 989e12), "NVIDIA A100-SXM4-80GB": ("a100", 312e12)}
    for kind, (name, peak) in kinds.items():
        chip = chips.chip_of_kind(kind)
        assert (chip.name, chip.peak_bf16) == (name, peak), kind
    assert chips.chip_of_kind("cpu") is None and chips.chip_of_kind("NVIDIA GeForce RTX 4090") is None

    class Device:
        device_kind = "TPU v5 lite"

    metric_sinks.device_peak_flops.cache_clear()
    monkeypatch.setattr(jax, "local_devices", lambda: [Device()])
    try:
        assert metric_sinks.device_peak_flops() == 197e12
    finally:
        metric_sinks.device_peak_flops.cache_clear()


def test_a_gpu_program_gets_jax_s_memory_fraction(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    h100 = GPUS["h100"]
    assert usable_bytes(h100) == int(0.75 * 81559 * MIB)  # jax's default fraction
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert usable_bytes(h100) == int(0.9 * 81559 * MIB)
    target = topology_target(parse_topology("h100-8"))
    assert target["capacity"] == int(0.9 * 81559 * MIB) and "0.90 of each GPU's memory" in target["target"]
    assert usable_bytes(chips.CHIPS["v5e"]) == chips.CHIPS["v5e"].usable_hbm  # TPUs: the compiler's figure
    for bad in ("abc", "1.5", "0"):
        monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", bad)
        with pytest.raises(TopologyError, match="XLA_PYTHON_CLIENT_MEM_FRACTION"):
            usable_bytes(h100)


def test_planning_for_gpus_without_the_plugin_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jax_plugins.xla_cuda12" else real(name, *a))
    with pytest.raises(TopologyError, match=r"pip install 'jaxft\[gpu-plan\]'"):
        chips.abstract_devices(parse_topology("h100-8"))


def _run(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    assert PLUGIN.is_dir(), f"{PLUGIN} is missing: `make install-test` puts the CUDA plugin there"
    (tmp_path / "tiny.yaml").write_text(TINY)
    full = {**os.environ, "JAX_PLATFORMS": "cpu", **env,
            "PYTHONPATH": os.pathsep.join([str(PLUGIN), os.environ.get("PYTHONPATH", "")])}
    full.pop("XLA_FLAGS", None)  # the fake CPU devices play no part
    if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env:  # jax's default share, whatever this shell set
        full.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=full, capture_output=True, text=True,
                          timeout=600)


CHECKS = textwrap.dedent("""\
    import json
    from jaxft.config.loader import load_config
    from jaxft.train.aot import lower_step_parts
    from jaxft.train.chips import abstract_devices, parse_topology, topology_target
    from jaxft.train.plan import plan

    out = {}
    for name in ("h100-8", "h200-16"):
        topology = parse_topology(name)
        p = plan(lambda o: load_config("tiny.yaml", o), [], abstract_devices(topology), **topology_target(topology))
        out[name] = p.to_json()
    # bfloat16 with the cuDNN kernel: the compiled step holds cuDNN's fused attention, forward and backward
    cfg = load_config("tiny.yaml", ["model.dtype=bfloat16", "model.attention_kernel=cudnn"])
    text = lower_step_parts(cfg, abstract_devices(parse_topology("h100-1"))).lowered.compile().as_text()
    out["fmha"] = [line.split("custom_call_target=")[1].split(",")[0] for line in text.splitlines()
                   if "custom_call_target=\\"__cudnn$fmha" in line]
    print("RESULT", json.dumps(out, default=str))
""")


def test_the_train_step_compiles_for_gpu_nodes(tmp_path):
    r = _run(["-c", CHECKS], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    one, two = out["h100-8"], out["h200-16"]
    assert (one["n_chips"], one["mesh"], one["fits"]) == (8, {"data": 8, "fsdp": 1, "tensor": 1}, True)
    assert one["capacity"] == int(0.75 * 81559 * MIB) and two["capacity"] == int(0.75 * 143771 * MIB)
    assert two["n_chips"] == 16 and two["mesh"]["data"] == 16
    # data parallel: the gradients' all-reduce, each GPU's whole (float32) copy of the parameters
    params = one["memory"]["params"]
    assert one["collectives"]["all-reduce"] == pytest.approx(params, rel=0.01)
    assert one["memory"]["total"] > params + one["memory"]["optimizer"]
    # no cost analysis from XLA:GPU: FLOPs and traffic of the compiled kernels (hlo_cost.kernel_floor),
    # whose products are the model's; collectives over NVLink within a node, each GPU's NIC across two
    for p, link in ((one, 900e9), (two, 50e9)):
        e = p["estimate"]
        assert p["flops"]["compiled"] == pytest.approx(p["flops"]["model"], rel=0.25)
        assert e["compute_s"] == pytest.approx(max(p["flops"].values()) / 989e12)
        assert e["kernels_s"] >= e["hbm_s"] * (1 - 1e-9) and e["hbm_s"] > 0  # each kernel's slower bound, summed
        assert e["ici_s"] == pytest.approx(2 * p["collectives"]["all-reduce"] / link)
        assert e["step_s"] == pytest.approx(max(e["compute_s"], e["kernels_s"], e["ici_s"]))
    # two layers, forward and backward (the causal mask with packed rows' segments goes in as a bias)
    forward, backward = '"__cudnn$fmhaScaleBiasSoftmax"', '"__cudnn$fmhaScaleBiasSoftmaxBackward"'
    assert sorted(out["fmha"]) == [forward] * 2 + [backward] * 2


def test_gpu_plan_cli_verdicts(tmp_path):
    r = _run(["-m", "jaxft.cli", "plan", "tiny.yaml", "--topology", "a100-8"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "plan for a100-8 (1 node x 8 NVIDIA A100-SXM4-80GB), 0.75 of each GPU's memory" in r.stdout
    assert "FITS" in r.stdout and "(the compiled kernels' products: XLA:GPU gives no cost analysis)" in r.stdout
    assert re.search(r"roofline: step >= [\d.]+ ms \(compute [\d.]+, HBM [\d.]+, kernels [\d.]+, ICI", r.stdout)
    # a run that gives jax's allocator ~12 MiB of each GPU: the same step does not fit, exit status 1
    r = _run(["-m", "jaxft.cli", "plan", "tiny.yaml", "--topology", "a100-8", "--no-suggest"], tmp_path,
             XLA_PYTHON_CLIENT_MEM_FRACTION="0.00015")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "DOES NOT FIT" in r.stdout and "0.00 of each GPU's memory" in r.stdout


def test_the_bf16_step_for_a_gpu_has_bf16_products_only(tmp_path):
    """`benchmarks/gpu_compile.py` at a small shape: every matmul of the compiled bf16 train step
    (the head's backward included, `layers._widened_dot`) has bf16 operands; cuDNN attention forward and
    backward in the scanned layer.  `model.remat: dots` runs cuDNN's forward again in the backward
    pass, `dots_attention` keeps its results: fewer temporaries than no remat, same products."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_compile.py"
    # b4 x 512: at b2 x 256 the head's float32 gradient (0.24 GiB) decides the peak, not the layers
    r = _run([str(script), "--gpu", "h100-1", "--layers", "2", "--batch", "4", "--seq", "512",
              "--remat", "none,dots,dots_attention"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = {o["remat"]: o for o in (json.loads(line) for line in r.stdout.splitlines() if line.startswith("{"))}
    flops = out["none"]["product_TFLOP_by_operands (loop bodies once)"]
    assert list(flops) == ["bf16 x bf16"] and flops["bf16 x bf16"] > 0
    assert out["none"]["cudnn_attention_calls"] == 2 and out["none"]["temporaries_GiB"] > 0
    assert out["dots"]["cudnn_attention_calls"] == 3 and out["dots_attention"]["cudnn_attention_calls"] == 2
    assert out["dots_attention"]["temporaries_GiB"] < out["none"]["temporaries_GiB"]
    assert out["dots_attention"]["product_TFLOP_by_operands (loop bodies once)"] == flops


def test_greedy_decoding_for_a_gpu_casts_the_weights_once(tmp_path):
    """`gpu_compile.py --decode`: with float32 parameters and bf16 compute, the decoding loop reads
    no float32 weight (XLA:GPU left each step's casts in the loop: `jaxft.models.precast`), with
    fewer kernels and fewer bytes per token than with the casts in the loop."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_compile.py"
    r = _run([str(script), "--decode", "--precast", "both", "--gpu", "h100-1", "--layers", "2", "--batch", "2",
              "--seq", "64", "--new", "8", "--vocab", "512"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = {o["precast"]: o for o in (json.loads(line) for line in r.stdout.splitlines() if line.startswith("{"))}
    assert out["on"]["float32_weights_in_loop"] == 0 < out["off"]["float32_weights_in_loop"]
    assert out["on"]["kernels_per_token"] < out["off"]["kernels_per_token"]
    assert out["on"]["kernel_bytes_per_token_GB"] < out["off"]["kernel_bytes_per_token_GB"] / 2
