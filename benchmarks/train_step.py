"""Train-step throughput: jaxft vs Hugging Face transformers (PyTorch) on the same
LLaMA-shaped model, batch and optimizer (AdamW), measured in one run.

Reports tokens/s for both, the ratio, and model-FLOPs utilisation against the
device's *measured* peak (a large f32 matmul timed in the same run).

    python benchmarks/train_step.py [--d-model 512 --layers 8 --batch 8 --seq 256 --steps 10]

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
import jax.numpy as jnp
import numpy as np


def measure_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a).lower(x).compile()
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def batch_arrays(args, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab, size=(args.batch, args.seq + 1)).astype(np.int32)
    ones = np.ones((args.batch, args.seq), np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": ones.astype(np.float32),
            "segment_ids": ones, "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32),
                                                              (args.batch, args.seq)).copy()}


def time_steps(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def bench_jaxft(args, model_cfg, batch) -> tuple[list[float], float]:
    from jaxft.config.schema import MeshConfig, OptimizerConfig, TrainConfig
    from jaxft.sharding import batch_sharding, make_mesh, use_mesh
    from jaxft.train.optim import make_optimizer, make_schedule
    from jaxft.train.state import init_train_state, make_init_fn
    from jaxft.train.step import jit_train_step, make_train_step

    opt = OptimizerConfig(lr=1e-4, schedule="constant", weight_decay=0.0, clip_norm=None)
    tcfg = TrainConfig(global_batch=args.batch)
    tx = make_optimizer(opt, 100)
    mesh = make_mesh(MeshConfig(data=-1))
    init_fn, graphdef = make_init_fn(model_cfg, tcfg, tx, seed=0)
    with use_mesh(mesh):
        state, shardings = init_train_state(init_fn, mesh)
        bs = batch_sharding(mesh)
        step_fn = jit_train_step(make_train_step(graphdef, tx, tcfg, make_schedule(opt, 100)), shardings, bs)
        dev_batch = jax.device_put(batch, bs)
        holder = {"state": state}

        def step():
            holder["state"], m = step_fn(holder["state"], dev_batch)
            holder["loss"] = float(m["loss"])  # blocks until the step is done

        time_steps(step, 2)  # compile + warm up
        return time_steps(step, args.steps), holder["loss"]


def bench_torch(args, model_cfg, batch) -> tuple[list[float], float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    hf_cfg = LlamaConfig(vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.d_model,
                         intermediate_size=model_cfg.mlp_dim, num_hidden_layers=model_cfg.n_layers,
                         num_attention_heads=model_cfg.n_heads, num_key_value_heads=model_cfg.kv_heads,
                         max_position_embeddings=args.seq, rms_norm_eps=model_cfg.norm_eps,
                         rope_theta=model_cfg.rope_theta, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    inputs = torch.from_numpy(batch["inputs"]).long()
    labels = torch.from_numpy(batch["targets"]).long()
    holder = {}

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        opt.step()
        holder["loss"] = float(loss)

    time_steps(step, 2)
    return time_steps(step, args.steps), holder["loss"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args()

    from jaxft.config.schema import ModelConfig
    from jaxft.models.flops import param_count, train_flops_per_token

    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, mlp_dim=args.mlp, dtype="float32", max_seq_len=args.seq,
                      norm_eps=1e-6)
    batch = batch_arrays(args, args.vocab)
    tokens = args.batch * args.seq
    flops_step = train_flops_per_token(cfg, args.seq) * tokens
    peak = measure_peak_flops()
    jx, jx_loss = bench_jaxft(args, cfg, batch)
    pt, pt_loss = bench_torch(args, cfg, batch)
    j_med, p_med = statistics.median(jx), statistics.median(pt)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {jax.devices()[0].device_kind}",
        "devices": jax.device_count(), "params": param_count(cfg), "batch": args.batch, "seq": args.seq,
        "jaxft_step_s": j_med, "torch_step_s": p_med,
        "jaxft_tokens_per_s": tokens / j_med, "torch_tokens_per_s": tokens / p_med,
        "speedup_vs_torch": p_med / j_med, "measured_peak_tflops": peak / 1e12,
        "jaxft_mfu": flops_step / j_med / (peak * jax.device_count()),
        "torch_mfu": flops_step / p_med / (peak * jax.device_count()),
        "jaxft_loss": jx_loss, "torch_loss": pt_loss,
    }
    print(json.dumps(result))
    print(f"| {result['date']} | {result['machine']} | {result['params'] / 1e6:.1f}M llama, "
          f"b{args.batch}x{args.seq} fp32 AdamW | {result['jaxft_tokens_per_s']:.0f} | "
          f"{result['torch_tokens_per_s']:.0f} | {result['speedup_vs_torch']:.2f}x | "
          f"{result['jaxft_mfu']:.1%} / {result['torch_mfu']:.1%} of {peak / 1e9:.0f} GFLOP/s |")


if __name__ == "__main__":
    main()
