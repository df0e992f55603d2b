"""SentencePiece tokenizer: a thin wrapper, and deterministic training.

Special ids of models trained here: pad 0, unk 1, bos 2, eos 3 (then
``user_defined_symbols``, then learned pieces).  Models loaded from elsewhere
keep their own ids; if such a model defines no pad piece (e.g. LLaMA/Mistral),
``pad_id`` is 0: padding always carries loss weight 0 and segment id 0, so the
id it shares with another piece is never trained on or attended to.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from jaxft.config.schema import TokenizerConfig

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    """A loaded SentencePiece model. ``encode`` adds no bos/eos."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None):
        self._sp = processor
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} does not exist")
        sp = spm.SentencePieceProcessor()
        sp.Load(str(path))
        return cls(sp, str(path))

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int | None:
        """None when the model defines no bos piece (then none is prepended)."""
        i = self._sp.bos_id()
        return i if i >= 0 else None

    @property
    def eos_id(self) -> int | None:
        i = self._sp.eos_id()
        return i if i >= 0 else None

    @property
    def pad_id(self) -> int:
        i = self._sp.pad_id()
        return i if i >= 0 else 0

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))

    def piece_id(self, piece: str) -> int | None:
        """Id of a vocabulary piece (``"<mask>"``, ``"de_DE"``), or None if it is not one."""
        i = self._sp.PieceToId(piece)
        return i if 0 <= i < self.vocab_size and self._sp.IdToPiece(i) == piece else None

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def train_tokenizer(
    texts: Iterable[str],
    out_path: str | Path,
    cfg: TokenizerConfig,
    *,
    user_defined_symbols: Sequence[str] = (),
) -> Tokenizer:
    """Train a SentencePiece model on ``texts`` and write it to ``out_path``.

    Deterministic: the same texts and config give a byte-identical model (one
    thread, the first ``cfg.max_sentences`` texts in order, no sentence
    sampling or shuffling).
    """
    if not cfg.train_vocab_size:
        raise ValueError("data.tokenizer.train_vocab_size must be set to train a tokenizer")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def sentences():
        n = 0
        for t in texts:
            t = t.strip()
            if not t:
                continue
            yield t
            n += 1
            if n >= cfg.max_sentences:
                return

    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=sentences(),
        model_writer=model,
        vocab_size=cfg.train_vocab_size,
        model_type=cfg.model_type,
        character_coverage=cfg.character_coverage,
        byte_fallback=cfg.byte_fallback,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        user_defined_symbols=list(user_defined_symbols),
        input_sentence_size=0,  # already cut to max_sentences above: no sampling
        shuffle_input_sentence=False,
        num_threads=1,
        # Small corpora cannot always fill the requested vocabulary; a smaller
        # one is better than a failed run (the model's vocab_size only needs
        # to be at least the tokenizer's).
        hard_vocab_limit=False,
        minloglevel=2,
    )
    out_path.write_bytes(model.getvalue())
    tok = Tokenizer.load(out_path)
    if tok.vocab_size < cfg.train_vocab_size:
        log.warning(
            "tokenizer %s has %d pieces, fewer than data.tokenizer.train_vocab_size=%d "
            "(corpus too small)", out_path, tok.vocab_size, cfg.train_vocab_size
        )
    return tok
