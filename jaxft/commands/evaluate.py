"""`jaxft translate` (lines through a run dir, a jaxft folder or an HF checkpoint) and `jaxft eval`
(per-direction sacreBLEU scores of any of them on the dev or test split, or on files named by flags)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxft.commands.export import checkpoint_choice

DECODE_FLAGS = ("beam_size", "length_penalty", "max_len", "min_len", "temperature", "top_k", "top_p", "n_best",
                "repetition_penalty", "no_repeat_ngram_size")
MODEL_HELP = "a run dir, a jaxft folder, an HF folder, or hf:<org/name> (a Hugging Face hub model)"


def _tag_flags(args: argparse.Namespace) -> dict:
    return {"lang_tokens": args.lang_tokens, "lang_code_style": args.lang_code_style}


TRANSLATE_CHUNK = 2048  # lines per chunk: `jaxft translate` holds one chunk, not the corpus


def cmd_translate(args: argparse.Namespace) -> int:
    import itertools

    from jaxft.config.schema import DecodeConfig
    from jaxft.data.readers import read_text_lines

    from jaxft.eval.translate import load_translator

    if args.input:  # a bad file fails before the model loads (streamed: O(1) memory)
        for _ in read_text_lines(args.input):
            pass
    translator, _ = load_translator(args.source, args.checkpoint, **_tag_flags(args))
    if not args.quiet and sys.stderr.isatty():  # as the progress bar: stderr stays the one-line errors otherwise
        print(f"jaxft translate: {args.source}, {args.src_lang} -> {args.tgt_lang}, target language by "
              f"{translator.tag_style}", file=sys.stderr)
    if args.input:
        lines = read_text_lines(args.input)
    else:
        stdin = getattr(sys.stdin, "buffer", None)
        lines = read_text_lines(stdin, "<stdin>") if stdin else (line.rstrip("\n") for line in sys.stdin)
    flags = {name: getattr(args, name) for name in DECODE_FLAGS} | ({"n_best": 1} if args.strategy == "greedy" else {})
    decode = DecodeConfig(strategy=args.strategy, **flags)
    done = 0
    while chunk := list(itertools.islice(lines, TRANSLATE_CHUNK)):  # outputs stream as each chunk finishes
        for out in translator.translate(chunk, args.src_lang, args.tgt_lang, decode, args.batch_size,
                                        progress=not args.quiet, desc=f"lines {done + 1}-{done + len(chunk)}"):
            print(out)
        sys.stdout.flush()
        done += len(chunk)
    return 0


def _eval_config(args: argparse.Namespace):
    """(config, its base dir, the model path): CONFIG, else the run dir's own config, else defaults."""
    from jaxft.config.loader import load_config
    from jaxft.config.schema import Config
    from jaxft.runs.layout import RunDir

    if args.config:
        cfg = load_config(args.config, args.overrides)
        return cfg, args.config.resolve().parent, args.model or cfg.run_dir
    if not args.model:
        raise ValueError("eval: give a CONFIG, or --model (a run dir, a jaxft folder or an HF folder)")
    if RunDir(Path(args.model)).is_run():
        return load_config(RunDir(Path(args.model)).config, args.overrides), Path(args.model), args.model
    if args.overrides:
        raise ValueError(f"eval: --set needs a CONFIG ({args.model} is not a run dir with a config)")
    return Config(), Path.cwd(), args.model


def _cli_sources(args: argparse.Namespace):
    """The one direction of --src / --ref / --src-lang / --tgt-lang, or None."""
    from jaxft.config.schema import SourceConfig

    given = {"--src": args.src, "--ref": args.ref, "--src-lang": args.src_lang, "--tgt-lang": args.tgt_lang}
    if not any(given.values()):
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise ValueError(f"eval: --src, --ref, --src-lang and --tgt-lang go together (missing {', '.join(missing)})")
    if args.split:
        raise ValueError("eval: --split scores the config's data.dev / data.test; with --src there is no split")
    for flag in ("--src", "--ref"):
        if not Path(given[flag]).is_file():
            raise ValueError(f"eval: {flag}: {given[flag]} is not a file")
    return (SourceConfig(type="text", src_path=str(Path(args.src).resolve()), tgt_path=str(Path(args.ref).resolve()),
                         src_lang=args.src_lang, tgt_lang=args.tgt_lang),)


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from jaxft.eval.translate import evaluate, evaluation_inputs, load_translator
    from jaxft.outputs import check_output

    cfg, base_dir, model = _eval_config(args)
    sources = _cli_sources(args)
    inputs = evaluation_inputs(cfg, base_dir=base_dir, run_dir=Path(model), config_path=args.config,
                               sources=sources or ())
    if args.out:  # refused before decoding; the model and the data are only read
        check_output(args.out, inputs, overwrite=args.overwrite, flag="--out")
    translator, run_cfg = load_translator(str(model), args.checkpoint, data_cfg=cfg.data if args.config else None,
                                          **_tag_flags(args))
    if args.max_examples:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_examples=args.max_examples))
    settings = {"model": str(model), "checkpoint": str(args.checkpoint) if run_cfg else None,
                "src": args.src and str(Path(args.src).resolve()), "ref": args.ref and str(Path(args.ref).resolve())}
    report = evaluate(translator, cfg, base_dir=base_dir, split=args.split or "dev", sources=sources,
                      settings=settings,
                      progress=not args.quiet)
    print(report.to_markdown())
    if args.out:
        json_path, md_path = report.write(args.out, inputs=inputs, overwrite=args.overwrite, flag="--out")
        print(f"wrote {json_path} and {md_path}")
    return 0


def _common(p: argparse.ArgumentParser, what: str) -> None:
    """Flags translate and eval share: checkpoint, target-language tags, quiet."""
    from jaxft.config.schema import DataConfig

    p.add_argument("--checkpoint", type=checkpoint_choice, default="latest", metavar="latest|best|N",
                   help="run dirs: the newest, the best or the step-N checkpoint (default: latest)")
    p.add_argument("--lang-tokens", choices=("none", "t5_tag", "lang_code"), default=None,
                   help="how the model is told the target language (data.lang_tokens): <2xx> tags (T5 / mT5), "
                        "mBART / NLLB language codes, or none; default: " + what)
    p.add_argument("--lang-code-style", choices=("flores", "mbart50"), default=None,
                   help=f"with lang_code: eng_Latn (NLLB) or en_XX (mBART-50) (default {DataConfig.lang_code_style})")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it is shown only when stderr is a terminal)")


def register(sub, command) -> None:
    p = command(sub, "translate", cmd_translate,
                 help="translate lines (file or stdin -> stdout) with a run dir, a jaxft folder or an HF checkpoint")
    p.add_argument("source", help=MODEL_HELP)
    p.add_argument("--src-lang", required=True)
    p.add_argument("--tgt-lang", required=True)
    p.add_argument("--input", type=Path, help="UTF-8 text, one sentence per line (default: stdin)")
    _common(p, "a run's data config; for folders none, or the family's codes (mBART, NLLB)")
    from jaxft.config.schema import DECODE_STRATEGIES, DecodeConfig  # flag defaults = the eval.decode defaults
    p.add_argument("--strategy", choices=DECODE_STRATEGIES, default=DecodeConfig.strategy)
    for name in DECODE_FLAGS:  # int / float: the types of the defaults
        default = getattr(DecodeConfig, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                       help="GNMT alpha" if name == "length_penalty" else None)
    p.add_argument("--batch-size", type=int, default=16)

    p = command(sub, "eval", cmd_eval, help="per-direction BLEU / chrF / chrF++ (sacreBLEU) of a run dir, a jaxft "
                 "folder or an HF folder on the dev or test directions, or on --src / --ref; prints the report, "
                 "reads only")
    p.add_argument("config", type=Path, nargs="?", help="experiment YAML (data, eval settings; default: the run "
                   "dir's own config, or none with --src / --ref)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set eval.decode.beam_size=1 (repeatable)")
    p.add_argument("--model", "--run-dir", dest="model", help=MODEL_HELP + " (default: the config's run_dir)")
    p.add_argument("--split", choices=("dev", "test"), help="data.dev or data.test (default dev)")
    p.add_argument("--src", help="score this source file (one sentence per line) instead of the config's split")
    p.add_argument("--ref", help="with --src: the reference translations, line by line")
    p.add_argument("--src-lang", help="with --src: its language")
    p.add_argument("--tgt-lang", help="with --src: the references' language")
    _common(p, "a run's data config; for folders the CONFIG's data.lang_tokens, else the family's codes")
    p.add_argument("--max-examples", type=int, help="per direction (default: eval.max_examples)")
    p.add_argument("--out", help="also write eval.json / eval.md to this new folder (outside the run dir, "
                                 "the config and its data; default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out report folder")
