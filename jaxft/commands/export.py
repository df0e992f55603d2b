"""`jaxft export`: a run's model (LoRA merged), or only its adapter / sparse diff, as a jaxft or HF folder."""

from __future__ import annotations

import argparse

from jaxft.paths import as_path, local_path


def checkpoint_choice(value: str) -> str | int:
    """argparse type of `--checkpoint`: `latest`, `best` or a step number N."""
    if value in ("latest", "best"):
        return value
    try:
        step = int(value)
    except ValueError:
        step = -1
    if step < 0:
        raise argparse.ArgumentTypeError(f"expected latest, best or a step number, got {value!r}")
    return step


def cmd_export(args: argparse.Namespace) -> int:
    from jaxft.runs.export import export_run

    out = export_run(args.run_dir, args.out, which=args.checkpoint, fmt=args.format, adapter=args.adapter,
                     dtype=args.dtype, overwrite=args.overwrite)
    what = "adapter / sparse diff" if args.adapter else "model"
    print(f"wrote {out} ({args.format} format, {what} of checkpoint {args.checkpoint} of {args.run_dir})")
    return 0


def register(sub, command) -> None:
    p = command(sub, "export", cmd_export, help="write a run's model (LoRA merged), or with --adapter only its "
                 "adapter / sparse diff, as a jaxft or HF folder; the run dir is only read")
    p.add_argument("run_dir", type=as_path, help="a run dir (a local path or a URL: gs://bucket/run)")
    p.add_argument("out", type=local_path, help="a new local folder (not inside the run dir)")
    p.add_argument("--checkpoint", type=checkpoint_choice, default="latest", metavar="latest|best|N",
                   help="the newest, the best (eval.best_metric) or the step-N checkpoint (default: latest)")
    p.add_argument("--format", choices=("jaxft", "hf"), default="jaxft")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--merge-lora", dest="adapter", action="store_false", default=False,
                      help="the whole model, LoRA adapters merged into the kernels (the default)")
    what.add_argument("--adapter", action="store_true",
                      help="only what the run trained: LoRA as an HF PEFT folder (--format hf) or a jaxft adapter "
                           "folder (--format jaxft); LT-SFT as its sparse diff (--format jaxft)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="hf format: stored dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT folder jaxft wrote")
