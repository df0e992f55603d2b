"""HF checkpoint conversion: time and peak host memory, jaxft vs transformers.

    python benchmarks/convert.py [--workdir /tmp/x] [--layers 24] [--vocab 250112] [--keep] [--repeats 3]

Writes a random mT5-large-shaped checkpoint (~1.2B parameters, bfloat16
safetensors in 2GB shards, HF names and config from a meta-device
``MT5ForConditionalGeneration``), then measures, each in its own subprocess
(peak RSS = the child's ``ru_maxrss``):

- ``jaxft_load``: ``load_hf`` to float32 parameters, no mesh;
- ``jaxft_load_mesh``: the same onto a mesh over the child's CPU devices
  (``--xla_force_host_platform_device_count`` = CPU cores, fsdp over them);
- ``transformers_load``: ``AutoModelForSeq2SeqLM.from_pretrained(dtype=float32)``;
- ``jaxft_save``: ``save_hf`` (bfloat16, 2GB shards) of the loaded state;
  seconds are the export alone, peak RSS includes the load before it;
- ``transformers_save``: its peer, ``model.to(bfloat16).save_pretrained(max_shard_size="2GB")``
  after ``from_pretrained``, timed and measured the same way.

Loads are compared with ``transformers_load``, saves with ``transformers_save``.

Each of the five runs ``--repeats`` times (rounds in rotated order, after ``os.sync()``: the
freshly written checkpoint's writeback made whichever ran first slower); medians are reported.
Prints one JSON line and a Markdown row per measurement plus the
jaxft/transformers ratios.  Needs torch + transformers (benchmark extras).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = dict(vocab_size=250112, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24,
             num_heads=16, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)


def make_checkpoint(directory: Path, layers: int, vocab: int) -> int:
    """Random bf16 mT5-shaped checkpoint written tensor by tensor; returns the parameter count."""
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.MT5Config(**dict(MODEL, num_layers=layers, num_decoder_layers=layers, vocab_size=vocab))
    with torch.device("meta"):
        model = transformers.MT5ForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if not k.endswith("embed_tokens.weight")}
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    cfg_json = json.loads((directory / "config.json").read_text())  # hub-style: untied, separate lm_head
    cfg_json.update(tie_word_embeddings=False, dtype="bfloat16")
    (directory / "config.json").write_text(json.dumps(cfg_json, indent=2))
    gen = torch.Generator().manual_seed(0)
    shards, buf, size, limit = [], {}, 0, 2 * 10**9

    def flush():
        nonlocal buf, size
        if buf:
            shards.append(buf)
            save_file(buf, str(directory / f"shard{len(shards)}.tmp"), metadata={"format": "pt"})
        buf, size = {}, 0

    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=gen) * 0.05).to(torch.bfloat16)
        if buf and size + t.numel() * 2 > limit:
            flush()
        buf[name], size = t, size + t.numel() * 2
    flush()
    n, weight_map = len(shards), {}
    for i, keys in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(directory / f"shard{i}.tmp", directory / fname)
        weight_map.update(dict.fromkeys(keys, fname))
    total = sum(2 * _numel(s) for s in shapes.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return sum(_numel(s) for s in shapes.values())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --------------------------------------------------------------------------- children


def child(kind: str, src: str, out: str) -> None:
    t0 = time.perf_counter()
    if kind in ("transformers_load", "transformers_save"):
        import torch
        import transformers
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(src, dtype=torch.float32)
        n = sum(p.numel() for p in model.parameters())
        seconds = time.perf_counter() - t0
        if kind == "transformers_save":  # the export's peer: cast to the stored dtype, then write
            t1 = time.perf_counter()
            model.to(torch.bfloat16).save_pretrained(out, max_shard_size="2GB", safe_serialization=True)
            seconds = time.perf_counter() - t1
    else:
        import jax
        from jaxft.interop import load_hf, save_hf
        mesh = None
        if kind == "jaxft_load_mesh":
            from jaxft.config.schema import MeshConfig
            from jaxft.sharding import make_mesh
            mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
        cfg, state = load_hf(src, dtype="float32", mesh=mesh)
        leaves = jax.tree.leaves(state)
        jax.block_until_ready(leaves)
        n = sum(x.size for x in leaves)
        seconds = time.perf_counter() - t0
        if kind == "jaxft_save":
            t1 = time.perf_counter()
            save_hf(cfg, state, out, dtype="bfloat16", max_shard_size="2GB")
            seconds = time.perf_counter() - t1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    print(json.dumps({"kind": kind, "seconds": round(seconds, 2), "peak_rss_mib": round(rss), "params": int(n)}))


def run_child(kind: str, src: Path, out: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if kind == "jaxft_load_mesh":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={os.cpu_count()}").strip()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--src", str(src), "--out", str(out)],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=MODEL["vocab_size"], help="smaller for a smoke test")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the five measurements; medians reported")
    ap.add_argument("--child", default=None)
    ap.add_argument("--src", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.src, args.out)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="jaxft_convert_bench_"))
    try:
        t0 = time.perf_counter()
        n = make_checkpoint(work / "hf", args.layers, args.vocab)
        print(f"# random mT5-shaped checkpoint: {n / 1e9:.2f}B params, bf16, written in "
              f"{time.perf_counter() - t0:.1f}s to {work / 'hf'}", file=sys.stderr)
        os.sync()  # the checkpoint's dirty pages are flushed before anything is timed
        runs: dict[str, list[dict]] = {}
        kinds = ["jaxft_load", "jaxft_load_mesh", "transformers_load", "jaxft_save", "transformers_save"]
        for r in range(args.repeats):  # rounds in rotated order: no kind always runs first
            for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                os.sync()  # no child pays for the previous one's writeback (saves took 2-3x longer)
                runs.setdefault(kind, []).append(run_child(kind, work / "hf", work / "out"))
                shutil.rmtree(work / "out", ignore_errors=True)
                print(f"# {runs[kind][-1]}", file=sys.stderr)
        results = {k: dict(v[0], seconds=statistics.median(x["seconds"] for x in v),
                           peak_rss_mib=statistics.median(x["peak_rss_mib"] for x in v), repeats=len(v))
                   for k, v in runs.items()}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    def peer(kind: str) -> dict:  # loads against transformers' load, saves against its save
        return results["transformers_save" if kind.endswith("_save") else "transformers_load"]

    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.python_version()}",
        "params": n, "results": results,
        "ratio_seconds": {k: round(v["seconds"] / peer(k)["seconds"], 2) for k, v in results.items()},
        "ratio_peak_rss": {k: round(v["peak_rss_mib"] / peer(k)["peak_rss_mib"], 2) for k, v in results.items()},
    }
    print(json.dumps(record))
    print("| date | machine | measurement | seconds | peak RSS MiB | vs transformers (s / RSS) |")
    print("|---|---|---|---|---|---|")
    for k, v in results.items():
        print(f"| {record['date']} | {record['machine']} | {k} ({n / 1e9:.2f}B, f32 in memory) | {v['seconds']} "
              f"| {v['peak_rss_mib']} | {record['ratio_seconds'][k]} / {record['ratio_peak_rss'][k]} |")


if __name__ == "__main__":
    main()
