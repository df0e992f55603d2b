"""Vocabulary extension: new pieces for target-language tags, language codes,
``<mask>`` / sentinels, or new languages, appended to a SentencePiece model.

Appending keeps every existing id, so a pretrained model only needs new
embedding rows (``jaxft.models.embedding_resize.extend_embeddings``) and a model config
with ``vocab_size`` >= the new tokenizer's size.  The new pieces are
USER_DEFINED: SentencePiece always encodes them as one piece, wherever they
occur in the text.

For a T5/mT5 SentencePiece model (no ``<extra_id_N>`` pieces; T5 puts 100
sentinels right after them) add ``t5_sentinel_pieces()`` first, so the
sentinels keep their T5 ids (``<extra_id_0>`` = old size + 99) and new pieces
come after them.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from jaxft.config.schema import DataConfig, TokenizerConfig
from jaxft.data.chat import template_special_tokens
from jaxft.data.langcodes import lang_code_token, t5_tag
from jaxft.data.sources import keyed_sources
from jaxft.data.tokenizer import Tokenizer, train_tokenizer
from jaxft.paths import as_path

log = logging.getLogger(__name__)


def read_proto(path: str | Path) -> sp_pb2.ModelProto:
    """The ModelProto of a SentencePiece ``.model`` file (a local path or a URL)."""
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model {path} does not exist")
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: one line
        raise ValueError(f"{path}: not a SentencePiece model ({type(e).__name__})") from None
    return proto


def write_proto(proto: sp_pb2.ModelProto, out_path: str | Path) -> Tokenizer:
    """Write ``proto`` to ``out_path`` and load it (SentencePiece checks it)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(proto.SerializeToString())
    return Tokenizer.load(out_path)


def add_pieces(proto: sp_pb2.ModelProto, new_pieces: Sequence[str], *, normal: bool = False,
               scores: Sequence[float] | None = None) -> list[str]:
    """Append ``new_pieces`` to ``proto`` in place; returns those added (present or repeated ones
    are skipped).  USER_DEFINED (always one piece, wherever it occurs) by default; ``normal``:
    NORMAL pieces with ``scores`` (what a corpus-learned piece is: the segmenter may use it)."""
    present = {p.piece for p in proto.pieces}
    added = []
    kind = sp_pb2.ModelProto.SentencePiece.NORMAL if normal else sp_pb2.ModelProto.SentencePiece.USER_DEFINED
    for n, piece in enumerate(new_pieces):
        if not piece or any(c.isspace() for c in piece):
            raise ValueError(f"vocabulary piece {piece!r} must be non-empty and contain no whitespace")
        if piece in present:
            continue
        present.add(piece)
        score = float(scores[n]) if scores is not None else 0.0
        proto.pieces.append(sp_pb2.ModelProto.SentencePiece(piece=piece, score=score, type=kind))
        added.append(piece)
    return added


def extend_tokenizer(model_path: str | Path, new_pieces: Sequence[str], out_path: str | Path) -> Tokenizer:
    """Append ``new_pieces`` (USER_DEFINED, score 0) to the model at ``model_path``,
    write it to ``out_path`` and load it.  Pieces already in the vocabulary (or
    repeated) are skipped; existing ids are unchanged."""
    proto = read_proto(model_path)
    added = add_pieces(proto, new_pieces)
    tok = write_proto(proto, out_path)
    log.info("tokenizer %s: added %d pieces (%d skipped), vocabulary %d", out_path, len(added),
             len(new_pieces) - len(added), tok.vocab_size)
    return tok


def lang_tag_pieces(langs: Iterable[str]) -> list[str]:
    """T5-style target-language tags: ``["de", "yo"] -> ["<2de>", "<2yo>"]``."""
    return [t5_tag(code) for code in langs]


def t5_sentinel_pieces(count: int = 100) -> list[str]:
    """``<extra_id_{count-1}>`` ... ``<extra_id_0>``: appended in this order they take
    T5's ids (``<extra_id_0>`` last)."""
    return [f"<extra_id_{j}>" for j in reversed(range(count))]


def required_pieces(cfg: DataConfig, base_dir: Path, *, sentinels: int = 100) -> list[str]:
    """Pieces the configured data needs as single tokens: ``<2xx>`` tags or
    language codes for every direction (``data.lang_tokens``), ``<extra_id_k>``
    sentinels for span corruption, ``<mask>`` for infilling, the ``<|...|>`` tokens of
    ``data.chat_template`` for chat.  A tokenizer
    trained by a run includes them (``user_defined_symbols``); a loaded one that
    lacks them is extended with ``extend_tokenizer``."""
    pieces: list[str] = []
    for section, sources in (("data.train", cfg.train), ("data.dev", cfg.dev), ("data.test", cfg.test)):
        for _, src in keyed_sources(sources, Path(base_dir), section=section):
            if src.task == "translation" and cfg.lang_tokens == "t5_tag" and src.tgt_lang:
                pieces.append(t5_tag(src.tgt_lang))
            if cfg.lang_tokens == "lang_code" and src.task in ("translation", "infilling"):
                pieces += [lang_code_token(c, cfg.lang_code_style) for c in (src.src_lang, src.tgt_lang) if c]
            if src.task == "span_corruption":
                pieces += [f"<extra_id_{k}>" for k in range(sentinels)]
            if src.task == "infilling":
                pieces.append("<mask>")
            if src.task == "chat":
                pieces += template_special_tokens(cfg.chat_template)
    return list(dict.fromkeys(pieces))


# --------------------------------------------------------------------------- corpora and trimming

_SP = sp_pb2.ModelProto.SentencePiece
ALWAYS_KEPT = (_SP.CONTROL, _SP.UNKNOWN, _SP.USER_DEFINED)


def corpus_lines(files: Sequence[str | Path], flag: str = "--corpus") -> Iterator[str]:
    """The non-empty lines of text files, streamed (nothing held in memory)."""
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"{flag}: {path} does not exist")
        with open(path, encoding="utf-8") as fh:
            try:
                for line in fh:
                    if line.strip():
                        yield line.rstrip("\n")
            except UnicodeDecodeError:
                raise ValueError(f"{flag}: {path} is not UTF-8 text") from None


def piece_counts(tok: Tokenizer, files: Sequence[str | Path], *, batch: int = 2048) -> np.ndarray:
    """How often each id occurs when ``tok`` encodes the lines of ``files``."""
    counts = np.zeros(tok.vocab_size, np.int64)
    lines: list[str] = []
    for line in itertools.chain(corpus_lines(files), [None]):
        if line is not None:
            lines.append(line)
        if lines and (line is None or len(lines) >= batch):
            ids = [i for row in tok.encode_batch(lines) for i in row]
            counts += np.bincount(np.asarray(ids, np.int64), minlength=tok.vocab_size)[:tok.vocab_size]
            lines = []
    return counts


def learn_pieces(files: Sequence[str | Path], proto: sp_pb2.ModelProto, count: int,
                 *, max_sentences: int = 200000) -> tuple[list[str], list[float]]:
    """Up to ``count`` pieces a SentencePiece model (of ``proto``'s type) trained on ``files``
    has and ``proto`` lacks, highest score first, with scores for ``add_pieces(normal=True)``:
    unigram pieces keep their learned log-probabilities; BPE pieces get scores below every
    existing piece, in the learned order (their merges come after the old ones)."""
    bpe = proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE
    cfg = TokenizerConfig(train_vocab_size=2 * count + 256, model_type="bpe" if bpe else "unigram",
                          byte_fallback=False, max_sentences=max_sentences,
                          character_coverage=proto.trainer_spec.character_coverage or 0.9995)
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(corpus_lines(files, "--from-corpus"), Path(tmp) / "learned.model", cfg,
                        setting="the corpus-learned vocabulary (2 x --new-pieces + 256)",
                        corpus=", ".join(map(str, files)))
        learned = read_proto(Path(tmp) / "learned.model")
    present = {p.piece for p in proto.pieces}
    found = [(p.piece, p.score) for p in learned.pieces
             if p.type == _SP.NORMAL and p.piece not in present and p.piece.strip("\u2581")]
    found = sorted(found, key=lambda ps: -ps[1])[:count]
    if bpe:
        floor = min((p.score for p in proto.pieces if p.type == _SP.NORMAL), default=0.0)
        return [p for p, _ in found], [floor - 1.0 - r for r in range(len(found))]
    return [p for p, _ in found], [s for _, s in found]


def _bpe_intermediates(piece: str, scores: dict[str, float]) -> set[str]:
    """The pieces SentencePiece's BPE forms on the way to ``piece`` (merging, on its characters
    alone, the adjacent pair of highest score whose concatenation is a piece, as encoding does)."""
    symbols, formed = list(piece), set()
    while len(symbols) > 1:
        best = max(((scores[a + b], -k) for k, (a, b) in enumerate(zip(symbols, symbols[1:]))
                    if a + b in scores), default=None)
        if best is None:
            break
        k = -best[1]
        symbols[k:k + 2] = [symbols[k] + symbols[k + 1]]
        formed.add(symbols[k])
    return formed | set(symbols)


def trim_ids(proto: sp_pb2.ModelProto, seen: Iterable[int], keep: Iterable[str] = ()) -> list[int]:
    """The ids a trimmed model keeps, in order: ``seen`` ids, the pieces named in ``keep``, every
    control / unknown / user-defined piece, the byte pieces when the model falls back to bytes,
    and (BPE) every piece a kept piece is merged from."""
    index = {p.piece: i for i, p in enumerate(proto.pieces)}
    missing = [k for k in keep if k not in index]
    if missing:
        raise ValueError(f"--keep: {', '.join(map(repr, missing[:5]))} not in the tokenizer's vocabulary")
    kept = set(seen) | {index[k] for k in keep}
    byte = proto.trainer_spec.byte_fallback
    kept |= {i for i, p in enumerate(proto.pieces) if p.type in ALWAYS_KEPT or (byte and p.type == _SP.BYTE)}
    if proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE:
        scores = {p.piece: p.score for p in proto.pieces if p.type in (_SP.NORMAL, _SP.USER_DEFINED)}
        for i in list(kept):
            if proto.pieces[i].type == _SP.NORMAL:
                kept |= {index[p] for p in _bpe_intermediates(proto.pieces[i].piece, scores) if p in index}
    return sorted(kept)


def trim_proto(proto: sp_pb2.ModelProto, kept_ids: Sequence[int]) -> sp_pb2.ModelProto:
    """A copy of ``proto`` with only the pieces ``kept_ids`` (old order kept; the special
    ids of its trainer spec renumbered)."""
    new = sp_pb2.ModelProto()
    new.CopyFrom(proto)
    del new.pieces[:]
    new.pieces.extend(proto.pieces[i] for i in kept_ids)
    old_to_new = {old: n for n, old in enumerate(kept_ids)}
    spec = new.trainer_spec
    for field in ("unk_id", "bos_id", "eos_id", "pad_id"):
        if getattr(spec, field) >= 0:
            setattr(spec, field, old_to_new.get(getattr(spec, field), -1))
    return new
