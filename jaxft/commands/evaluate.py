"""`jaxft translate` (lines through a run dir or an HF checkpoint) and `jaxft eval` (per-direction
sacreBLEU scores of a run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DECODE_FLAGS = ("beam_size", "length_penalty", "max_len", "min_len", "temperature", "top_k", "top_p", "n_best",
                "repetition_penalty", "no_repeat_ngram_size")


def cmd_translate(args: argparse.Namespace) -> int:
    from jaxft.config.schema import DecodeConfig
    from jaxft.data.readers import read_text_lines

    from jaxft.eval.translate import load_translator

    lines = list(read_text_lines(args.input)) if args.input else None  # a bad file fails before the model loads
    translator, _ = load_translator(args.source, args.checkpoint)
    if lines is None:
        stdin = getattr(sys.stdin, "buffer", None)
        lines = list(read_text_lines(stdin, "<stdin>")) if stdin else [line.rstrip("\n") for line in sys.stdin]
    flags = {name: getattr(args, name) for name in DECODE_FLAGS} | ({"n_best": 1} if args.strategy == "greedy" else {})
    decode = DecodeConfig(strategy=args.strategy, **flags)
    for out in translator.translate(lines, args.src_lang, args.tgt_lang, decode, args.batch_size):
        print(out)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from jaxft.config.loader import load_config
    from jaxft.eval.translate import evaluate, evaluation_inputs, load_run
    from jaxft.outputs import check_output

    cfg = load_config(args.config, args.overrides)
    run_dir, base_dir = Path(args.run_dir or cfg.run_dir), args.config.resolve().parent
    inputs = evaluation_inputs(cfg, base_dir=base_dir, run_dir=run_dir, config_path=args.config)
    if args.out:  # refused before decoding; the run dir is only read
        check_output(args.out, inputs, overwrite=args.overwrite, flag="--out")
    translator, _ = load_run(run_dir, which=args.checkpoint)
    if args.max_examples:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_examples=args.max_examples))
    report = evaluate(translator, cfg, base_dir=base_dir)
    print(report.to_markdown())
    if args.out:
        json_path, md_path = report.write(args.out, inputs=inputs, overwrite=args.overwrite, flag="--out")
        print(f"wrote {json_path} and {md_path}")
    return 0


def register(sub, command) -> None:
    p = command(sub, "translate", cmd_translate,
                 help="translate lines (file or stdin -> stdout) with a run dir or an HF checkpoint")
    p.add_argument("source", help="a run dir, an HF folder, or hf:<org/name> (a Hugging Face hub model)")
    p.add_argument("--src-lang", required=True)
    p.add_argument("--tgt-lang", required=True)
    p.add_argument("--input", type=Path, help="UTF-8 text, one sentence per line (default: stdin)")
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest", help="run dirs: which checkpoint")
    from jaxft.config.schema import DECODE_STRATEGIES, DecodeConfig  # flag defaults = the eval.decode defaults
    p.add_argument("--strategy", choices=DECODE_STRATEGIES, default=DecodeConfig.strategy)
    for name in DECODE_FLAGS:  # int / float: the types of the defaults
        default = getattr(DecodeConfig, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                       help="GNMT alpha" if name == "length_penalty" else None)
    p.add_argument("--batch-size", type=int, default=16)

    p = command(sub, "eval", cmd_eval, config=True, help="per-direction BLEU / chrF / chrF++ (sacreBLEU) of a run "
                 "on the dev directions; prints the report, the run dir is only read")
    p.add_argument("--run-dir", help="default: the config's run_dir")
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest")
    p.add_argument("--max-examples", type=int, help="per direction (default: eval.max_examples)")
    p.add_argument("--out", help="also write eval.json / eval.md to this new folder (outside the run dir, "
                                 "the config and its data; default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out report folder")
