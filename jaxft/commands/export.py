"""`jaxft export`: a run's model as a jaxft or Hugging Face folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_export(args: argparse.Namespace) -> int:
    from jaxft.runs.export import export_run

    out = export_run(args.run_dir, args.out, which=args.checkpoint, fmt=args.format, dtype=args.dtype,
                     overwrite=args.overwrite)
    print(f"wrote {out} ({args.format} format, {args.checkpoint} checkpoint of {args.run_dir})")
    return 0


def register(sub, command) -> None:
    p = command(sub, "export", cmd_export, help="write a run's model (LoRA merged) as a jaxft or HF folder; "
                 "the run dir is only read")
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path, help="a new folder (not inside the run dir)")
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest")
    p.add_argument("--format", choices=("jaxft", "hf"), default="jaxft")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="hf format: stored dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT folder jaxft wrote")
