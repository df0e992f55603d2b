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

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from jaxft.config.schema import DataConfig
from jaxft.data.langcodes import lang_code_token, t5_tag
from jaxft.data.sources import keyed_sources
from jaxft.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def extend_tokenizer(model_path: str | Path, new_pieces: Sequence[str], out_path: str | Path) -> Tokenizer:
    """Append ``new_pieces`` (USER_DEFINED, score 0) to the model at ``model_path``,
    write it to ``out_path`` and load it.  Pieces already in the vocabulary (or
    repeated) are skipped; existing ids are unchanged."""
    model_path, out_path = Path(model_path), Path(out_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"tokenizer model {model_path} does not exist")
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    present = {p.piece for p in proto.pieces}
    added = []
    for piece in new_pieces:
        if not piece or any(c.isspace() for c in piece):
            raise ValueError(f"vocabulary piece {piece!r} must be non-empty and contain no whitespace")
        if piece in present:
            continue
        present.add(piece)
        proto.pieces.append(sp_pb2.ModelProto.SentencePiece(
            piece=piece, score=0.0, type=sp_pb2.ModelProto.SentencePiece.USER_DEFINED))
        added.append(piece)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(proto.SerializeToString())
    tok = Tokenizer.load(out_path)
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
    sentinels for span corruption, ``<mask>`` for infilling.  A tokenizer
    trained by a run includes them (``user_defined_symbols``); a loaded one that
    lacks them is extended with ``extend_tokenizer``."""
    pieces: list[str] = []
    for section, sources in (("data.train", cfg.train), ("data.dev", cfg.dev)):
        for _, src in keyed_sources(sources, Path(base_dir), section=section):
            if src.task == "translation" and cfg.lang_tokens == "t5_tag" and src.tgt_lang:
                pieces.append(t5_tag(src.tgt_lang))
            if cfg.lang_tokens == "lang_code" and src.task in ("translation", "infilling"):
                pieces += [lang_code_token(c, cfg.lang_code_style) for c in (src.src_lang, src.tgt_lang) if c]
            if src.task == "span_corruption":
                pieces += [f"<extra_id_{k}>" for k in range(sentinels)]
            if src.task == "infilling":
                pieces.append("<mask>")
    return list(dict.fromkeys(pieces))
