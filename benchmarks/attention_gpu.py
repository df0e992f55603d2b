"""Attention forward + backward on a GPU, at the 1B train step's shape: XLA attention against
cuDNN flash attention given the dense mask alone (what a packed row needs), the dense mask and
``is_causal`` (what `jaxft.models.kernels.cudnn_attention` passes for a causal self-attention),
and ``is_causal`` alone.  Median milliseconds of one jitted value-and-grad, and the TFLOP/s that
makes of the causal attention's FLOPs (forward 2 matmuls over half the scores, backward 2.5x).

    python benchmarks/attention_gpu.py [--batch 8 --seq 2048 --heads 32 --kv-heads 4 --head-dim 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def variants(mask):
    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    def cudnn_mask(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")

    def cudnn_mask_causal(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")

    def cudnn_causal(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    found = {"xla": xla}
    if jax.default_backend() == "gpu":
        found.update(cudnn_mask=cudnn_mask, cudnn_mask_causal=cudnn_mask_causal, cudnn_causal=cudnn_causal)
    return found


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    B, L, H, G, K = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=s), jnp.bfloat16) for s in ((B, L, H, K), (B, L, G, K), (B, L, G, K)))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)), (B, 1, L, L))
    flops = 3.5 * 2 * 2 * B * H * L * L * K / 2
    ref = None
    for name, fn in variants(mask).items():
        step = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2),
                                          argnums=(0, 1, 2)))
        try:
            out = jax.block_until_ready(step(q, k, v))
        except Exception as e:  # noqa: BLE001 - a variant cuDNN refuses is a result too
            print(json.dumps({"variant": name, "error": str(e).splitlines()[0][:300]}))
            continue
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(step(q, k, v))
            times.append(time.perf_counter() - t)
        ms = statistics.median(times) * 1e3
        value = float(out[0])
        ref = value if ref is None else ref
        print(json.dumps({"variant": name, "ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1),
                          "loss_rel_to_xla": abs(value - ref) / abs(ref), "shape": [B, L, H, G, K],
                          "device": jax.devices()[0].device_kind}))


if __name__ == "__main__":
    main()
