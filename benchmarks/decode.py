"""Decoding throughput: jaxft `generate` (KV cache, one compiled while_loop) vs
Hugging Face transformers `generate` (PyTorch) on the same weights and batch,
greedy and beam 4 (and, with --strategies, top-p sampling), for a decoder-only (LLaMA) and an
encoder-decoder (mT5-style) model.  Generated tokens/s, median of repeats, in one run.

    python benchmarks/decode.py [--batch 8 --prompt 32 --new 32 --repeats 3] [--stacked]
        [--vocab 250112] [--strategies greedy beam4 sample] [--dtype bfloat16]

Needs the test extra (torch, transformers).  Both sides are forced to generate
exactly --new tokens (min = max length), so the work is the same.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import jax
import numpy as np


def timed(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build_pair(kind: str, args, tmp: str):
    import torch
    import transformers

    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model,
                                       intermediate_size=4 * args.d_model, num_hidden_layers=args.layers,
                                       num_attention_heads=8, num_key_value_heads=4,
                                       max_position_embeddings=args.prompt + args.new + 8,
                                       tie_word_embeddings=False)
        hf = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.MT5Config(vocab_size=args.vocab, d_model=args.d_model, d_kv=args.d_model // 8,
                                     d_ff=2 * args.d_model, num_layers=args.layers, num_decoder_layers=args.layers,
                                     num_heads=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        hf = transformers.MT5ForConditionalGeneration(cfg)
    hf.eval()
    path = f"{tmp}/{kind}"
    hf.save_pretrained(path, safe_serialization=True)
    from jaxft.interop.hf import load_hf
    from jaxft.models.registry import build_model
    from flax import nnx

    import dataclasses
    model_cfg, params = load_hf(path)
    model_cfg = dataclasses.replace(model_cfg, dtype=args.dtype)  # float32 parameters either way
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract, nnx.Param)
    return hf, nnx.merge(graphdef, params), model_cfg


def bench(kind: str, args, tmp: str) -> list[dict]:
    import torch

    from jaxft.eval.decode import DecodeConfig, generate

    torch.set_num_threads(args.threads)
    hf, model, model_cfg = build_pair(kind, args, tmp)
    if args.stacked:  # as evaluation during a `model.scan_layers` run decodes: one scan over stacked layers
        from flax import nnx

        from jaxft.eval.types import SplitModel
        from jaxft.models.scan import stack_layers

        graphdef, state = nnx.split(model)
        model = SplitModel(graphdef, stack_layers(state))
    hf = hf.to(args.device)
    if args.dtype == "bfloat16":  # HF: bf16 weights and compute; jaxft: float32 parameters, bf16 compute
        hf = hf.to(torch.bfloat16)
    if args.device != "cpu":  # XLA's default float32 matmuls on a GPU are TF32: the same for torch
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rng = np.random.default_rng(0)
    ids = rng.integers(3, args.vocab, size=(args.batch, args.prompt)).astype(np.int32)
    rows = []
    for name in args.strategies:
        strategy, beams = ("beam", 4) if name == "beam4" else (name, 1)
        top_p = 0.9 if strategy == "sample" else 1.0  # nucleus sampling, temperature 1, no top-k
        cfg = DecodeConfig(strategy=strategy, beam_size=beams, max_len=args.new, min_len=args.new, top_p=top_p,
                           length_penalty=0.0, eos_id=1, pad_id=0, decoder_start_id=model_cfg.decoder_start_id)
        key = "enc_inputs" if kind == "mt5" else "inputs"

        def run_jax():
            jax.block_until_ready(generate(model, config=cfg, **{key: ids}).tokens)

        def run_hf():
            ids_t = torch.from_numpy(ids).long().to(args.device)
            with torch.no_grad():
                hf.generate(ids_t, attention_mask=torch.ones_like(ids_t),
                            max_new_tokens=args.new, min_new_tokens=args.new, num_beams=beams,
                            do_sample=strategy == "sample", top_p=top_p, top_k=0, temperature=1.0,
                            length_penalty=0.0, early_stopping=True, pad_token_id=0, eos_token_id=1)
            if args.device != "cpu":
                torch.cuda.synchronize()

        t_jax, t_hf = timed(run_jax, args.repeats), timed(run_hf, args.repeats)
        tokens = args.batch * args.new
        rows.append({"model": kind, "strategy": name if strategy != "sample" else f"sample top-p {top_p}",
                     "jaxft_tokens_per_s": tokens / t_jax, "hf_tokens_per_s": tokens / t_hf,
                     "speedup_vs_hf": t_hf / t_jax})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None, help="torch's device (default: cuda when available, else cpu)")
    p.add_argument("--stacked", action="store_true", help="jaxft decodes from stacked layers (a scan)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (jaxft's model.dtype; HF's weights are cast to it)")
    p.add_argument("--models", nargs="+", choices=("llama", "mt5"), default=["llama", "mt5"])
    p.add_argument("--strategies", nargs="+", choices=("greedy", "beam4", "sample"), default=["greedy", "beam4"],
                   help="sample: nucleus sampling (top-p 0.9, temperature 1) on both sides")
    args = p.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models:
            rows += bench(kind, args, tmp)
    date, machine = time.strftime("%Y-%m-%d"), f"{platform.machine()} {jax.devices()[0].device_kind}"
    for r in rows:
        print(json.dumps({"date": date, "machine": machine, "torch_device": args.device, "batch": args.batch,
                          "prompt": args.prompt,
                          "new": args.new, "d_model": args.d_model, "layers": args.layers, "dtype": args.dtype, **r}))
    for r in rows:
        print(f"| {date} | {machine} | {r['model']}{' stacked' if args.stacked else ''}"
              f"{' bf16' if args.dtype == 'bfloat16' else ''} d{args.d_model} "
              f"L{args.layers} b{args.batch} "
              f"p{args.prompt}+{args.new} | {r['strategy']} | {r['jaxft_tokens_per_s']:.0f} | "
              f"{r['hf_tokens_per_s']:.0f} | {r['speedup_vs_hf']:.2f}x |")


if __name__ == "__main__":
    main()
