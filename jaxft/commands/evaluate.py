"""`jaxft translate` (lines through a run dir, a jaxft folder or an HF checkpoint) and `jaxft eval`
(per-direction sacreBLEU scores of any of them on the dev or test split, or on files named by flags);
with --chat a chat-tuned decoder-only model gets each source as a user turn of its chat template."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxft.commands.export import checkpoint_choice
from jaxft.paths import as_path, config_dir

DECODE_FLAGS = ("beam_size", "length_penalty", "max_len", "min_len", "temperature", "top_k", "top_p", "n_best",
                "repetition_penalty", "no_repeat_ngram_size")
MODEL_HELP = "a run dir, a jaxft folder, an HF folder, or hf:<org/name> (a Hugging Face hub model)"


def _tag_flags(args: argparse.Namespace) -> dict:
    return {"lang_tokens": args.lang_tokens, "lang_code_style": args.lang_code_style}


TRANSLATE_CHUNK = 2048  # lines per chunk: `jaxft translate` holds one chunk, not the corpus


def decode_config(args: argparse.Namespace):
    """The DecodeConfig of --strategy and the decode flags (greedy: one hypothesis)."""
    from jaxft.config.schema import DecodeConfig

    flags = {name: getattr(args, name) for name in DECODE_FLAGS} | ({"n_best": 1} if args.strategy == "greedy" else {})
    return DecodeConfig(strategy=args.strategy, **flags)


def apply_chat_flags(translator, args: argparse.Namespace, *, chat: bool) -> None:
    """With ``chat`` (--chat) each source becomes a user turn of the chat template (--chat-template,
    else the model's): --chat-instruction (default the data.prompt_template), after --system; a bad
    template or instruction fails here, before decoding.  Without it those flags are errors."""
    import dataclasses

    if not chat:
        for flag in ("chat_instruction", "system", "chat_template"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --chat (a chat-tuned decoder-only model)")
        return
    if args.chat_template:
        translator.data_cfg = dataclasses.replace(translator.data_cfg, chat_template=args.chat_template)
    translator.chat_instruction = args.chat_instruction or translator.data_cfg.prompt_template.rstrip("\n")
    translator.chat_system = args.system
    translator.chat_encoder()
    translator.chat_turn("x", args.src_lang or "eng_Latn", args.tgt_lang or "deu_Latn")


def cmd_translate(args: argparse.Namespace) -> int:
    import itertools

    from jaxft.data.readers import read_text_lines
    from jaxft.eval.translate import load_translator
    from jaxft.train.compile_cache import use_compile_cache

    if args.input:  # a bad file fails before the model loads (streamed: O(1) memory)
        for _ in read_text_lines(args.input):
            pass
    translator, cfg = load_translator(args.source, args.checkpoint, **_tag_flags(args))
    use_compile_cache(cfg.compile_cache if cfg is not None else "auto")  # the run's setting; decoding compiles next
    apply_chat_flags(translator, args, chat=args.chat)
    if not args.quiet and sys.stderr.isatty():  # as the progress bar: stderr stays the one-line errors otherwise
        chat_run = cfg is not None and cfg.data.train and all(s.task == "chat" for s in cfg.data.train)
        hint = (" (trained with task: chat: --chat prompts it with its chat template)"
                if chat_run and not args.chat else "")
        print(f"jaxft translate: {args.source}, {args.src_lang} -> {args.tgt_lang}, target language by "
              f"{translator.tag_style}{hint}", file=sys.stderr)
    if args.input:
        lines = read_text_lines(args.input)
    else:
        stdin = getattr(sys.stdin, "buffer", None)
        lines = read_text_lines(stdin, "<stdin>") if stdin else (line.rstrip("\n") for line in sys.stdin)
    decode = decode_config(args)
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
        return cfg, config_dir(args.config), args.model or cfg.run_dir
    if not args.model:
        raise ValueError("eval: give a CONFIG, or --model (a run dir, a jaxft folder or an HF folder)")
    if RunDir(args.model).is_run():  # a local path or a URL (gs://...)
        return load_config(RunDir(args.model).config, args.overrides), RunDir(args.model).root, args.model
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
    from jaxft.train.compile_cache import use_compile_cache

    cfg, base_dir, model = _eval_config(args)
    use_compile_cache(cfg.compile_cache)
    sources = _cli_sources(args)
    inputs = evaluation_inputs(cfg, base_dir=base_dir, run_dir=model, config_path=args.config,
                               sources=sources or ())
    if args.out:  # refused before decoding; the model and the data are only read
        check_output(args.out, inputs, overwrite=args.overwrite, flag="--out")
    translator, run_cfg = load_translator(str(model), args.checkpoint, data_cfg=cfg.data if args.config else None,
                                          **_tag_flags(args))
    apply_chat_flags(translator, args, chat=args.chat)
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
    p.add_argument("--chat", action="store_true", help="decoder-only: prompt each source as a user turn of the "
                   "model's chat template (as task: chat trained it); the output ends at its end-of-turn token")
    p.add_argument("--chat-instruction", metavar="TEXT", help="with --chat: the user turn, with the fields of "
                   "data.prompt_template ({src} the line, {src_name}, {tgt_name}, {src_lang}, {tgt_lang}; the line "
                   "follows on a new line when {src} is absent; default: data.prompt_template)")
    add_template_flags(p)


def add_template_flags(p: argparse.ArgumentParser) -> None:
    """--system and --chat-template (translate / eval with --chat, and chat)."""
    p.add_argument("--system", metavar="TEXT", help="a system prompt (the first message of each conversation)")
    p.add_argument("--chat-template", metavar="NAME|JINJA", help="chatml, llama3 or a Jinja template (default: a "
                   "run's data.chat_template, else the tokenizer's own chat template)")


def add_decode_flags(p: argparse.ArgumentParser, strategy: str) -> None:
    """--strategy (default ``strategy``) and the DECODE_FLAGS, with the eval.decode defaults."""
    from jaxft.config.schema import DECODE_STRATEGIES, DecodeConfig

    p.add_argument("--strategy", choices=DECODE_STRATEGIES, default=strategy)
    for name in DECODE_FLAGS:  # int / float: the types of the defaults
        default = getattr(DecodeConfig, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                       help="GNMT alpha" if name == "length_penalty" else None)


def register(sub, command) -> None:
    p = command(sub, "translate", cmd_translate,
                 help="translate lines (file or stdin -> stdout) with a run dir, a jaxft folder or an HF checkpoint")
    p.add_argument("source", help=MODEL_HELP)
    p.add_argument("--src-lang", required=True)
    p.add_argument("--tgt-lang", required=True)
    p.add_argument("--input", type=Path, help="UTF-8 text, one sentence per line (default: stdin)")
    _common(p, "a run's data config; for folders none, or the family's codes (mBART, NLLB)")
    from jaxft.config.schema import DecodeConfig  # flag defaults = the eval.decode defaults
    add_decode_flags(p, DecodeConfig.strategy)
    p.add_argument("--batch-size", type=int, default=16)

    p = command(sub, "eval", cmd_eval, help="per-direction BLEU / chrF / chrF++ (sacreBLEU) of a run dir, a jaxft "
                 "folder or an HF folder on the dev or test directions, or on --src / --ref; prints the report, "
                 "reads only")
    p.add_argument("config", type=as_path, nargs="?", help="experiment YAML (data, eval settings; default: the run "
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
