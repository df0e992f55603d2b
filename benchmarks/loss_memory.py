"""Peak step memory with a 250k vocabulary: the full-logits loss vs the chunked one (`train.loss_chunk`).

The real train step (`jaxft.train.aot`: AdamW, the model's loss path) is compiled for the local
devices -- or, with `--topology v5e-8` and libtpu, for a TPU slice -- and its per-device memory is
read from the compiled executable (`memory_analysis()`, as `jaxft plan` reports it).  Nothing is
run, so a 250k x 1024 step fits the compile on a laptop.  "Today" is `loss_chunk` >= seq_len: the
whole [B, L, V] float32 logits in one piece (each chunk is run without the default logits budget,
`train.loss_chunk_mib: 0`; `default` is the config's defaults).

    python benchmarks/loss_memory.py [--vocab 250112 --seq 1024 --batch 8 --chunks 1024,512,256,128,default]

Prints a Markdown row per (family, chunk) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

CONFIGS = {
    "llama": """\
run_dir: run
model: {{preset: tiny-llama, vocab_size: {vocab}, d_model: {d}, n_layers: 2, n_heads: 8, n_kv_heads: 4,
        mlp_dim: {mlp}, max_seq_len: {seq}}}
data: {{seq_len: {seq}}}
train: {{global_batch: {batch}, steps: 10{chunk}}}
""",
    "mt5": """\
run_dir: run
model: {{preset: tiny-mt5, vocab_size: {vocab}, d_model: {d}, n_layers: 2, n_heads: 8, head_dim: {hd},
        mlp_dim: {mlp}}}
data: {{seq_len: {seq}, encoder_seq_len: {seq}}}
train: {{global_batch: {batch}, steps: 10{chunk}}}
""",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=250112)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--chunks", default="1024,512,256,128,default",
                    help="loss_chunk values (each with no logits budget: loss_chunk_mib 0); 'default': the "
                         "config's defaults (loss_chunk 512 within loss_chunk_mib 1024)")
    ap.add_argument("--families", default="llama,mt5")
    ap.add_argument("--topology", default=None, help="a TPU slice (needs libtpu), default: the local devices")
    args = ap.parse_args()

    import jax

    from jaxft.config.loader import load_config
    from jaxft.train import plan as plan_lib

    if args.topology:
        from jaxft.train.chips import abstract_devices, parse_topology
        devices, where = abstract_devices(parse_topology(args.topology)), args.topology
    else:
        devices, where = jax.devices(), f"{len(jax.devices())} x {jax.devices()[0].device_kind}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            base = None
            for chunk in args.chunks.split(","):
                path = Path(tmp) / f"{family}-{chunk}.yaml"
                path.write_text(CONFIGS[family].format(vocab=args.vocab, d=args.d_model, mlp=4 * args.d_model,
                                                       hd=args.d_model // 8, seq=args.seq, batch=args.batch,
                                                       chunk="" if chunk == "default" else
                                                       f", loss_chunk: {int(chunk)}, loss_chunk_mib: 0"))
                cfg = load_config(path)
                t0 = time.perf_counter()
                p = plan_lib.plan_once(cfg, devices, target=where, chip=None, peak=0.0, capacity=None)
                mem = p.memory
                base = base or mem
                rows.append((family, chunk, mem, base, time.perf_counter() - t0))
                print(f"# {family} chunk {chunk}: temporaries {mem['temporaries'] / 2**30:.2f} GiB, "
                      f"total {mem['total'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    date, machine = time.strftime("%Y-%m-%d"), f"{platform.machine()}, {where}"
    print("| date | machine | model | loss_chunk | temporaries GiB | total GiB | temp vs full | total vs full |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for family, chunk, mem, base, _ in rows:
        label = f"{family} d{args.d_model} L2, V={args.vocab}, b{args.batch}x{args.seq}"
        note = " (512, 1024 MiB)" if chunk == "default" else " (full logits)" if int(chunk) >= args.seq else ""
        print(f"| {date} | {machine} | {label} | {chunk}{note} | {mem['temporaries'] / 2**30:.2f} | "
              f"{mem['total'] / 2**30:.2f} | {mem['temporaries'] / base['temporaries']:.2f}x | "
              f"{mem['total'] / base['total']:.2f}x |")


if __name__ == "__main__":
    main()
