"""`jaxft params`: list a model's parameter paths, shapes, dtypes and sizes (abstract shapes only),
to write `peft.lora.targets` / `modules_to_save` / `train.trainable` regexes and check what they hit."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_params(args: argparse.Namespace) -> int:
    from jaxft.runs.param_table import format_table, param_table, read_source, select

    model_cfg, cfg = read_source(args.source, args.overrides)
    rows = param_table(model_cfg, cfg)
    print(format_table(select(rows, args.match, args.trainable), rows))
    return 0


def register(sub, command) -> None:
    p = command(sub, "params", cmd_params, help="list parameter paths, shapes, dtypes and counts of a config, run "
                 "dir, jaxft or HF folder (no weights loaded); with a LoRA config, what it adapts and saves")
    p.add_argument("source", type=Path, help="experiment YAML, run dir, jaxft folder (model.yaml) or HF folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (experiment YAML only), e.g. --set peft.lora.rank=4")
    p.add_argument("--match", metavar="REGEX", help="only the paths this regex finds (re.search)")
    p.add_argument("--trainable", action="store_true", help="only what trains (config or run dir)")
