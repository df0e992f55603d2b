"""The tokenizer side of vocabulary adaptation, shared by `jaxft vocab` and training.

`plain_proto(path)`: a tokenizer's SentencePiece ModelProto whose ids are the model's ids (a T5
`spiece.model` gets its 100 `<extra_id_k>` sentinels appended, at T5's ids), the form every
vocabulary edit starts from.

`data.tokenizer.extend: true` (`run_extension`): the pieces the data config needs (`<2xx>` tags,
language codes, sentinels, `<mask>`) plus `data.tokenizer.user_defined_symbols` that the configured
tokenizer lacks are appended (USER_DEFINED) to a copy written to `<run_dir>/tokenizer.model`.  The
copy is a pure function of the config, so every process builds it in memory and a resumed run
rebuilds the same one; `grow_for_extension` gives `model.init_from`'s parameters the rows of the
added pieces (the mean of the base tokenizer's rows).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import sentencepiece as spm
from flax import nnx
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from jaxft.config.schema import DataConfig
from jaxft.data.tokenizer import Tokenizer
from jaxft.data.vocab import add_pieces, read_proto, required_pieces, t5_sentinel_pieces
from jaxft.models.embedding_resize import remap_vocab, vocab_size_of
from jaxft.paths import local_copy

log = logging.getLogger(__name__)


def sentencepiece_file(path: str | Path, what: str = "tokenizer") -> Path:
    """The SentencePiece model of a `.model` file or a tokenizer / HF folder."""
    from jaxft.interop.hf_tokenizer import find_sentencepiece

    path = local_copy(str(path).removeprefix("hf:"))  # a URL: a local copy of the file or folder
    found = path if path.is_file() else find_sentencepiece(path) if path.is_dir() else None
    if found is None:
        raise ValueError(f"{what}: {path} has no SentencePiece model (tokenizer.model, spiece.model or "
                         "sentencepiece.bpe.model); only SentencePiece vocabularies can be edited")
    return found


def plain_proto(path: str | Path, what: str = "tokenizer") -> sp_pb2.ModelProto:
    """The ModelProto of the tokenizer at `path` with SentencePiece ids == the model's ids."""
    from jaxft.interop.sp_adapters import FairseqSentencePieceTokenizer, T5SentencePieceTokenizer, load_sentencepiece

    sp_file = sentencepiece_file(path, what)
    tok = load_sentencepiece(sp_file)
    proto = read_proto(sp_file)
    if isinstance(tok, FairseqSentencePieceTokenizer):
        raise ValueError(f"{what}: {sp_file} is a fairseq-layout (mBART / NLLB) tokenizer, whose ids are not its "
                         "SentencePiece ids; editing its vocabulary is not supported")
    if isinstance(tok, T5SentencePieceTokenizer) and tok.extra_ids:
        add_pieces(proto, t5_sentinel_pieces(tok.extra_ids))
    return proto


def tokenizer_of(proto: sp_pb2.ModelProto, path: str | Path | None = None) -> Tokenizer:
    """A Tokenizer over an in-memory ModelProto (`path`: what it reports as its file)."""
    return Tokenizer(spm.SentencePieceProcessor(model_proto=proto.SerializeToString()),
                     None if path is None else str(path))


@dataclasses.dataclass(frozen=True)
class Extension:
    base_size: int  # pieces of the configured tokenizer
    added: tuple[str, ...]  # appended, ids base_size, base_size + 1, ...
    proto: sp_pb2.ModelProto


def run_extension(cfg: DataConfig, base_dir: Path, configured: Tokenizer) -> Extension:
    """`data.tokenizer.extend`: the configured tokenizer plus the pieces the data needs."""
    if not configured.path:
        raise ValueError("data.tokenizer.extend: the configured tokenizer has no file to extend")
    proto = plain_proto(configured.path, "data.tokenizer.path")
    base = len(proto.pieces)
    wanted = list(dict.fromkeys(required_pieces(cfg, base_dir) + list(cfg.tokenizer.user_defined_symbols)))
    added = add_pieces(proto, wanted)
    return Extension(base, tuple(added), proto)


def extended_tokenizer(cfg: DataConfig, run_dir: Path, base_dir: Path, configured: Tokenizer) -> Tokenizer:
    """The tokenizer a run with `data.tokenizer.extend: true` uses: `configured` when it has every
    piece the data needs, else the extension (written to `<run_dir>/tokenizer.model`)."""
    from jaxft.runs.layout import RunDir

    ext = run_extension(cfg, base_dir, configured)
    if not ext.added:
        return configured
    log.info("data.tokenizer.extend: %d pieces added to %s (%s) -> %s", len(ext.added), configured.path,
             " ".join(ext.added[:10]) + (" ..." if len(ext.added) > 10 else ""), RunDir(run_dir).tokenizer)
    return write_extension(ext, RunDir(run_dir).tokenizer)


def write_extension(ext: Extension, path: Path) -> Tokenizer:
    """The extended tokenizer, written to `path` (a run dir's tokenizer.model) atomically; a
    different file already there (the run was started with another tokenizer) is an error."""
    data = ext.proto.SerializeToString()
    if path.is_file() and path.read_bytes() != data:
        raise ValueError(f"data.tokenizer.extend: {path} is not data.tokenizer.path plus the pieces the data "
                         "needs (was the run started with another tokenizer or data?); use a new run_dir")
    if not path.is_file():
        from jaxft.outputs import is_main_process

        if is_main_process():
            from jaxft.paths import write_atomic

            write_atomic(path, data)  # a URL: one object write
    return tokenizer_of(ext.proto, path)


def grow_for_extension(state: nnx.State, ext: Extension, vocab_size: int) -> nnx.State:
    """`state` (model.init_from's parameters, any vocabulary size) with `vocab_size` rows: the rows of
    the base pieces kept, the added pieces' rows the mean of the base rows, other rows kept where the
    source has them (padding) and the same mean where it does not."""
    src = vocab_size_of(state)
    new = ext.base_size + len(ext.added)
    index = np.arange(vocab_size)
    index[(index >= ext.base_size) & (index < new)] = -1
    index[index >= src] = -1
    return remap_vocab(state, index, init="mean", fill_rows=min(ext.base_size, src))
