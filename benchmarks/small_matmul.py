"""The matmul floor of a decode step: how fast XLA:CPU and torch run the [rows, d_model] x
[d_model, N] products one decode step is made of, and what that implies for `benchmarks/decode.py`.

A decode step of `rows` sequences (batch x beams) multiplies a [rows, D] activation by every
projection and by the output head.  Timed here alone: XLA inside a `fori_loop` whose carry feeds
the next product (as in `generate`'s while loop, so nothing is hoisted or cached), torch eagerly
(as HF `generate` runs).  The sum over one step's products is a floor on the step time of either
implementation; with HF's measured step time it bounds the ratio any jaxft decode loop can reach
on this machine.

    python benchmarks/small_matmul.py [--rows 32 --d-model 256 --vocab 8192 --layers 4]
        [--hf-tokens-per-s 3846 [--batch 8]]

Each product alone runs with its weight cache-hot.  The last line times one step's products
chained, every weight distinct (26 MB for the default shape, as in a real step, where they do not
stay in cache): XLA in a `fori_loop` of 32 steps, torch eagerly.
"""

from __future__ import annotations

import argparse
import os
import platform
import time


def llama_products(d: int, vocab: int, layers: int) -> list[tuple[int, int]]:
    """(N, count) of the decode benchmark's LLaMA shape: 8 heads, 4 kv heads, mlp 4d."""
    k = d // 8
    return [(d, 2 * layers), (4 * k, 2 * layers), (4 * d, 3 * layers), (vocab, 1)]  # q+o, k+v, gate/up/down, head


def chained_step(shapes: list[tuple[int, int]], M: int, steps: int = 32) -> dict[str, float]:
    """Seconds per step of every [M, d] x [d, n] product in ``shapes`` run one after another, each
    weight its own array; each product's input is the running [M, d] state (tiled to the product's
    d), so nothing can be hoisted or run ahead.  XLA: one `fori_loop`; torch: eager."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    D = shapes[0][0]
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((d, n)) * 0.02).astype(np.float32) for d, n in shapes]

    def one_step(h, ws, matmul, tile):
        acc = 0.0
        for w in ws:
            d = w.shape[0]
            y = matmul(h if d == D else tile(h, d // D), w)
            acc = acc + y[:, :1]
            if y.shape[1] == D:
                h = h + y * 1e-3
        return h + acc * 1e-9

    jw = [jnp.asarray(w) for w in weights]
    step = jax.jit(lambda x, ws: jax.lax.fori_loop(
        0, steps, lambda i, h: one_step(h, ws, jnp.matmul, lambda a, r: jnp.tile(a, (1, r))), x))
    x = jnp.full((M, D), 0.1, jnp.float32)
    jax.block_until_ready(step(x, jw))
    best = {"xla": float("inf"), "torch": float("inf")}
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(step(x, jw))
        best["xla"] = min(best["xla"], (time.perf_counter() - t) / steps)
    tw = [torch.from_numpy(w) for w in weights]
    with torch.no_grad():
        h = torch.full((M, D), 0.1)
        one_step(h, tw, torch.matmul, lambda a, r: a.repeat(1, r))
        for _ in range(5):
            t = time.perf_counter()
            h = torch.full((M, D), 0.1)
            for _ in range(steps):
                h = one_step(h, tw, torch.matmul, lambda a, r: a.repeat(1, r))
            best["torch"] = min(best["torch"], (time.perf_counter() - t) / steps)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hf-tokens-per-s", type=float, default=0.0,
                    help="HF generate's tokens/s at this row count (benchmarks/decode.py), for the bound")
    ap.add_argument("--batch", type=int, default=0, help="sequences whose tokens that counts (rows / beams); "
                    "default: rows")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    M, D = args.rows, args.d_model

    def xla_time(n: int) -> float:
        w = jnp.full((D, n), 1e-3, jnp.float32)

        @jax.jit
        def loop(x, w):
            return jax.lax.fori_loop(0, 64, lambda i, c: c + (c @ w)[:, :1] * 1e-9, x)

        x = jnp.ones((M, D), jnp.float32)
        jax.block_until_ready(loop(x, w))
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            jax.block_until_ready(loop(x, w))
            best = min(best, (time.perf_counter() - t) / 64)
        return best

    def torch_time(n: int) -> float:
        x, w = torch.ones(M, D), torch.full((D, n), 1e-3)
        for _ in range(20):
            x @ w
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(64):
                x @ w
            best = min(best, (time.perf_counter() - t) / 64)
        return best

    print("| date | machine | rows x D | N | XLA us | XLA GFLOP/s | torch us | torch GFLOP/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    floor = {"xla": 0.0, "torch": 0.0}
    for n, count in llama_products(D, args.vocab, args.layers):
        tx, tt = xla_time(n), torch_time(n)
        flops = 2 * M * D * n
        floor["xla"] += count * tx
        floor["torch"] += count * tt
        print(f"| {time.strftime('%Y-%m-%d')} | {platform.machine()} {os.cpu_count()} cpu | {M} x {D} | {n} | "
              f"{tx * 1e6:.1f} | {flops / tx / 1e9:.0f} | {tt * 1e6:.1f} | {flops / tt / 1e9:.0f} |")
    print(f"\none step's products: XLA {floor['xla'] * 1e3:.2f} ms, torch {floor['torch'] * 1e3:.2f} ms")
    shapes = [(D, n) for n, count in llama_products(D, args.vocab, args.layers) for _ in range(count)]
    chained = chained_step(shapes, M)
    print(f"chained, distinct weights: XLA {chained['xla'] * 1e3:.2f} ms, torch {chained['torch'] * 1e3:.2f} ms "
          f"({sum(2 * M * d * n for d, n in shapes) / chained['xla'] / 1e9:.0f} / "
          f"{sum(2 * M * d * n for d, n in shapes) / chained['torch'] / 1e9:.0f} GFLOP/s)")
    if args.hf_tokens_per_s:
        hf_step = (args.batch or M) / args.hf_tokens_per_s
        print(f"HF step {hf_step * 1e3:.2f} ms: a jaxft loop that did nothing but these products would be "
              f"{hf_step / floor['xla']:.2f}x HF (with torch's kernels {hf_step / floor['torch']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
