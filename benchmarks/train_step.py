"""Train-step throughput: jaxft vs Hugging Face transformers (PyTorch) on the same
model (LLaMA or mT5 shape), batch and optimizer (AdamW), measured in one run.

Reports tokens/s for both, the ratio, and model-FLOPs utilisation against the
device's *measured* peak (a large f32 matmul timed in the same run by XLA; torch's own
matmul peak is reported beside it: on some CPUs its BLAS is faster than XLA's kernels).

    python benchmarks/train_step.py --preset 32m          # or 5m, 100m, mt5-90m
    python benchmarks/train_step.py [--family llama|mt5 --d-model 512 --layers 8 --batch 8 --seq 256]
    python benchmarks/train_step.py --preset 1b --dtype bfloat16   # on a GPU: torch on cuda, SDPA

``--dtype bfloat16`` is mixed precision on both sides (float32 parameters and AdamW state, bf16
compute: jaxft's ``model.dtype``, torch's ``autocast``), with the peak a bf16 matmul.  On an
accelerator the peak matmul is 8192^2 and torch runs on ``--device cuda`` (the default when
torch sees one).

The mT5 model is built by transformers from an ``MT5Config`` and converted to a jaxft
``ModelConfig`` by `jaxft.interop.hf`, so both sides have the same shapes; its batch has
``--seq`` source and ``--seq`` target tokens, tokens/s counts target tokens.

Needs the test extra (torch, transformers).  Prints one Markdown row for
benchmarks/RESULTS.md and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np


def peak_size() -> int:
    return 2048 if jax.default_backend() == "cpu" else 8192


def measure_peak_flops(n: int = 0, repeats: int = 5, dtype: str = "float32") -> float:
    n = n or peak_size()
    x = jax.random.normal(jax.random.key(0), (n, n), dtype)  # random data: zeros / ones run faster on GPUs
    f = jax.jit(lambda a: a @ a).lower(x).compile()
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


# Shapes of the sizes the performance issue names (params with these vocabularies).
PRESETS = {
    "5m": dict(family="llama", d_model=256, layers=4, heads=4, kv_heads=2, mlp=704, vocab=4096, seq=128),
    "32m": dict(family="llama", d_model=512, layers=8, heads=8, kv_heads=4, mlp=1408, vocab=8192, seq=256),
    "100m": dict(family="llama", d_model=768, layers=12, heads=12, kv_heads=4, mlp=2048, vocab=16384, seq=256),
    # the GPU check of the performance issue: a 1B decoder-only model in bf16 (TinyLlama's shape)
    "1b": dict(family="llama", d_model=2048, layers=22, heads=32, kv_heads=4, mlp=5632, vocab=32000, seq=2048),
    "mt5-90m": dict(family="mt5", d_model=512, layers=8, heads=8, kv_heads=8, mlp=1344, vocab=32128, seq=256),
}


def measure_torch_peak_flops(threads: int, n: int = 0, repeats: int = 5, dtype: str = "float32",
                             device: str = "cpu") -> float:
    """The same matmul by torch (its CPU BLAS, or cuBLAS): the device's peak is the faster of the two."""
    import torch

    # XLA:CPU flushes denormals to zero; torch does not by default, and HF's mT5 initialisation
    # (loss ~80) makes enough of them to slow its step 5x on some CPUs. FTZ to FTZ, set before
    # torch's first parallel op: its worker threads copy the flag when they start.
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    n = n or peak_size()
    x = torch.randn((n, n), dtype=getattr(torch, dtype), device=device)

    def product():
        x @ x
        if device != "cpu":
            torch.cuda.synchronize()

    product()
    return 2 * n**3 / min(time_steps(product, repeats))


def batch_arrays(args, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab, size=(args.batch, args.seq + 1)).astype(np.int32)
    ones = np.ones((args.batch, args.seq), np.int32)
    positions = np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy()
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": ones.astype(np.float32),
             "segment_ids": ones, "positions": positions}
    if getattr(args, "family", "llama") == "mt5":
        batch.update(enc_inputs=rng.integers(3, vocab, size=(args.batch, args.seq)).astype(np.int32),
                     enc_segment_ids=ones, enc_positions=positions)
    return batch


def time_steps(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def bench_jaxft(args, model_cfg, batch) -> tuple[list[float], float, str]:
    from jaxft.config.schema import MeshConfig, OptimizerConfig, TrainConfig
    from jaxft.models.registry import model_input_keys
    from jaxft.sharding import batch_sharding, make_mesh, use_mesh
    from jaxft.train.optim import make_optimizer, make_schedule
    from jaxft.train.state import init_train_state, make_init_fn
    from jaxft.train.step import jit_train_step, make_train_step

    opt = OptimizerConfig(lr=1e-4, schedule="constant", weight_decay=0.0, clip_norm=None)
    tcfg = TrainConfig(global_batch=args.batch, **{k: v for k, v in (("loss_chunk", args.loss_chunk),
                                                                   ("loss_chunk_mib", args.loss_chunk_mib)) if v is not None})
    tx = make_optimizer(opt, 100)
    mesh = make_mesh(MeshConfig(data=-1))
    init_fn, graphdef = make_init_fn(model_cfg, tcfg, tx, seed=0)
    t0 = time.perf_counter()
    if args.init_on_host:  # XLA:GPU compiled the unrolled 1B init for minutes: build it on the host CPU,
        # outside the mesh (under it, the jit is placed on the mesh's devices), then move it
        with jax.default_device(jax.devices("cpu")[0]):
            host_state = jax.jit(init_fn)()
        print(f"jaxft: state built on the host in {time.perf_counter() - t0:.1f}s", flush=True)
    with use_mesh(mesh):
        if args.init_on_host:
            from jaxft.train.state import state_shardings

            shardings = state_shardings(jax.eval_shape(init_fn), mesh)
            # the same leaves; the tree's metadata (logical sharding names) differs outside the mesh
            assert len(jax.tree.leaves(host_state)) == len(jax.tree.leaves(shardings))
            leaves = [jax.device_put(x, sh) for x, sh in zip(jax.tree.leaves(host_state), jax.tree.leaves(shardings))]
            state = jax.tree.unflatten(jax.tree.structure(shardings), leaves)
            del host_state
        else:
            state, shardings = init_train_state(init_fn, mesh)
        jax.block_until_ready(state)
        print(f"jaxft: state initialised in {time.perf_counter() - t0:.1f}s", flush=True)
        bs = batch_sharding(mesh)
        step_fn = jit_train_step(make_train_step(graphdef, tx, tcfg, make_schedule(opt, 100),
                                                     model_input_keys(model_cfg)), shardings, bs)
        dev_batch = jax.device_put(batch, bs)
        holder = {"state": state}

        # compiled here (the timed calls run this executable, so nothing compiles twice): on a GPU its
        # program gives the step's roofline floor (`gpu_floor`)
        compiled = step_fn.lower(holder["state"], dev_batch).compile()
        holder["hlo"] = compiled.as_text() if jax.default_backend() == "gpu" else ""

        def step():
            holder["state"], m = compiled(holder["state"], dev_batch)
            holder["loss"] = float(m["loss"])  # blocks until the step is done

        t0 = time.perf_counter()
        time_steps(step, 2)  # compile + warm up
        print(f"jaxft: compile + 2 steps in {time.perf_counter() - t0:.1f}s", flush=True)
        times = time_steps(step, args.steps)
        print(f"jaxft: median step {statistics.median(times):.4f}s", flush=True)
        return times, holder["loss"], holder["hlo"]


def gpu_floor(hlo: str, peak: float) -> dict:
    """The compiled step's per-kernel floor (`jaxft.train.hlo_cost.kernel_floor`) at the measured
    matmul peak and the GPU's vendor HBM bandwidth: how far the measured step is from it, and
    what the floor is made of.  Empty off a GPU or for a GPU `chips.GPUS` does not list."""
    from jaxft.train.chips import GPUS
    from jaxft.train.hlo_cost import kernel_floor

    chip = next((c for c in GPUS.values() if c.kind == jax.devices()[0].device_kind), None)
    if not hlo or chip is None:
        return {}
    f = kernel_floor(hlo, peak, chip.hbm_bw, top=5)
    return {"floor_s": f["seconds"], "floor_by_kind_ms": {k: round(g["seconds"] * 1e3, 2) for k, g in f["by_kind"].items()},
            "floor_heaviest_other": [f"{t['ms']} ms {t['runs']}x {t['op'][-60:]}" for t in f["top"]]}


def hf_model(args, model_cfg):
    """The transformers model of the same shape (dropout off, as in the jaxft step)."""
    import transformers

    if args.family == "mt5":
        return transformers.MT5ForConditionalGeneration(mt5_hf_config(args))
    hf_cfg = transformers.LlamaConfig(
        vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.d_model, intermediate_size=model_cfg.mlp_dim,
        num_hidden_layers=model_cfg.n_layers, num_attention_heads=model_cfg.n_heads,
        num_key_value_heads=model_cfg.kv_heads, max_position_embeddings=args.seq, rms_norm_eps=model_cfg.norm_eps,
        rope_theta=model_cfg.rope_theta, tie_word_embeddings=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(hf_cfg)


def mt5_hf_config(args):
    import transformers

    return transformers.MT5Config(vocab_size=args.vocab, d_model=args.d_model, d_kv=args.d_model // args.heads,
                                  d_ff=args.mlp, num_layers=args.layers, num_decoder_layers=args.layers,
                                  num_heads=args.heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                  dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def bench_torch(args, model_cfg, batch) -> tuple[list[float], float]:
    import contextlib

    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = args.device
    with torch.device(device):  # built where it runs (a 1B model's init on the host CPU takes a while)
        model = hf_model(args, model_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    inputs = torch.from_numpy(batch["inputs"]).long().to(device)
    labels = torch.from_numpy(batch["targets"]).long().to(device)
    kw = {"input_ids": inputs}
    if args.family == "mt5":
        kw = {"input_ids": torch.from_numpy(batch["enc_inputs"]).long().to(device), "decoder_input_ids": inputs}
    holder = {}
    # mixed precision as HF's Trainer does it: float32 weights and optimizer, bf16 compute
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(**kw).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        opt.step()
        holder["loss"] = float(loss)

    time_steps(step, 2)
    times = time_steps(step, args.steps)
    print(f"torch: median step {statistics.median(times):.4f}s", flush=True)
    return times, holder["loss"]


def model_config(args):
    from jaxft.config.schema import ModelConfig

    if args.family == "mt5":
        import dataclasses

        from jaxft.interop.hf import hf_config_to_model_config

        cfg = hf_config_to_model_config(mt5_hf_config(args).to_dict())
        return dataclasses.replace(cfg, dtype=args.dtype, dropout=0.0, max_seq_len=max(cfg.max_seq_len, args.seq))
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.kv_heads, mlp_dim=args.mlp, dtype=args.dtype, max_seq_len=args.seq,
                       norm_eps=1e-6, attention_kernel=args.attention_kernel, remat=args.remat,
                       scan_layers=args.scan_layers)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named shape (the flags below override it)")
    p.add_argument("--family", choices=("llama", "mt5"))
    p.add_argument("--d-model", type=int)
    p.add_argument("--layers", type=int, help="layers (mT5: per stack)")
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--mlp", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--loss-chunk", type=int, default=None, help="train.loss_chunk (default: the config's)")
    p.add_argument("--loss-chunk-mib", type=float, default=None, help="train.loss_chunk_mib (default: the config's)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of both sides (parameters and optimizer stay float32)")
    p.add_argument("--device", default=None, help="torch's device (default: cuda when available, else cpu)")
    p.add_argument("--attention-kernel", default="auto", help="jaxft's model.attention_kernel")
    p.add_argument("--cudnn-causal", type=int, default=1, help="0: cuDNN gets the dense causal mask alone")
    p.add_argument("--remat", default="none", help="jaxft's model.remat")
    p.add_argument("--scan-layers", action="store_true", help="jaxft's model.scan_layers")
    p.add_argument("--init-on-host", action="store_true", help="jaxft's state built on the CPU, then moved")
    p.add_argument("--no-peer", action="store_true", help="jaxft alone (a variant of a run that measured the peer)")
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for key, value in PRESETS[args.preset or "32m"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    import logging

    from jaxft.models import kernels
    from jaxft.models.flops import param_count, train_flops_per_example

    args = parse_args()
    cfg = model_config(args)
    batch = batch_arrays(args, args.vocab)
    tokens = args.batch * args.seq
    flops_step = train_flops_per_example(cfg, args.seq) * args.batch
    peak = measure_peak_flops(dtype=args.dtype)
    torch_peak = measure_torch_peak_flops(args.threads, dtype=args.dtype, device=args.device)
    kernels.CUDNN_CAUSAL = bool(args.cudnn_causal)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("jaxft.models.kernels").setLevel(logging.INFO)  # a kernel's fallback, once
    if args.no_peer:
        pt, pt_loss = [float("nan")], float("nan")
    elif args.device != "cpu":  # torch first: its cached GPU memory can be handed back, XLA's cannot
        pt, pt_loss = bench_torch(args, cfg, batch)
        import torch

        torch.cuda.empty_cache()
    jx, jx_loss, hlo = bench_jaxft(args, cfg, batch)
    if args.device == "cpu" and not args.no_peer:
        pt, pt_loss = bench_torch(args, cfg, batch)
    j_med, p_med = statistics.median(jx), statistics.median(pt)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {jax.devices()[0].device_kind}",
        "devices": jax.device_count(), "dtype": args.dtype, "torch_device": args.device,
        "family": args.family, "params": param_count(cfg), "batch": args.batch,
        "seq": args.seq, "jaxft_step_s": j_med, "torch_step_s": p_med,
        "jaxft_tokens_per_s": tokens / j_med, "torch_tokens_per_s": tokens / p_med,
        "speedup_vs_torch": p_med / j_med, "measured_peak_tflops": peak / 1e12,
        "torch_matmul_peak_tflops": torch_peak / 1e12,
        "jaxft_mfu": flops_step / j_med / (peak * jax.device_count()),
        "torch_mfu": flops_step / p_med / (peak * jax.device_count()),
        "jaxft_mfu_of_best_peak": flops_step / j_med / (max(peak, torch_peak) * jax.device_count()),
        "jaxft_loss": jx_loss, "torch_loss": pt_loss, "attention_kernel": args.attention_kernel,
        "cudnn_causal": args.cudnn_causal, "remat": args.remat, "scan_layers": args.scan_layers,
        **gpu_floor(hlo, peak),
    }
    if "floor_s" in result:
        result["jaxft_step_over_floor"] = j_med / result["floor_s"]
    print(json.dumps(result))
    print(f"| {result['date']} | {result['machine']} | {result['params'] / 1e6:.1f}M {args.family}, "
          f"b{args.batch}x{args.seq} {args.dtype} AdamW ({jax.default_backend()} / torch {args.device}) | {result['jaxft_tokens_per_s']:.0f} | "
          f"{result['torch_tokens_per_s']:.0f} | {result['speedup_vs_torch']:.2f}x | "
          f"{result['jaxft_mfu']:.1%} / {result['torch_mfu']:.1%} of {peak / 1e9:.0f} GFLOP/s "
          f"(torch's matmul: {torch_peak / 1e9:.0f}) |")


if __name__ == "__main__":
    main()
