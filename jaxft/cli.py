"""`jaxft` command line: parse arguments, load the config, call the library.

All logic lives in importable modules; errors in user input print one line (`jaxft: <file/key>: <what
is wrong>`), exit 2.  `jaxft train` exits 75 after SIGTERM (checkpoint written: resume me), 130 after
Ctrl-C (checkpoint written), 3 when training diverged (train.nonfinite).  docs/reliability.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from jaxft.paths import as_path, config_dir, local_path

log = logging.getLogger("jaxft")
DIVERGED_EXIT = 3  # `jaxft train` stopped on non-finite losses (train.nonfinite)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "orbax", "jax._src", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _command(sub, name: str, func, *, config: bool = False, **kw):
    """Subcommand parser run by `func`, with CONFIG [--set K=V] when `config`; `func` None: a group's subparsers."""
    p = sub.add_parser(name, **kw)
    if func is None:
        return p.add_subparsers(dest=f"{name}_command", required=True, metavar="SUBCOMMAND")
    p.set_defaults(func=func)
    if config:
        p.add_argument("config", type=as_path, help="experiment YAML (may name `base:` overlays), a path or a URL")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set optimizer.lr=3e-4 (repeatable)")
    return p


def _cmd_train(args: argparse.Namespace) -> int:
    from jaxft.sharding import init_distributed
    from jaxft.config.loader import load_config
    from jaxft.eval.during_training import train_and_evaluate
    from jaxft.train.loop import dev_table
    from jaxft.train.cadence import INTERRUPTED_EXIT
    from jaxft.train.hooks import DivergedError
    from jaxft.paths import is_remote

    init_distributed(args.coordinator, args.num_processes, args.process_id)
    cfg = load_config(args.config, args.overrides)
    try:
        result = train_and_evaluate(cfg, base_dir=config_dir(args.config), restart=args.restart)
    except DivergedError as e:
        print(f"jaxft: {cfg.run_dir}: {e}", file=sys.stderr)
        return DIVERGED_EXIT
    except KeyboardInterrupt:
        print("jaxft: interrupted (a second Ctrl-C): no checkpoint was written for the current step", file=sys.stderr)
        return INTERRUPTED_EXIT
    if result.exit_status:
        done = f"after step {result.step}, checkpoint written" if result.losses else "before training this time"
        print(f"jaxft: stopped by a signal {done}; run it again to resume (exit {result.exit_status})", file=sys.stderr)
        return result.exit_status
    if result.dev_after:
        print(dev_table(result))
    print(f"run dir: {result.run_dir if is_remote(result.run_dir) else result.run_dir.resolve()}")
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from jaxft.config.loader import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from jaxft.config.schema import TokenizerConfig
    from jaxft.data.readers import read_text_lines
    from jaxft.data.tokenizer import train_tokenizer
    from jaxft.outputs import safe_output

    def texts():
        for path in args.inputs:
            yield from (line for line in read_text_lines(path) if line.strip())

    cfg = TokenizerConfig(train_vocab_size=args.vocab_size, model_type=args.model_type,
                          character_coverage=args.character_coverage)
    corpus = ", ".join(str(p) for p in args.inputs)
    # train_tokenizer writes the one .model file (no .vocab): trained into the temporary sibling, renamed on success
    with safe_output(args.out, inputs=args.inputs, overwrite=args.overwrite, kind="file", flag="--out") as tmp:
        tok = train_tokenizer(texts(), tmp, cfg, setting="--vocab-size", corpus=corpus)
    print(f"wrote {args.out} ({tok.vocab_size} pieces)")
    return 0


def _cmd_lower(args: argparse.Namespace) -> int:
    from jaxft.config.loader import load_config
    from jaxft.train.aot import lower_train_step

    compiled = lower_train_step(load_config(args.config, args.overrides)).compile()
    print(compiled.memory_analysis(), {k: v for k, v in (compiled.cost_analysis() or {}).items()
                                       if k in ("flops", "bytes accessed")}, sep="\n")
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from jaxft.config.loader import load_config
    from jaxft.data.prepare import prepare, summary_table

    manifest = prepare(load_config(args.config, args.overrides).data, config_dir(args.config), args.out,
                       overwrite=args.overwrite)
    print(summary_table(manifest), f"wrote {args.out} (sources to train on: {args.out}/sources.yaml)", sep="\n")
    return 0


def _cmd_suite(args: argparse.Namespace) -> int:
    from jaxft.suite.command import suite_command

    return suite_command(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from jaxft.demo.run import run_demo

    return run_demo(args.out) or 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from jaxft.interop import convert

    if args.convert_command == "hf-to-jaxft":
        cfg, out = convert.hf_to_jaxft(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    else:
        cfg, out = convert.jaxft_to_hf(args.src, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                       model_type=args.model_type, overwrite=args.overwrite)
    print(f"wrote {out} ({convert.describe(cfg)})")
    return 0


def _cmd_compose(args: argparse.Namespace) -> int:
    from jaxft.outputs import check_output
    from jaxft.peft.compose import compose_checkpoint, compose_inputs, parse_compose_args
    from jaxft.runs.export import checkpoint_or_path as _checkpoint_arg

    base, items = parse_compose_args(args.items, args.add)
    if not items:
        raise ValueError("compose: give at least one diff or adapter (BASE + DIFF, or --add DIFF)")
    check_output(args.out, compose_inputs(base, items), overwrite=args.overwrite, flag="--out")  # before loading
    out = compose_checkpoint(_checkpoint_arg(base), items, args.out, revert=args.revert, overwrite=args.overwrite)
    print(f"wrote {out} ({base} {'-' if args.revert else '+'} {' + '.join(items)})")
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from jaxft.outputs import check_output
    from jaxft.peft.compose import diff_checkpoints
    from jaxft.runs.export import checkpoint_or_path as _checkpoint_arg

    check_output(args.out, [args.finetuned, args.base], overwrite=args.overwrite, flag="--out")  # before loading
    out = diff_checkpoints(_checkpoint_arg(args.finetuned), _checkpoint_arg(args.base), args.out,
                           sparse_k=args.sparse_k, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxft", description="JAX/TPU-native multilingual finetuning.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "train", _cmd_train, config=True, help="train or resume the run in the config's run_dir")
    p.add_argument("--coordinator", help="host:port of process 0 (multi-process runs off TPU)")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--restart", action="store_true",
                   help="when no checkpoint of the run dir can be restored, set them (and metrics.jsonl) aside "
                        "in unreadable_checkpoints/ and train from step 0 (default: that is an error)")

    csub = _command(sub, "config", None, help="inspect configs")
    _command(csub, "show", _cmd_config_show, config=True, help="print the resolved config (overlays and --set applied)")

    tsub = _command(sub, "tokenizer", None, help="SentencePiece tokenizers")
    q = _command(tsub, "train", _cmd_tokenizer_train, help="train a SentencePiece model on text files")
    q.add_argument("inputs", nargs="+", type=Path, help="UTF-8 text files, one sentence per line")
    q.add_argument("--out", type=local_path, required=True, help="output .model path (a new file)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    q.add_argument("--vocab-size", type=int, required=True)
    q.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    q.add_argument("--character-coverage", type=float, default=0.9995)

    _command(sub, "lower", _cmd_lower, config=True,
             help="lower and compile the train step from shapes alone; print memory and FLOPs")

    vsub = _command(sub, "convert", None, help="convert checkpoints between Hugging Face and jaxft layouts")
    q = _command(vsub, "hf-to-jaxft", _cmd_convert,
                 help="HF folder (config.json + safetensors) -> orbax params + model.yaml")
    q.add_argument("src", help="HF checkpoint folder, or hf:org/name for a hub model")
    q.add_argument("out", type=local_path, help="a new folder (not the source nor inside it)")
    q.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="parameter dtype (float32)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing OUT folder jaxft wrote")
    q = _command(vsub, "jaxft-to-hf", _cmd_convert,
                 help="folder written by hf-to-jaxft -> HF folder transformers loads")
    q.add_argument("src", type=Path)
    q.add_argument("out", type=local_path, help="a new folder (not the source nor inside it)")
    q.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="stored dtype")
    q.add_argument("--max-shard-size", default="2GB")
    q.add_argument("--model-type", default=None, help="HF model_type (default: inferred)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing OUT folder jaxft wrote")

    p = _command(sub, "compose", _cmd_compose, help="add sparse diffs / LoRA adapters to a base checkpoint",
                 description="jaxft compose BASE + DIFF [* SCALE] + ... --out OUT  (quote '*' in a "
                             "shell; 'DIFF*SCALE' as one word and --add DIFF[*SCALE] also work)")
    p.add_argument("items", nargs="+", metavar="BASE [+ DIFF [* SCALE]]",
                   help="a jaxft folder (params/ + model.yaml), an HF folder or a run dir (read only), "
                        "then '+ DIFF' items")
    p.add_argument("--add", action="append", default=[], metavar="DIFF[*SCALE]",
                   help="another sparse diff or LoRA adapter dir (repeatable)")
    p.add_argument("--out", type=local_path, required=True, help="a new output folder, in BASE's format (a jaxft "
                   "folder for a run dir); never BASE, a diff, or inside one")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder jaxft wrote")
    p.add_argument("--revert", action="store_true", help="subtract the diffs instead of adding them")

    p = _command(sub, "diff", _cmd_diff, help="fine-tuning difference FINETUNED - BASE as a composable diff")
    p.add_argument("finetuned", help="jaxft folder, HF folder or run dir")
    p.add_argument("base", help="jaxft folder, HF folder or run dir of the same architecture")
    p.add_argument("--out", type=local_path, required=True, help="a new folder (not an input nor inside one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder jaxft wrote")
    p.add_argument("--sparse-k", type=float, default=None,
                   help="keep only the K largest |delta| entries (a count >= 1 or a proportion < 1); default: dense")

    dsub = _command(sub, "data", None, help="data tools")
    q = _command(dsub, "prepare", _cmd_data_prepare, config=True, help="write the config's train and dev sources as "
                 "ArrayRecord shards, with manifest.json (counts) and sources.yaml (type: arrayrecord sources)")
    q.add_argument("--out", type=local_path, required=True, help="a new folder (not an input nor inside one)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out folder jaxft wrote")

    ssub = _command(sub, "suite", None, help="experiment suites: a matrix of runs from one file (configs/suites/)")
    q = _command(ssub, "run", _cmd_suite, help="run or resume the suite's runs in dependency order")
    q.add_argument("--only", metavar="PATTERN", help="only the runs whose id (stage.name) matches this glob")
    q.add_argument("--dry-run", action="store_true", help="print the expanded runs and their overrides")
    q.add_argument("--emit-commands", action="store_true", help="print one `jaxft train` command per run")
    q.add_argument("--max-parallel", type=int, default=1, metavar="N", help="run up to N independent runs at once, "
                   "the devices split between them (GPUs; on CPU the devices and cores)")
    q = _command(ssub, "status", _cmd_suite, help="per run: state, step, last loss, dev loss, wall time")
    q = _command(ssub, "report", _cmd_suite, help="one table over all runs (Markdown, CSV, JSON) and PNG plots")
    q.add_argument("--axis", help="also plot --metric against this axis (a config key the suite varies)")
    q.add_argument("--metric", default="avg_chrf",
                   help="avg_bleu / avg_chrf / avg_chrfpp / avg_acc / avg_acc_norm (default avg_chrf)")
    for q in ssub.choices.values():
        q.add_argument("suite", type=Path, help="suite YAML (configs/suites/*.yaml)")

    from jaxft.commands import register_all

    register_all(sub, _command)
    p = _command(sub, "demo", _cmd_demo, help="build a multilingual corpus, train a tokenizer and a tiny model on it")
    p.add_argument("--out", type=local_path, default=Path("runs/demo"))
    return parser


class _EarlySignal:
    """A SIGTERM during start-up, only recorded: jaxft.train.cadence takes it over (exit 75 before step 1)."""
    received: int | None = None

    def __call__(self, signum, frame):
        self.received = signum


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    early = args.command == "train" and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _EarlySignal()) if early else None  # cadence.py's while training
    try:
        return _run(args)
    finally:
        if early:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    _setup_logging()
    debug = args.debug or os.environ.get("JAXFT_DEBUG")
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError) as e:  # bad input: one line, status 2
        if debug:
            raise
        print(f"jaxft: {_error_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        if debug:
            raise
        print(f"jaxft: internal error: {type(e).__name__}: {_error_line(e)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def _error_line(e: BaseException) -> str:
    """The first line of an error's message; an OSError as `<filename>: <strerror>`."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}{f' -> {e.filename2}' if e.filename2 else ''}: {e.strerror}"
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    text = text.strip()
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
