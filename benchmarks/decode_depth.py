"""Decoding from stacked layers (a scan: what evaluation during a `model.scan_layers` run does) vs
the per-layer model (unrolled), by depth: first-call time (trace + compile), decode time and the
size of the compiled program, same weights and batch, in one run.

    python benchmarks/decode_depth.py [--layers 4 24] [--strategy greedy beam]

No peer: both sides are jaxft; the figure is the ratio stacked / per-layer.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.config.schema import ModelConfig
from jaxft.eval.decode import DecodeConfig, _generate_jit, generate
from jaxft.eval.types import SplitModel, split_model
from jaxft.models import build_model
from jaxft.models.scan import stack_layers


def measure(cfg: ModelConfig, stacked: bool, strategy: str, batch: int, prompt: int, new: int, repeats: int) -> dict:
    model = build_model(cfg, rngs=nnx.Rngs(0))
    if stacked:
        graphdef, state = nnx.split(model)
        model = SplitModel(graphdef, stack_layers(state))
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    dc = DecodeConfig(strategy=strategy, beam_size=4, max_len=new, min_len=new, eos_id=1, length_penalty=0.0)
    graphdef, states = split_model(model)
    hlo = _generate_jit.lower(graphdef, states, jnp.asarray(ids), None, None, None, jnp.zeros((batch, 0), jnp.int32),
                              jax.random.key(0), config=dc).compile().as_text()
    _generate_jit.clear_cache()
    t = time.perf_counter()
    jax.block_until_ready(generate(model, config=dc, inputs=ids).tokens)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(generate(model, config=dc, inputs=ids).tokens)
        times.append(time.perf_counter() - t)
    run = float(np.median(times))
    return {"first_call_s": first, "decode_s": run, "tokens_per_s": batch * new / run, "hlo_lines": len(hlo.splitlines())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, nargs="+", default=[4, 24])
    p.add_argument("--strategy", nargs="+", default=["greedy", "beam"])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    date, machine = time.strftime("%Y-%m-%d"), f"{platform.machine()} {jax.devices()[0].device_kind}"
    lines = []
    for n_layers in args.layers:
        cfg = ModelConfig(family="decoder", vocab_size=8192, d_model=args.d_model, n_layers=n_layers, n_heads=4,
                          n_kv_heads=2, mlp_dim=4 * args.d_model, dtype="float32", max_seq_len=256)
        for strategy in args.strategy:
            per_layer = measure(cfg, False, strategy, args.batch, args.prompt, args.new, args.repeats)
            stacked = measure(cfg, True, strategy, args.batch, args.prompt, args.new, args.repeats)
            print(json.dumps({"date": date, "machine": machine, "layers": n_layers, "strategy": strategy,
                              "per_layer": per_layer, "stacked": stacked}))
            lines.append(f"| {date} | {machine} | llama d{args.d_model} L{n_layers} b{args.batch} p{args.prompt}+"
                         f"{args.new} | {strategy} | {per_layer['first_call_s']:.2f} / {stacked['first_call_s']:.2f} | "
                         f"{per_layer['hlo_lines']} / {stacked['hlo_lines']} | {per_layer['tokens_per_s']:.0f} / "
                         f"{stacked['tokens_per_s']:.0f} | {stacked['tokens_per_s'] / per_layer['tokens_per_s']:.2f}x |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
