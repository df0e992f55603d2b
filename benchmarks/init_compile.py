"""Compile and run time of the sharded train-state initialisation (`jaxft.train.state`'s
``init_fn`` under ``jax.jit``: model, AdamW state) at the 1B train step's shape, for a few
depths, on the default backend.  On an H200 the 22-layer init did not finish compiling within
200 s (2026-12-04, RESULTS), when every layer's initialisers were traced into the program; on a
2-core CPU that compiled in ~10 s, linear in depth.  Layers 1..n-1 are now drawn by one scanned
layer init (`jaxft.models.layer_init`): 3.9 s at 22 layers there.  The slope says what one more
layer costs a run's start.

    python benchmarks/init_compile.py [--layers 2 4 8] [--d-model 2048 ...]
"""

from __future__ import annotations

import argparse
import json
import time

import jax


def main() -> None:
    from jaxft.config.schema import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
    from jaxft.sharding import make_mesh, use_mesh
    from jaxft.train.optim import make_optimizer
    from jaxft.train.state import make_init_fn, state_shardings

    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--run", action="store_true", help="also run the compiled init once")
    args = p.parse_args()
    tx = make_optimizer(OptimizerConfig(lr=1e-4, schedule="constant", weight_decay=0.0, clip_norm=None), 100)
    mesh = make_mesh(MeshConfig(data=-1))
    for layers in args.layers:
        cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=layers, n_heads=args.heads,
                          n_kv_heads=args.kv_heads, mlp_dim=args.mlp, dtype="bfloat16", max_seq_len=2048)
        init_fn, _ = make_init_fn(cfg, TrainConfig(global_batch=8), tx, seed=0)
        with use_mesh(mesh):
            shardings = state_shardings(jax.eval_shape(init_fn), mesh)
            t = time.perf_counter()
            lowered = jax.jit(init_fn, out_shardings=shardings).lower()
            lower_s = time.perf_counter() - t
            t = time.perf_counter()
            compiled = lowered.compile()
            compile_s = time.perf_counter() - t
            run_s = None
            if args.run:
                t = time.perf_counter()
                jax.block_until_ready(compiled())
                run_s = time.perf_counter() - t
        print(json.dumps({"layers": layers, "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
                          "run_s": run_s, "device": jax.devices()[0].device_kind}), flush=True)


if __name__ == "__main__":
    main()
