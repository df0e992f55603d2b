"""`jaxft vocab extend|trim`: adapt a model's vocabulary and its tokenizer together (docs/vocab.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxft.paths import local_path


def cmd_vocab(args: argparse.Namespace) -> int:
    from jaxft.runs import vocab_adapt

    common = {"pad_multiple": args.pad_multiple, "tokenizer": args.tokenizer, "overwrite": args.overwrite}
    if args.vocab_command == "extend":
        report = vocab_adapt.extend_vocab(args.src, args.out, pieces=args.pieces, langs=args.langs,
                                          lang_style=args.lang_tokens, corpus=args.from_corpus,
                                          new_pieces=args.new_pieces, init=args.init, **common)
    else:
        report = vocab_adapt.trim_vocab(args.src, args.out, corpus=args.corpus, keep=args.keep,
                                        min_count=args.min_count, **common)
    print(vocab_adapt.describe(report))
    print(f"wrote {args.out} (params/, model.yaml, tokenizer/tokenizer.model, {vocab_adapt.REPORT})")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, help="a run dir (its latest checkpoint, LoRA merged), a jaxft folder "
                   "(params/ + model.yaml) or a Hugging Face folder; only read")
    p.add_argument("--out", type=local_path, required=True, help="the new jaxft folder")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="the source's SentencePiece model, when not found in SRC (default: the run's / folder's)")
    p.add_argument("--pad-multiple", type=int, default=None, metavar="M",
                   help="round model.vocab_size up to a multiple of M (default: the source's alignment, <= 128)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder jaxft wrote")


def register(sub, command) -> None:
    group = command(sub, "vocab", None, help="grow or trim a model's vocabulary with its tokenizer "
                    "(writes a new jaxft folder)")
    p = command(group, "extend", cmd_vocab, help="add pieces (language tags, codes, pieces learned from a corpus); "
                "new embedding / LM-head rows start by --init")
    _common(p)
    p.add_argument("--pieces", nargs="+", default=[], metavar="P", help="pieces to add as single tokens")
    p.add_argument("--langs", nargs="+", default=[], metavar="CODE",
                   help="languages whose tokens to add (--lang-tokens)")
    p.add_argument("--lang-tokens", choices=("t5_tag", "flores", "mbart50"), default="t5_tag",
                   help="t5_tag: <2CODE>; flores: eng_Latn-style codes; mbart50: en_XX-style codes")
    p.add_argument("--from-corpus", nargs="+", default=[], type=Path, metavar="FILE",
                   help="text files (one sentence a line) to learn new pieces from")
    p.add_argument("--new-pieces", type=int, default=0, metavar="N", help="with --from-corpus: add up to N pieces")
    p.add_argument("--init", default="mean", choices=("mean", "subword", "random", "zeros"),
                   help="new rows: mean of the existing rows (default), subword: mean of the rows of the pieces "
                   "the new piece splits into, random: N(0, their std), zeros")
    t = command(group, "trim", cmd_vocab, help="keep only the pieces some corpora use (and the special ones); "
                "ids are renumbered in the tokenizer and the model")
    _common(t)
    t.add_argument("--corpus", nargs="+", required=True, type=Path, metavar="FILE",
                   help="text files (one sentence a line) whose pieces to keep")
    t.add_argument("--keep", nargs="+", default=[], metavar="PIECE", help="pieces to keep although unseen")
    t.add_argument("--min-count", type=int, default=1, metavar="K", help="keep pieces seen at least K times")
