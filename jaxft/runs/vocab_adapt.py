"""Vocabulary adaptation of a model and its tokenizer together: `jaxft vocab extend` / `trim`.

A source is a run dir (its newest checkpoint, LoRA merged as `jaxft export` does), a jaxft folder
(`params/` + `model.yaml` + a tokenizer) or a Hugging Face folder; its SentencePiece tokenizer is
read with the model's ids (`vocab_tokenizer.plain_proto`).  The result is a new jaxft folder:

    params/  model.yaml  tokenizer/tokenizer.model  vocab_report.json  [hf_config.json]

- `extend_vocab` appends pieces (explicit ones, language tags / codes: USER_DEFINED; pieces learned
  from a corpus: NORMAL, so the segmenter uses them inside words) and gives their embedding and
  LM-head rows (and vocabulary biases) the `init` rule: `mean` (of the existing pieces' rows),
  `subword` (the mean of the rows of the pieces the new piece's text splits into with the old
  tokenizer; `mean` where it splits into nothing known), `random` (N(0, std of the rows)) or
  `zeros`.  Existing ids keep their rows, so old logits on old text are unchanged.
- `trim_vocab` keeps the pieces seen (at least `min_count` times) when tokenizing the corpora, plus
  every special / user-defined piece, byte pieces when the model falls back to bytes, `keep`, and
  (BPE) the pieces merges pass through; ids are renumbered in order in the tokenizer and in every
  vocabulary parameter, so the trimmed model gives the same logits on kept ids for such text.

`model.vocab_size` becomes the tokenizer size rounded up to `pad_multiple` (default: the largest
power of two up to 128 that divides the source's `model.vocab_size`, i.e. the source's padding
alignment); an extension never shrinks it (the source's padding rows are kept).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from jaxft.config.schema import ModelConfig
from jaxft.data.vocab import add_pieces, learn_pieces, piece_counts, trim_ids, trim_proto
from jaxft.models.embedding_resize import remap_vocab
from jaxft.outputs import check_output, is_main_process, safe_output
from jaxft.runs.layout import RunDir
from jaxft.runs.vocab_tokenizer import plain_proto, tokenizer_of

RULES = ("mean", "subword", "random", "zeros")
REPORT = "vocab_report.json"
_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


@dataclasses.dataclass
class Source:
    path: Path
    kind: str  # run | jaxft | hf
    model: ModelConfig
    params: nnx.State
    tokenizer: Path  # the file or folder the tokenizer was read from
    proto: sp_pb2.ModelProto  # ids == the model's ids
    hf_config: dict | None  # config.json of an HF source (or a jaxft folder's hf_config.json)


def _run_tokenizer_path(run_dir: Path) -> Path:
    from jaxft.runs.model import read_run_config

    tcfg = read_run_config(run_dir).data.tokenizer
    own = RunDir(run_dir).tokenizer
    if not tcfg.path or (tcfg.extend and own.is_file()):
        return own
    path = Path(tcfg.path.removeprefix("hf:"))
    return path if path.is_absolute() else run_dir / path


def source_paths(src: str | Path, tokenizer: str | Path | None = None) -> tuple[str, Path]:
    """(kind, tokenizer path) of a source, from its files alone (nothing loaded)."""
    from jaxft.interop import convert

    path = Path(src)
    if RunDir(path).is_run():
        kind, tok = "run", _run_tokenizer_path(path)
    elif (path / convert.MODEL_YAML).is_file() and (path / convert.PARAMS).is_dir():
        kind = "jaxft"
        tok = path / "tokenizer.model" if (path / "tokenizer.model").is_file() else path / convert.TOKENIZER
    elif (path / "config.json").is_file():
        kind, tok = "hf", path
    else:
        raise FileNotFoundError(f"SRC: {path} is not a run dir (config.yaml), a jaxft folder (model.yaml + params/) "
                                "or a Hugging Face folder (config.json)")
    return kind, Path(tokenizer) if tokenizer is not None else tok


def load_source(src: str | Path, tokenizer: str | Path | None = None) -> Source:
    """A source's model (LoRA merged) and tokenizer, read without writing anything."""
    from jaxft.interop import convert

    path = Path(src)
    kind, tok = source_paths(path, tokenizer)
    proto = plain_proto(tok, "--tokenizer" if tokenizer is not None else f"the tokenizer of {path}")
    hf_config = None
    if kind == "run":
        from jaxft.runs.export import plain_params
        from jaxft.runs.model import restore_model

        restored = restore_model(path)
        cfg, params = restored.config.model, plain_params(restored.model())
    elif kind == "jaxft":
        cfg = convert.read_model_yaml(path / convert.MODEL_YAML)
        params = convert.restore_params(path / convert.PARAMS, cfg)
        if (path / convert.HF_CONFIG).is_file():
            hf_config = json.loads((path / convert.HF_CONFIG).read_text())
    else:
        from jaxft.interop.hf import load_hf, read_hf_config

        cfg, params = load_hf(path)
        hf_config = read_hf_config(path)
    if len(proto.pieces) > cfg.vocab_size:
        raise ValueError(f"{path}: its tokenizer ({tok}) has {len(proto.pieces)} pieces, more than the model's "
                         f"{cfg.vocab_size} rows; pass the model's own tokenizer with --tokenizer")
    return Source(path, kind, dataclasses.replace(cfg, init_from=None), params, tok, proto, hf_config)


def padded_size(size: int, pad_multiple: int) -> int:
    return -(-size // pad_multiple) * pad_multiple


def default_multiple(vocab_size: int) -> int:
    """The source's padding alignment: the largest power of two <= 128 dividing its vocab_size."""
    m = 128
    while vocab_size % m:
        m //= 2
    return m


def _count(state: nnx.State) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(state))


def _pieces_for(names: Sequence[str], style: str) -> list[str]:
    from jaxft.data.langcodes import lang_code_token, t5_tag

    return [t5_tag(c) if style == "t5_tag" else lang_code_token(c, style) for c in names]


def _subword_means(old_proto: sp_pb2.ModelProto, new_proto: sp_pb2.ModelProto) -> dict[int, list[int]]:
    """New id -> the old ids its text splits into with the old tokenizer (unknown pieces left out)."""
    old = tokenizer_of(old_proto)
    unk = old._sp.unk_id()
    means = {}
    for i in range(len(old_proto.pieces), len(new_proto.pieces)):
        ids = old.encode(new_proto.pieces[i].piece.replace("\u2581", " "))
        if ids and not new_proto.pieces[i].piece.startswith("\u2581") and old.id_to_piece(ids[0]) == "\u2581":
            ids = ids[1:]  # a word-internal piece: not the space SentencePiece puts in front of the text
        means[i] = [j for j in ids if j != unk]
    return means


def extend_vocab(src: str | Path, out: str | Path, *, pieces: Sequence[str] = (), langs: Sequence[str] = (),
                 lang_style: str = "t5_tag", corpus: Sequence[str | Path] = (), new_pieces: int = 0,
                 init: str = "mean", pad_multiple: int | None = None, tokenizer: str | Path | None = None,
                 overwrite: bool = False) -> dict:
    """Grow SRC's tokenizer and model; write the jaxft folder `out`; returns the report."""
    if init not in RULES:
        raise ValueError(f"--init must be one of {', '.join(RULES)}, got {init!r}")
    if bool(corpus) != bool(new_pieces):
        raise ValueError("--from-corpus and --new-pieces go together (pieces learned from FILE, up to N)")
    wanted = list(pieces) + _pieces_for(langs, lang_style)
    if not wanted and not corpus:
        raise ValueError("vocab extend: nothing to add (give --pieces, --langs or --from-corpus with --new-pieces)")
    check_output(out, [src, tokenizer], overwrite=overwrite, flag="--out")
    source = load_source(src, tokenizer)
    proto = sp_pb2.ModelProto()
    proto.CopyFrom(source.proto)
    added = add_pieces(proto, wanted)
    source_tok = tokenizer_of(source.proto)
    learned: list[str] = []
    if corpus:
        found, scores = learn_pieces(corpus, proto, new_pieces)
        learned = add_pieces(proto, found, normal=True, scores=scores)
    old_n, new_n, old_v = len(source.proto.pieces), len(proto.pieces), source.model.vocab_size
    vocab = max(old_v, padded_size(new_n, pad_multiple or default_multiple(old_v)))
    index = np.arange(vocab)
    index[(index >= old_n) & (index < new_n)] = -1
    index[index >= old_v] = -1
    means = _subword_means(source.proto, proto) if init == "subword" else None
    params = remap_vocab(source.params, index, means, init={"random": "normal", "subword": "mean"}.get(init, init),
                         fill_rows=old_n)
    report = {"command": "extend", "init": init, "added": added, "learned": learned,
              "skipped": [p for p in dict.fromkeys(wanted) if source_tok.piece_id(p) is not None]}
    return _finish(source, out, proto, params, vocab, report, None, overwrite)


def trim_vocab(src: str | Path, out: str | Path, *, corpus: Sequence[str | Path], keep: Sequence[str] = (),
               min_count: int = 1, pad_multiple: int | None = None, tokenizer: str | Path | None = None,
               overwrite: bool = False) -> dict:
    """Keep the pieces the corpora use (and the special ones); write the jaxft folder `out`."""
    if not corpus:
        raise ValueError("vocab trim: --corpus needs at least one file")
    if min_count < 1:
        raise ValueError(f"--min-count must be >= 1, got {min_count}")
    check_output(out, [src, tokenizer, *corpus], overwrite=overwrite, flag="--out")
    source = load_source(src, tokenizer)
    counts = piece_counts(tokenizer_of(source.proto), corpus)
    kept = trim_ids(source.proto, np.nonzero(counts >= min_count)[0].tolist(), keep)
    proto = trim_proto(source.proto, kept)
    vocab = padded_size(len(kept), pad_multiple or default_multiple(source.model.vocab_size))
    params = remap_vocab(source.params, kept + [-1] * (vocab - len(kept)), init="mean",
                         fill_rows=len(source.proto.pieces))
    old_to_new = {old: new for new, old in enumerate(kept)}
    report = {"command": "trim", "min_count": min_count, "kept": len(kept),
              "removed": len(source.proto.pieces) - len(kept), "kept_ids": kept}
    return _finish(source, out, proto, params, vocab, report, old_to_new, overwrite)


def _finish(source: Source, out: str | Path, proto: sp_pb2.ModelProto, params: nnx.State, vocab: int,
            report: dict, old_to_new: dict[int, int] | None, overwrite: bool) -> dict:
    """Add the before / after sizes to `report` and write the folder."""
    remap = (lambda i: i) if old_to_new is None else old_to_new.get  # noqa: E731
    start = source.model.decoder_start_id
    cfg = dataclasses.replace(source.model, vocab_size=vocab, decoder_start_id=None if start is None else remap(start))
    report = {"source": str(source.path), "source_kind": source.kind, "tokenizer": str(source.tokenizer),
              "before": {"tokenizer_size": len(source.proto.pieces), "vocab_size": source.model.vocab_size,
                         "params": _count(source.params)},
              "after": {"tokenizer_size": len(proto.pieces), "vocab_size": vocab, "params": _count(params)},
              **report}
    hf = None
    if source.hf_config is not None:
        hf = dict(source.hf_config, vocab_size=vocab)
        for key in _SPECIAL_IDS:
            if isinstance(hf.get(key), int):
                hf[key] = remap(hf[key])
    _write(out, [source.path, source.tokenizer], cfg, params, proto, hf, report, overwrite)
    return report


def _write(out: str | Path, inputs: list, cfg: ModelConfig, params: nnx.State, proto: sp_pb2.ModelProto,
           hf: dict | None, report: dict, overwrite: bool) -> None:
    from jaxft.interop import convert

    with safe_output(out, inputs, overwrite=overwrite, flag="--out") as tmp:
        convert.save_params(tmp / convert.PARAMS, params)
        if is_main_process():
            convert.write_model_yaml(tmp / convert.MODEL_YAML, cfg)
            (tmp / convert.TOKENIZER).mkdir()
            (tmp / convert.TOKENIZER / "tokenizer.model").write_bytes(proto.SerializeToString())
            if hf is not None:
                (tmp / convert.HF_CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
            (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")


def describe(report: dict) -> str:
    """The before / after lines `jaxft vocab` prints."""
    b, a = report["before"], report["after"]
    what = (f"added {len(report['added'])} pieces + {len(report['learned'])} learned from the corpus "
            f"(init {report['init']})" if report["command"] == "extend"
            else f"kept {report['kept']} pieces, removed {report['removed']}")
    return "\n".join([what,
                      f"tokenizer pieces  {b['tokenizer_size']:>12,} -> {a['tokenizer_size']:,}",
                      f"model.vocab_size  {b['vocab_size']:>12,} -> {a['vocab_size']:,}",
                      f"parameters        {b['params']:>12,} -> {a['params']:,}"])
