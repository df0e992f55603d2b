"""The 1B decoder-only bf16 train step (and its state init) compiled by XLA:GPU for an NVIDIA GPU
this machine does not have: the CUDA PJRT plugin's compile-only devices (`jaxft plan --topology
h200-1` uses the same), no GPU needed.  Compiled only: nothing runs, so no step time.

Per compile: seconds, the compiled program's memory (arguments, temporaries), the matmul FLOPs of
the optimized program grouped by operand dtypes (float32 products run at TF32 / FP32 rates, half
or less of bf16's), the cuDNN attention calls, and the kernels (fusions, custom calls) in each
loop body (the scanned layer's forward and backward, the loss's chunk).  Loop bodies are counted
once, as in the HLO; the FLOPs column says so.  With --decode: greedy `generate` of the same shape
(float32 parameters, bf16 compute): kernels per token, the bytes they read and write per token, and
how many float32 weights the loop reads (`models.precast` casts them once, before the loop).
The train step's report also gives its per-kernel roofline floor at the GPU's vendor peaks
(`jaxft.train.hlo_cost.kernel_floor`: each kernel at the slower of its traffic and its products),
the MFU that floor caps, and the heaviest kernels that are not products.

    python benchmarks/gpu_compile.py [--gpu h200-1] [--layers 22] [--vocab 32000] [--no-scan] [--init]
        [--remat none,dots,dots_attention]
    python benchmarks/gpu_compile.py --decode [--precast on|off|both] [--layers 22 --seq 2048 --new 128]

The plugin: `make install-test` puts it in .venv/gpu-plan (added to the path here when present),
or `pip install 'jaxft[gpu-plan]'`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs nothing
if (Path(sys.prefix) / "gpu-plan").is_dir():
    sys.path.insert(0, str(Path(sys.prefix) / "gpu-plan"))


def computations(hlo: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif line.startswith("}"):
            name = None
        elif name:
            out[name].append(line)
    return out


def product_flops(comps: dict[str, list[str]]) -> dict[str, float]:
    """2 x output elements x contracted size of every dot, by its operands' dtypes."""
    flops: dict[str, float] = collections.Counter()
    for lines in comps.values():
        defs = {m.group(1): (m.group(2), m.group(3)) for m in
                (re.search(r"%([\w.\-]+) = (\w+)\[([\d,]*)\]", line) for line in lines) if m}
        for line in lines:
            d = re.search(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\).*lhs_contracting_dims=\{([\d,]*)\}",
                          line)
            if not d or d.group(2) not in defs or d.group(3) not in defs:
                continue
            lhs = [int(x) for x in defs[d.group(2)][1].split(",") if x]
            k = 1
            for i in d.group(4).split(","):
                k *= lhs[int(i)] if i else 1
            n = 1
            for x in d.group(1).split(","):
                n *= int(x) if x else 1
            flops[f"{defs[d.group(2)][0]} x {defs[d.group(3)][0]}"] += 2.0 * n * k
    return dict(flops)


def loop_bodies(hlo: str) -> list[str]:
    return re.findall(r"while\(.*?body=%([\w.\-]+)", hlo)


def kernels(lines: list[str]) -> int:
    """Kernel launches (fusions, custom calls) in a computation."""
    return sum(1 for line in lines if re.search(r"= \S+ (fusion|custom-call)\(", line))


def loop_kernels(hlo: str, comps: dict[str, list[str]]) -> list[int]:
    return [kernels(comps.get(b, [])) for b in loop_bodies(hlo)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", default="h200-1", help="a100-N / h100-N / h200-N (`jaxft plan --topology`)")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--no-scan", action="store_true", help="layers unrolled (default: model.scan_layers)")
    p.add_argument("--init", action="store_true", help="also compile the train state's init")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--microbatches", type=int, default=1, help="train.microbatches (each of --batch rows)")
    p.add_argument("--remat", default="none",
                   help="model.remat, or several (comma-separated: one compile each): none, full, dots, dots_no_batch, "
                        "dots_attention")
    p.add_argument("--decode", action="store_true",
                   help="compile greedy decoding instead (float32 parameters, bf16 compute; prompt --seq, --new tokens)")
    p.add_argument("--new", type=int, default=128, help="--decode: new tokens")
    p.add_argument("--precast", choices=("on", "off", "both"), default="on",
                   help="--decode: off = the weights cast inside the loop, as before `models.precast`")
    args = p.parse_args()
    if args.decode:
        return decode(args)

    import jax

    from jaxft.config.schema import MeshConfig, OptimizerConfig, TrainConfig
    from jaxft.models.flops import train_flops_per_example
    from jaxft.models.registry import model_input_keys
    from jaxft.sharding import batch_sharding, make_mesh, use_mesh
    from jaxft.train.chips import abstract_devices, parse_topology
    from jaxft.train.optim import make_optimizer, make_schedule
    from jaxft.train.state import make_init_fn, state_shardings
    from jaxft.train.step import abstract_batch, jit_train_step, make_train_step

    devices = abstract_devices(parse_topology(args.gpu))
    opt = OptimizerConfig(lr=1e-4, schedule="constant", weight_decay=0.0, clip_norm=None)
    tx = make_optimizer(opt, 100)
    mesh = make_mesh(MeshConfig(data=-1), devices)
    tcfg = TrainConfig(global_batch=args.batch * args.microbatches, microbatches=args.microbatches)
    for remat in args.remat.split(","):
        cfg = model_config(args, remat=remat)
        init_fn, graphdef = make_init_fn(cfg, tcfg, tx, seed=0)
        with use_mesh(mesh):
            abstract = jax.eval_shape(init_fn)
            shardings = state_shardings(abstract, mesh)
            jobs = {}
            if args.init:
                jobs["init"] = lambda: jax.jit(init_fn, out_shardings=shardings).lower()
            bs = batch_sharding(mesh)
            step = jit_train_step(make_train_step(graphdef, tx, tcfg, make_schedule(opt, 100), model_input_keys(cfg)),
                                  shardings, bs)
            state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
            jobs["step"] = lambda: step.lower(state, abstract_batch(tcfg.global_batch, args.seq, bs, None))
            chip = parse_topology(args.gpu).chip
            model_flops = train_flops_per_example(cfg, args.seq) * tcfg.global_batch
            for what, lower in jobs.items():
                report(what, lower, args, remat, devices[0].device_kind,
                       (chip, model_flops) if what == "step" else None)


def model_config(args, **kw):
    from jaxft.config.schema import ModelConfig
    return ModelConfig(vocab_size=args.vocab, d_model=2048, n_layers=args.layers, n_heads=32, n_kv_heads=4,
                       mlp_dim=5632, dtype="bfloat16", max_seq_len=args.seq + args.new, norm_eps=1e-6,
                       scan_layers=not args.no_scan, **kw)


def decode(args) -> None:
    """Greedy `generate` of the same model (per-layer parameters) compiled for the GPU: the loop
    body's kernels, the bytes its kernels read and write per token, float32 weights read there."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxft.config.schema import MeshConfig
    from jaxft.eval import decode as dec
    from jaxft.models import build_model
    from jaxft.sharding import make_mesh, use_mesh
    from jaxft.train.chips import abstract_devices, parse_topology

    devices = abstract_devices(parse_topology(args.gpu))
    mesh = make_mesh(MeshConfig(data=-1), devices)
    cfg = model_config(args, remat="none")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
    state = jax.tree.map(lambda a: spec(a.shape, a.dtype), state)
    key = spec((), jax.random.key(0).dtype)
    config = dec.DecodeConfig(strategy="greedy", max_len=args.new, min_len=args.new, eos_id=1)
    precast = dec.compute_dtype_states
    for mode in ("on", "off") if args.precast == "both" else (args.precast,):
        dec.compute_dtype_states = precast if mode == "on" else (lambda graphdef, states: states)
        dec._generate_jit.clear_cache()
        with use_mesh(mesh):
            t0 = time.perf_counter()
            compiled = dec._generate_jit.lower(graphdef, (state,), spec((args.batch, args.seq), jnp.int32), None,
                                               None, None, spec((args.batch, 0), jnp.int32), key, config=config).compile()
        decode_report(compiled, time.perf_counter() - t0, state, args, mode)
    dec.compute_dtype_states = precast


def decode_report(compiled, seconds: float, state, args, mode: str) -> None:
    import jax

    hlo = compiled.as_text()
    comps = computations(hlo)
    body = comps[loop_bodies(hlo)[-1]]
    weights = {f"f32[{','.join(map(str, a.shape))}]" for a in jax.tree.leaves(state) if a.ndim >= 2}
    print(json.dumps({
        "what": "decode", "gpu": args.gpu, "layers": args.layers, "vocab": args.vocab, "precast": mode,
        "batch": f"{args.batch} x {args.seq}+{args.new}", "compile_s": round(seconds, 1),
        "temporaries_GiB": round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 2),
        "kernels_per_token": kernels(body),
        "kernel_bytes_per_token_GB": round(kernel_bytes(body) / 1e9, 3),
        "float32_weights_in_loop": sum(1 for line in body if any(w + "{" in line for w in weights))}), flush=True)


def kernel_bytes(lines: list[str]) -> int:
    """Operand and result bytes of every kernel (fusion, custom call) in a computation."""
    width = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
    size = {}
    for line in lines:
        m = re.search(r"%([\w.\-]+) = (\w+)\[([\d,]*)\]", line)
        if m:
            size[m.group(1)] = width.get(m.group(2), 4) * int(np.prod([int(x) for x in m.group(3).split(",") if x]))
    total = 0
    for line in lines:
        m = re.search(r"%([\w.\-]+) = \S+ (?:fusion|custom-call)\((.*?)\)", line)
        if m:
            total += size.get(m.group(1), 0) + sum(size.get(o, 0) for o in re.findall(r"%([\w.\-]+)", m.group(2)))
    return total


def report(what: str, lower, args, remat: str, device_kind: str, floor_of=None) -> None:
    t0 = time.perf_counter()
    compiled = lower().compile()
    seconds = time.perf_counter() - t0
    hlo = compiled.as_text()
    comps = computations(hlo)
    mem = compiled.memory_analysis()
    print(json.dumps({
        "what": what, "gpu": args.gpu, "device": device_kind, "layers": args.layers, "vocab": args.vocab,
        "remat": remat, "scan": not args.no_scan, "batch": f"{args.batch}x{args.seq}", "compile_s": round(seconds, 1),
        "arguments_GiB": round(mem.argument_size_in_bytes / 2**30, 2),
        "temporaries_GiB": round(mem.temp_size_in_bytes / 2**30, 2),
        "product_TFLOP_by_operands (loop bodies once)": {k: round(v / 1e12, 3) for k, v in
                                                         product_flops(comps).items()},
        "cudnn_attention_calls": len(re.findall(r'custom_call_target="__cudnn\$fmha', hlo)),
        "kernels_per_loop_body": loop_kernels(hlo, comps), **(roofline(hlo, *floor_of) if floor_of else {})}),
          flush=True)


def roofline(hlo: str, chip, model_flops: float) -> dict:
    """The step's per-kernel floor at the GPU's vendor peaks (`jaxft.train.hlo_cost`), the MFU it
    caps, by kind of kernel, and the heaviest kernels that are not products."""
    from jaxft.train.hlo_cost import kernel_floor

    f = kernel_floor(hlo, chip.peak_bf16, chip.hbm_bw, top=8)
    return {"floor_ms": round(f["seconds"] * 1e3, 2), "kernel_GB": round(f["bytes"] / 1e9, 1),
            "launches": f["launches"], "model_TFLOP": round(model_flops / 1e12, 2),
            "mfu_ceiling": round(model_flops / (f["seconds"] * chip.peak_bf16), 3),
            "floor_by_kind": {k: {"ms": round(g["seconds"] * 1e3, 2), "GB": round(g["bytes"] / 1e9, 1),
                                  "launches": g["launches"]} for k, g in sorted(f["by_kind"].items())},
            "heaviest_other": [f"{t['ms']} ms {t['runs']}x {t['name']} ({t['op'][-60:]})" for t in f["top"]]}


if __name__ == "__main__":
    main()
