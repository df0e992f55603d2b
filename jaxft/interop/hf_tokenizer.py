"""Tokenizers from HF folders, and tokenizer files alongside exported checkpoints.

``load_hf_tokenizer(dir)`` returns our SentencePiece ``Tokenizer`` when the
folder has a SentencePiece model (``tokenizer.model``, ``spiece.model``,
``sentencepiece.bpe.model``; with HF's ids for the last two: T5's sentinels,
fairseq's offset and language codes, see ``jaxft.interop.sp_adapters``), else an ``HFJsonTokenizer`` over ``tokenizer.json``
(the ``tokenizers`` library, imported lazily) with the same interface:
``encode`` (no bos/eos), ``decode`` (special tokens dropped), ``bos_id``,
``eos_id``, ``pad_id`` (0 when the tokenizer defines none, as ours), ``vocab_size``.

Note: HF's fast tokenizers converted from a SentencePiece model skip its
normalizer (NFKC by default), so on text that is not NFKC-normalised the two
can tokenise differently; the SentencePiece model, when present, is what
jaxft uses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from jaxft.config.errors import FileFormatError, read_json
from jaxft.data.tokenizer import Tokenizer, load_processor
from jaxft.interop.sp_adapters import load_sentencepiece

SENTENCEPIECE_NAMES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", *SENTENCEPIECE_NAMES)


def find_sentencepiece(directory: str | Path) -> Path | None:
    return next((Path(directory) / n for n in SENTENCEPIECE_NAMES if (Path(directory) / n).is_file()), None)


def _token_content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _special_tokens(directory: Path) -> dict[str, str]:
    """``{"bos": "<s>", ...}`` from tokenizer_config.json, then special_tokens_map.json."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins
        path = directory / name
        if path.is_file():
            data = read_json(path, name)
            for kind in ("bos", "eos", "pad", "unk"):
                token = _token_content(data.get(f"{kind}_token"))
                if token is not None:
                    out[kind] = token
    return out


def read_chat_template(directory: str | Path) -> str | None:
    """The chat template of an HF tokenizer folder: ``chat_template.jinja`` (transformers >= 4.43
    writes it), else ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named
    templates: the one named ``default``); None when it has none."""
    directory = Path(directory)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    template = read_json(config, config.name).get("chat_template") if config.is_file() else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) and template else None


class HFJsonTokenizer:
    """A ``tokenizer.json`` behind the interface of ``jaxft.data.tokenizer.Tokenizer``."""

    chat_template: str | None = None  # set by ``load_hf_tokenizer``

    def __init__(self, tokenizer: Any, *, bos: int | None, eos: int | None, pad: int | None, path: str | None):
        self._tok, self._bos, self._eos, self._pad, self.path = tokenizer, bos, eos, pad, path

    @classmethod
    def load(cls, directory: str | Path) -> HFJsonTokenizer:
        try:
            from tokenizers import Tokenizer as JsonTokenizer
        except ImportError:
            raise ImportError("reading tokenizer.json needs the `tokenizers` package (pip install tokenizers)") \
                from None
        directory = Path(directory)
        path = directory / "tokenizer.json" if directory.is_dir() else directory
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file")
        try:
            tok = JsonTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileFormatError(f"{path}: not a valid tokenizer.json ({why})") from None
        ids = {k: tok.token_to_id(v) for k, v in _special_tokens(path.parent).items()}
        config = path.parent / "config.json"
        if config.is_file():  # model config as the fallback for token ids
            hf = read_json(config, "config.json")
            for kind in ("bos", "eos", "pad"):
                if ids.get(kind) is None and isinstance(hf.get(f"{kind}_token_id"), int):
                    ids[kind] = hf[f"{kind}_token_id"]
        return cls(tok, bos=ids.get("bos"), eos=ids.get("eos"), pad=ids.get("pad"), path=str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def pad_id(self) -> int:
        return 0 if self._pad is None else self._pad

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``encode`` and the ``[start, end)`` character span of ``text`` each token covers."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [(int(a), int(b)) for a, b in enc.offsets]

    @property
    def fingerprint(self) -> str:
        """A hash of the tokenizer (vocabulary, model, specials): caches of token lengths are keyed by it."""
        import hashlib

        specials = f"{self._bos},{self._eos},{self._pad}"
        return hashlib.sha256((self._tok.to_str() + specials).encode()).hexdigest()[:16]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of each text, in the tokenizers library's threads."""
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def __repr__(self) -> str:
        return f"HFJsonTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def load_hf_tokenizer(path: str | Path) -> Tokenizer | HFJsonTokenizer:
    """The tokenizer of an HF folder (or a ``.model`` / ``tokenizer.json`` file), with the
    folder's chat template (``read_chat_template``) as its ``chat_template``."""
    tok = _load_hf_tokenizer(Path(path))
    tok.chat_template = read_chat_template(Path(path) if Path(path).is_dir() else Path(path).parent)
    return tok


def _load_hf_tokenizer(path: Path) -> Tokenizer | HFJsonTokenizer:
    if path.is_file():
        return HFJsonTokenizer.load(path) if path.suffix == ".json" else load_sentencepiece(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such tokenizer folder or file")
    sp = find_sentencepiece(path)
    if sp is not None:
        return load_sentencepiece(sp)
    if (path / "tokenizer.json").is_file():
        return HFJsonTokenizer.load(path)
    raise FileNotFoundError(f"{path}: no tokenizer ({', '.join(SENTENCEPIECE_NAMES)} or tokenizer.json)")


def _sentencepiece(path: Path):
    return load_processor(path)


def _sp_special_pieces(sp) -> dict[str, tuple[int, str]]:
    """``{"bos": (id, piece), ...}`` for the special pieces the model defines."""
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    return {k: (i, sp.IdToPiece(i)) for k, i in ids.items() if i >= 0}


def special_token_ids(path: str | Path) -> dict[str, int]:
    """``{"bos_token_id": .., "eos_token_id": .., "pad_token_id": ..}`` (those defined) for config.json."""
    path = Path(path)
    sp_path = path if path.is_file() and path.suffix != ".json" else (
        find_sentencepiece(path) if path.is_dir() else None)
    if sp_path is not None:
        tok = load_sentencepiece(sp_path)
        found = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok._sp.pad_id() if type(tok) is Tokenizer
                 else tok.pad_id}
        found = {k: (None if i is None or i < 0 else i) for k, i in found.items()}
    else:
        tok = HFJsonTokenizer.load(path)
        found = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok._pad}
    return {f"{k}_token_id": found[k] for k in ("bos", "eos", "pad") if found.get(k) is not None}


# model_type -> (SentencePiece file name, tokenizer_class) for the encoder-decoder families.
_ENCDEC_SP = {"t5": ("spiece.model", "T5Tokenizer"), "mt5": ("spiece.model", "T5Tokenizer"),
              "umt5": ("spiece.model", "T5Tokenizer"), "mbart": ("sentencepiece.bpe.model", "MBart50Tokenizer"),
              "m2m_100": ("sentencepiece.bpe.model", "NllbTokenizer")}


def _sentencepiece_tokenizer_config(sp_path: Path, model_type: str, max_length: int) -> dict:
    if model_type in _ENCDEC_SP:
        config = {"tokenizer_class": _ENCDEC_SP[model_type][1], "model_max_length": max_length}
        return {**config, "extra_ids": 100} if config["tokenizer_class"] == "T5Tokenizer" else config
    pieces = {f"{k}_token": piece for k, (_, piece) in _sp_special_pieces(_sentencepiece(sp_path)).items()}
    cls = "GemmaTokenizer" if model_type.startswith("gemma") else "LlamaTokenizer"
    return {"tokenizer_class": cls, "model_max_length": max_length, **pieces}


def copy_tokenizer(src: str | Path, out_dir: str | Path, *, model_type: str, max_length: int) -> None:
    """Copy tokenizer files next to an exported checkpoint; a SentencePiece model goes
    to ``tokenizer.model`` (``spiece.model`` for T5-style, ``sentencepiece.bpe.model`` for
    mBART/NLLB; plus a minimal ``tokenizer_config.json`` when none exists)."""
    src, out_dir = Path(src), Path(out_dir)
    sp_name = _ENCDEC_SP.get(model_type, ("tokenizer.model",))[0]
    if src.is_file():
        if src.suffix == ".json":
            shutil.copyfile(src, out_dir / "tokenizer.json")
        else:
            shutil.copyfile(src, out_dir / sp_name)
    elif src.is_dir():
        for name in TOKENIZER_FILES:  # the SentencePiece model goes under one name, sp_name
            if (src / name).is_file() and name not in SENTENCEPIECE_NAMES:
                shutil.copyfile(src / name, out_dir / name)
        sp = (src / sp_name) if (src / sp_name).is_file() else find_sentencepiece(src)
        if sp is not None:
            shutil.copyfile(sp, out_dir / sp_name)
    else:
        raise FileNotFoundError(f"tokenizer_path: {src} does not exist")
    if (out_dir / sp_name).is_file() and not (out_dir / "tokenizer_config.json").is_file():
        config = _sentencepiece_tokenizer_config(out_dir / sp_name, model_type, max_length)
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
