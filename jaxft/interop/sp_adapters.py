"""SentencePiece models whose HF ids are not the SentencePiece ids: T5 and fairseq (mBART-50, NLLB).

Both subclass ``jaxft.data.tokenizer.Tokenizer`` (same interface: ``encode``
without bos/eos, ``decode`` dropping special tokens, ``bos_id``/``eos_id``/
``pad_id``/``vocab_size``/``piece_id``/``id_to_piece``) and give HF's ids:

- ``T5SentencePieceTokenizer`` (``spiece.model``: T5, mT5, umT5): SentencePiece
  ids as they are, then ``extra_ids`` (100) sentinels in reverse order,
  ``<extra_id_k>`` = ``sp_size + extra_ids - 1 - k`` (HF ``T5Tokenizer``).
- ``FairseqSentencePieceTokenizer`` (``sentencepiece.bpe.model``: mBART-50,
  NLLB-200): fairseq's dictionary in front of SentencePiece: ``<s>`` 0,
  ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, SentencePiece piece ``i >= 3`` at
  ``i + 1`` (its own unk/bos/eos at 0/1/2 are replaced by the fairseq ones),
  then the language codes at ``sp_size + 1 + j``, then ``<mask>``
  (HF ``MBart50Tokenizer`` / ``NllbTokenizer``).  ``piece_id("deu_Latn")`` is
  the HF id, so ``data.lang_tokens: lang_code`` works with released checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import sentencepiece as spm

from jaxft.config.errors import FileFormatError, read_json
from jaxft.data.langcodes import FLORES200, MBART50
from jaxft.data.tokenizer import Tokenizer

_EXTRA = re.compile(r"<extra_id_(\d+)>")
FAIRSEQ_SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
MASK = "<mask>"
# tokenizer_class -> language codes (mBART cc25: the first 25 of mBART-50's list).
_CODES_BY_CLASS = {"NllbTokenizer": FLORES200, "MBart50Tokenizer": MBART50, "MBartTokenizer": MBART50[:25]}


class T5SentencePieceTokenizer(Tokenizer):
    def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None, extra_ids: int = 100):
        super().__init__(processor, path)
        self.sp_size, self.extra_ids = processor.GetPieceSize(), extra_ids

    @property
    def vocab_size(self) -> int:
        return self.sp_size + self.extra_ids

    def piece_id(self, piece: str) -> int | None:
        m = _EXTRA.fullmatch(piece)
        if m and int(m.group(1)) < self.extra_ids:
            return self.sp_size + self.extra_ids - 1 - int(m.group(1))
        return super().piece_id(piece)

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        return f"<extra_id_{self.vocab_size - 1 - i}>" if i >= self.sp_size else super().id_to_piece(i)

    def decode(self, ids: Sequence[int]) -> str:
        return super().decode([int(i) for i in ids if int(i) < self.sp_size])

    def __repr__(self) -> str:
        return f"T5SentencePieceTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


class FairseqSentencePieceTokenizer(Tokenizer):
    def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None,
                 lang_codes: Sequence[str] = ()):
        super().__init__(processor, path)
        self.sp_size = processor.GetPieceSize()
        self.lang_codes = tuple(lang_codes)
        self._added = {code: self.sp_size + 1 + j for j, code in enumerate(self.lang_codes)}
        self._added[MASK] = self.sp_size + 1 + len(self.lang_codes)
        self._by_id = {i: p for p, i in {**FAIRSEQ_SPECIALS, **self._added}.items()}

    @property
    def vocab_size(self) -> int:
        return self.sp_size + len(self.lang_codes) + 2

    @property
    def bos_id(self) -> int:
        return FAIRSEQ_SPECIALS["<s>"]

    @property
    def eos_id(self) -> int:
        return FAIRSEQ_SPECIALS["</s>"]

    @property
    def pad_id(self) -> int:
        return FAIRSEQ_SPECIALS["<pad>"]

    def _to_fairseq(self, i: int) -> int:
        return i + 1 if i >= 3 else FAIRSEQ_SPECIALS["<unk>"]  # 0 1 2 = sp unk/bos/eos

    def encode(self, text: str) -> list[int]:
        return [self._to_fairseq(i) for i in self._sp.EncodeAsIds(text)]

    def decode(self, ids: Sequence[int]) -> str:
        # <unk> decodes as SentencePiece's " ⁇ " (as our Tokenizer; HF drops it); other specials are dropped
        unk = FAIRSEQ_SPECIALS["<unk>"]
        return self._sp.DecodeIds([0 if int(i) == unk else int(i) - 1 for i in ids
                                   if 4 <= int(i) <= self.sp_size or int(i) == unk])

    def piece_id(self, piece: str) -> int | None:
        if piece in FAIRSEQ_SPECIALS:
            return FAIRSEQ_SPECIALS[piece]
        if piece in self._added:
            return self._added[piece]
        i = self._sp.PieceToId(piece)
        return i + 1 if 3 <= i < self.sp_size and self._sp.IdToPiece(i) == piece else None

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        return self._by_id[i] if i in self._by_id else self._sp.IdToPiece(i - 1)

    def __repr__(self) -> str:
        return (f"FairseqSentencePieceTokenizer(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"lang_codes={len(self.lang_codes)})")


def _json(path: Path) -> dict:
    return read_json(path, path.name) if path.is_file() else {}


def _fairseq_codes(directory: Path) -> tuple[str, ...]:
    """Language codes of an mBART/NLLB tokenizer folder: tokenizer_config.json's list of additional
    special tokens, else its ``tokenizer_class``, else config.json's ``model_type``."""
    tok_cfg = _json(directory / "tokenizer_config.json")
    for key in ("additional_special_tokens", "extra_special_tokens"):
        listed = tok_cfg.get(key)
        if isinstance(listed, list) and listed:
            codes = tuple(t.get("content") if isinstance(t, dict) else t for t in listed)
            return tuple(c for c in codes if c not in FAIRSEQ_SPECIALS and c != MASK)
    cls = str(tok_cfg.get("tokenizer_class") or "").removesuffix("Fast")
    if cls in _CODES_BY_CLASS:
        return _CODES_BY_CLASS[cls]
    model_type = _json(directory / "config.json").get("model_type")
    return {"m2m_100": FLORES200, "mbart": MBART50}.get(model_type, ())


def load_sentencepiece(path: str | Path) -> Tokenizer:
    """Our tokenizer for a SentencePiece file, with HF's ids for ``spiece.model`` (T5) and a
    fairseq-layout ``sentencepiece.bpe.model`` (unk 0, bos 1, eos 2: mBART-50, NLLB)."""
    path = Path(path)
    plain = Tokenizer.load(path)
    sp = plain._sp
    if path.name == "spiece.model":
        has_sentinels = plain.piece_id("<extra_id_0>") is not None
        extra = _json(path.parent / "tokenizer_config.json").get("extra_ids", 100)
        if not isinstance(extra, int) or isinstance(extra, bool) or extra < 0:
            raise FileFormatError(f"{path.parent / 'tokenizer_config.json'}: extra_ids={extra!r}: "
                                  "expected a count >= 0")
        return T5SentencePieceTokenizer(sp, str(path), 0 if has_sentinels else extra)
    if path.name == "sentencepiece.bpe.model" and (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2):
        return FairseqSentencePieceTokenizer(sp, str(path), _fairseq_codes(path.parent))
    return plain
