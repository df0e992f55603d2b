"""PEFT step time and memory: full finetuning vs LoRA vs LT-SFT phase 2, jaxft vs
Hugging Face transformers + PEFT (PyTorch), both model families, in one run.

jaxft variants (same model, batch, AdamW): `full`; `lora` (r=8, alpha=16 on the
attention q/k/v/o kernels, self- and cross-attention); `sparse` (LT-SFT phase 2:
the full state with a random 1% mask on the updates).  HF peers: `hf-lora`
(peft.get_peft_model, same targets) and `hf-full`.

Memory: "state MiB" is params + frozen rest + optimizer state + mask (jaxft:
summed over the TrainState's arrays; torch: all parameters + AdamW moments).
jaxft adds the compiled step's memory_analysis() (temp bytes in the table;
argument / output / alias bytes in the JSON).  PyTorch CPU memory has no
allocator stats, so each HF variant runs in a fresh subprocess; every variant
(both frameworks) also reports "RSS +N": the peak-RSS growth over warm-up + timed
steps (Linux: VmHWM after resetting it through /proc/self/clear_refs).  For
torch that includes AdamW's lazily allocated moments and the grads; jaxft's
state exists before the window, so its growth is step temporaries only.

    python benchmarks/peft_methods.py [--families decoder,t5 --d-model 768 --layers 8 --vocab 32000
                               --batch 4 --seq 128 --steps 5]

Defaults: ~100M parameters (99.5M LLaMA-style, 90.7M mT5-style with 4+4 layers),
about 6 minutes on 2 busy CPU cores; --d-model 512 --layers 4 --mlp 1408 --vocab 16000
(~25M) takes about 2.5.  Needs the test extra (torch, transformers, peft).  Prints
JSON lines, then Markdown rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

MiB = 2**20
JAX_VARIANTS, HF_VARIANTS = ("full", "lora", "sparse"), ("hf-lora", "hf-full")


def model_config(args, family: str):
    from jaxft.config.schema import ModelConfig

    common = dict(vocab_size=args.vocab, d_model=args.d_model, n_heads=args.heads, mlp_dim=args.mlp,
                  dtype="float32", param_dtype="float32", max_seq_len=args.seq, norm_eps=1e-6)
    if family == "decoder":
        return ModelConfig(family="decoder", n_layers=args.layers, n_kv_heads=args.kv_heads, **common)
    half = max(1, args.layers // 2)  # encoder + decoder stacks of layers/2: a similar parameter count
    return ModelConfig(family="t5", n_layers=half, n_decoder_layers=half, activation="geglu",
                       position="relative", decoder_start_id=0, init_std=1.0,
                       tie_embeddings=True, **common)  # transformers 5 always ties MT5's lm_head


def batch_arrays(args, family: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    B, L = args.batch, args.seq
    ones = np.ones((B, L), np.int32)
    pos = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy()
    tokens = rng.integers(3, args.vocab, size=(B, L + 1)).astype(np.int32)
    if family == "decoder":
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": ones.astype(np.float32),
                "segment_ids": ones, "positions": pos}
    targets = tokens[:, 1:]
    dec_in = np.concatenate([np.zeros((B, 1), np.int32), targets[:, :-1]], axis=1)  # shift right behind 0
    return {"enc_inputs": rng.integers(3, args.vocab, size=(B, L)).astype(np.int32), "enc_segment_ids": ones,
            "enc_positions": pos, "inputs": dec_in, "targets": targets, "weights": ones.astype(np.float32),
            "segment_ids": ones, "positions": pos}


def time_steps(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def rss_reset() -> int:
    """Resets the kernel's peak-RSS mark (Linux clear_refs 5); returns the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS:")
    except OSError:  # not Linux: ru_maxrss cannot be reset, the delta is then a lower bound
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_peak() -> int:
    try:
        return _status_bytes("VmHWM:")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_with_rss(step, args) -> tuple[list[float], int]:
    """Warm-up + timed steps; the peak-RSS growth over the RSS before them."""
    rss0 = rss_reset()
    time_steps(step, args.warmup)
    times = time_steps(step, args.steps)
    return times, rss_peak() - rss0


def tree_bytes(tree) -> int:
    import jax

    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def bench_jaxft(args, family: str, variant: str) -> dict:
    import jax

    from jaxft.config.schema import (LoraConfig, MeshConfig, OptimizerConfig, PeftConfig, SparseConfig,
                                     TrainConfig)
    from jaxft.models.registry import model_input_keys
    from jaxft.peft.sparse import select_mask
    from jaxft.sharding import batch_sharding, make_mesh, use_mesh
    from jaxft.train.optim import make_optimizer, make_schedule
    from jaxft.train.state import count_params, init_train_state, make_init_fn
    from jaxft.train.step import jit_train_step, make_train_step

    cfg = model_config(args, family)
    targets = (r"(attn|cross)/(q|k|v|o)/kernel$",)  # = PEFT's ["q","k","v","o"] on mT5 (cross-attention too)
    lora = LoraConfig(rank=8, alpha=16.0, targets=targets)
    peft_cfg = {"full": PeftConfig(), "lora": PeftConfig(method="lora", lora=lora),
                "sparse": PeftConfig(method="sparse", sparse=SparseConfig(k=0.01, mask_type="random"))}[variant]
    opt = OptimizerConfig(lr=1e-4, schedule="constant", weight_decay=0.0, clip_norm=None)
    tcfg = TrainConfig(global_batch=args.batch)
    tx = make_optimizer(opt, 100)
    mesh = make_mesh(MeshConfig(data=-1), jax.devices()[:1])
    init_fn, graphdef = make_init_fn(cfg, tcfg, tx, 0, peft_cfg)
    with use_mesh(mesh):
        state, shardings = init_train_state(init_fn, mesh)
        trainable = count_params(state.params)
        if variant == "sparse":  # phase 2: a random ~1% of the entries train
            mask = select_mask(state.params, state.params, peft_cfg.sparse, seed=0)
            state = state.replace(mask=jax.device_put(mask, shardings.mask))
            trainable = sum(int(m.sum()) for m in jax.tree.leaves(state.mask))
        bs = batch_sharding(mesh)
        step_fn = jit_train_step(make_train_step(graphdef, tx, tcfg, make_schedule(opt, 100), model_input_keys(cfg)),
                                 shardings, bs)
        batch = jax.device_put(batch_arrays(args, family), bs)
        t = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - t
        mem = compiled.memory_analysis()
        holder = {"state": state}
        del state

        def step():
            holder["state"], m = compiled(holder["state"], batch)
            holder["loss"] = float(m["loss"])  # blocks until the step is done

        times, rss_delta = timed_with_rss(step, args)
        s = holder["state"]
        parts = {"params": tree_bytes(s.params), "rest": tree_bytes(s.rest), "opt_state": tree_bytes(s.opt_state),
                 "mask": tree_bytes(s.mask)}
    return {"framework": "jaxft", "step_s": statistics.median(times), "min_step_s": min(times), "times": times,
            "loss": holder["loss"], "trainable": trainable, "state_bytes": sum(parts.values()),
            "state_parts": parts, "compile_s": compile_s, "peak_rss_delta_bytes": rss_delta,
            "peak_rss_bytes": rss_peak(), **{f"{k}_bytes": getattr(mem, f"{k}_size_in_bytes", None)
                                             for k in ("temp", "argument", "output", "alias")}}


def torch_worker(args, family: str, variant: str) -> dict:
    """Runs in a fresh subprocess, so its RSS is this variant's alone."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = model_config(args, family)
    if family == "decoder":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
                             num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                             num_key_value_heads=cfg.kv_heads, max_position_embeddings=args.seq,
                             rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")
        model, targets = LlamaForCausalLM(hf_cfg), ["q_proj", "k_proj", "v_proj", "o_proj"]
    else:
        from transformers import MT5Config, MT5ForConditionalGeneration

        hf_cfg = MT5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.dim_per_head, d_ff=cfg.mlp_dim,
                           num_layers=cfg.n_layers, num_decoder_layers=cfg.n_decoder_layers, num_heads=cfg.n_heads,
                           relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                           decoder_start_token_id=0, pad_token_id=0)
        model, targets = MT5ForConditionalGeneration(hf_cfg), ["q", "k", "v", "o"]
    if variant == "hf-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    b = {k: torch.from_numpy(v).long() for k, v in batch_arrays(args, family).items() if k != "weights"}
    holder = {}

    def step():
        opt.zero_grad(set_to_none=True)
        if family == "decoder":
            logits = model(input_ids=b["inputs"]).logits
        else:  # decoder inputs built by HF from labels (shift right behind pad 0): the same as ours
            logits = model(input_ids=b["enc_inputs"], labels=b["targets"]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 b["targets"].reshape(-1))
        loss.backward()
        opt.step()
        holder["loss"] = float(loss.detach())

    times, rss_delta = timed_with_rss(step, args)  # includes AdamW's lazily allocated moments and grads
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    opt_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                    if torch.is_tensor(t))
    return {"framework": "torch", "step_s": statistics.median(times), "min_step_s": min(times), "times": times,
            "loss": holder["loss"], "trainable": sum(p.numel() for p in params), "state_bytes": param_bytes + opt_bytes,
            "state_parts": {"params": param_bytes, "opt_state": opt_bytes}, "peak_rss_delta_bytes": rss_delta,
            "peak_rss_bytes": rss_peak()}


def run_torch(args, family: str, variant: str) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", f"{family}:{variant}"]
    env = dict(os.environ, **({} if args.omp_wait == "default" else {"OMP_WAIT_POLICY": args.omp_wait.upper()}))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{family}:{variant} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(r: dict) -> str:
    mib = lambda b: "n/a" if b is None else f"{b / MiB:.0f}"  # noqa: E731
    temp = mib(r.get("temp_bytes")) if r["framework"] == "jaxft" else "n/a"
    temp += f" (RSS +{mib(r['peak_rss_delta_bytes'])})"
    return (f"| {r['date']} | {r['machine']} | {r['model']} | {r['variant']} | {r['step_s']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {r['trainable']:,} | {mib(r['state_bytes'])} | {temp} | "
            f"{r['vs_hf_lora']:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--families", default="decoder,t5")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=8, help="decoder layers; t5 gets layers/2 encoder + layers/2 decoder")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4, help="decoder family only (t5 is multi-head)")
    p.add_argument("--mlp", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128, help="target length (t5: source length too)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--omp-wait", choices=("passive", "active", "default"), default="passive",
                   help="torch's OMP_WAIT_POLICY: OpenMP's spin-waiting collapses (10x) on a shared, busy CPU")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(torch_worker(args, *args.worker.split(":"))))
        return

    import jax

    from jaxft.models.flops import param_count

    machine = f"{platform.machine()} {jax.devices()[0].device_kind}"
    rows = []
    for family in args.families.split(","):
        cfg = model_config(args, family)
        model = (f"{param_count(cfg) / 1e6:.1f}M {'llama' if family == 'decoder' else 'mt5'}, "
                 f"b{args.batch}x{args.seq} fp32 AdamW")
        results = {v: bench_jaxft(args, family, v) for v in JAX_VARIANTS}
        results.update({v: run_torch(args, family, v) for v in HF_VARIANTS})
        hf_lora = results["hf-lora"]["step_s"]
        for variant, r in results.items():
            r.update(date=time.strftime("%Y-%m-%d"), machine=machine, model=model, family=family, variant=variant,
                     params=param_count(cfg), batch=args.batch, seq=args.seq,
                     tokens_per_s=args.batch * args.seq / r["step_s"], vs_hf_lora=hf_lora / r["step_s"])
            print(json.dumps(r), flush=True)
            rows.append(row(r))
    print("| date | machine | model | variant | step s | tokens/s | trainable params | state MiB "
          "| compiled temp MiB | vs HF LoRA |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
