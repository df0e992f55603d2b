"""SentencePiece tokenizer: a thin wrapper, and deterministic training.

Special ids of models trained here: pad 0, unk 1, bos 2, eos 3 (then
``user_defined_symbols``, then learned pieces).  Models loaded from elsewhere
keep their own ids; if such a model defines no pad piece (e.g. LLaMA/Mistral),
``pad_id`` is 0: padding always carries loss weight 0 and segment id 0, so the
id it shares with another piece is never trained on or attended to.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from jaxft.config.schema import TokenizerConfig
from jaxft.paths import as_path, is_remote, makedirs, write_atomic

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read, or one that cannot be trained; one line."""


def sentencepiece_message(error: BaseException) -> str:
    """SentencePiece's error text without its ``INTERNAL: src/x.cc(12) [check]`` prefix, on one line."""
    text = re.sub(r"^\w+: ", "", str(error).strip().splitlines()[0] if str(error).strip() else "")
    text = re.sub(r"^src/[\w./]+\(\d+\) \[.*?\] ?", "", text)
    return text.strip() or type(error).__name__


def load_processor(path: str | Path) -> spm.SentencePieceProcessor:
    """A SentencePiece model file (a local path or a URL: read as bytes), or a ``TokenizerError``
    naming it and what is wrong."""
    path = as_path(path)
    if path.is_dir():
        raise TokenizerError(f"{path}: is a folder, not a SentencePiece model file")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model {path} does not exist")
    if (path.stat().length if is_remote(path) else path.stat().st_size) == 0:
        raise TokenizerError(f"{path}: not a SentencePiece model (the file is empty)")
    sp = spm.SentencePieceProcessor()
    try:
        if is_remote(path):
            sp.LoadFromSerializedProto(path.read_bytes())
        else:
            sp.Load(str(path))
    except (RuntimeError, OSError) as e:
        why = sentencepiece_message(e)
        why = "cannot be parsed" if why.startswith("could not parse ModelProto") else why
        raise TokenizerError(f"{path}: not a SentencePiece model ({why}; is the file corrupt?)") from None
    if sp.GetPieceSize() == 0:
        raise TokenizerError(f"{path}: not a SentencePiece model (it has no pieces)")
    return sp


class Tokenizer:
    """A loaded SentencePiece model. ``encode`` adds no bos/eos."""

    chat_template: str | None = None  # an HF folder's chat template (jaxft.interop.hf_tokenizer)

    def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None):
        self._sp = processor
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls(load_processor(path), str(path))

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

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``encode`` and the ``[start, end)`` character span of ``text`` each token covers."""
        try:
            pieces = self._sp.encode(text, return_type="proto").pieces
        except (TypeError, ValueError):  # sentencepiece < 0.2.1
            pieces = self._sp.encode(text, out_type="immutable_proto").pieces
        char_at = list(itertools.accumulate(((b & 0xC0) != 0x80 for b in text.encode("utf-8")), initial=0))
        ids = [p.id for p in pieces] if type(self).encode is Tokenizer.encode else self.encode(text)
        return ids, [(char_at[p.begin], char_at[p.end]) for p in pieces]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of each text, in SentencePiece's own threads."""
        return self._sp.EncodeAsIds(list(texts), num_threads=os.cpu_count() or 1)

    @property
    def fingerprint(self) -> str:
        """A hash of the model: caches of token lengths are keyed by it."""
        import hashlib

        return hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()[:16]

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

    def __getstate__(self) -> dict:  # data worker processes receive the model itself, not a path
        return {"proto": self._sp.serialized_model_proto(), "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=state["proto"])
        self.path = state["path"]


def train_tokenizer(
    texts: Iterable[str],
    out_path: str | Path,
    cfg: TokenizerConfig,
    *,
    user_defined_symbols: Sequence[str] = (),
    setting: str = "data.tokenizer.train_vocab_size",
    corpus: str = "the training data",
) -> Tokenizer:
    """Train a SentencePiece model on ``texts`` and write it to ``out_path``.

    Deterministic: the same texts and config give a byte-identical model (one
    thread, the first ``cfg.max_sentences`` texts in order, no sentence
    sampling or shuffling); runs pass a per-language sample of their training sources
    (``jaxft.data.tokenizer_sample``).  Errors are one-line ``TokenizerError``s naming
    ``setting`` (the vocabulary size's flag or config key) and ``corpus``; an
    error raised while reading ``texts`` propagates unchanged.
    """
    if not cfg.train_vocab_size:
        raise ValueError("data.tokenizer.train_vocab_size must be set to train a tokenizer")
    out_path = as_path(out_path)
    read_error: list[BaseException] = []
    count = [0]

    def sentences():
        try:
            for t in texts:
                t = t.strip()
                if not t:
                    continue
                yield t
                count[0] += 1
                if count[0] >= cfg.max_sentences:
                    return
        except GeneratorExit:
            raise
        except BaseException as e:  # SentencePiece would turn it into a RuntimeError
            read_error.append(e)
            raise

    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(0)
    model = io.BytesIO()
    try:
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
    except RuntimeError as e:
        if read_error:
            raise read_error[0] from None
        raise _training_error(e, cfg, len(user_defined_symbols), count[0], setting, corpus) from None
    makedirs(out_path.parent)
    write_atomic(out_path, model.getvalue())  # a kill mid-write never leaves a cut model
    tok = Tokenizer.load(out_path)
    if tok.vocab_size < cfg.train_vocab_size:
        log.warning(
            "tokenizer %s has %d pieces, fewer than %s=%d (corpus too small)",
            out_path, tok.vocab_size, setting, cfg.train_vocab_size
        )
    return tok


def _training_error(error: RuntimeError, cfg: TokenizerConfig, n_symbols: int, n_sentences: int,
                    setting: str, corpus: str) -> TokenizerError:
    """SentencePiece's training failure as one line naming the setting, the text and why."""
    size = f"{setting}={cfg.train_vocab_size}"
    why = sentencepiece_message(error)
    if n_sentences == 0:
        return TokenizerError(f"{size}: {corpus} has no non-blank line to train a tokenizer on")
    m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", why)
    if m:
        need, special = int(m.group(2)), 4 + n_symbols
        n_bytes = 256 if cfg.byte_fallback else 0
        parts = f"{need - special - n_bytes} distinct characters at character_coverage {cfg.character_coverage:g}" \
                f", plus {special} special" + (f" and {n_bytes} byte-fallback" if n_bytes else "") + " pieces"
        return TokenizerError(f"{size} is too small for {corpus}: SentencePiece needs at least {need} pieces "
                              f"for it ({parts}); raise the vocabulary size or lower the character coverage")
    return TokenizerError(f"{size}: SentencePiece cannot train a tokenizer on {corpus}: {why}")
