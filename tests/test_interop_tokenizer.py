"""Tokenizers from HF folders: SentencePiece assets -> our Tokenizer; tokenizer.json -> HFJsonTokenizer."""

import shutil
import unicodedata

import pytest
import sentencepiece as spm

from jaxft.config.schema import TokenizerConfig
from jaxft.data.tokenizer import Tokenizer, train_tokenizer
from jaxft.interop import HFJsonTokenizer, load_hf_tokenizer
from jaxft.interop.hf_tokenizer import copy_tokenizer, special_token_ids

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

LANGS = ("deu_Latn", "fra_Latn", "ben_Beng", "rus_Cyrl", "zho_Hans", "arb_Arab", "hin_Deva", "swh_Latn")


def _lines(shared_data, lo, hi):
    files = sorted((shared_data / "flores200" / "dev").glob("*.dev"))
    files = [f for f in files if f.stem in LANGS] or files[:6]
    if not files:
        pytest.skip("no flores200 dev files")
    out = []
    for f in files:
        out += [l.strip() for l in f.read_text(encoding="utf-8").splitlines()[lo:hi] if l.strip()]
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")  # shared by the tests: the tokenizer is trained once


@pytest.fixture
def tokenizer_dirs(shared_data, hf_dirs):
    """(sp_dir: tokenizer.model + tokenizer_config.json, json_dir: tokenizer.json only, sp_path, lines)."""
    sp_dir, json_dir = hf_dirs / "sp", hf_dirs / "json"
    sp_path = hf_dirs / "sp.model"
    if not sp_path.exists():
        train_tokenizer(_lines(shared_data, 0, 80), sp_path, TokenizerConfig(train_vocab_size=3000, model_type="bpe"))
        sp_dir.mkdir()
        copy_tokenizer(sp_path, sp_dir, model_type="llama", max_length=512)
        hf_tok = transformers.AutoTokenizer.from_pretrained(sp_dir)
        assert type(hf_tok).__name__ == "LlamaTokenizer"
        hf_tok.save_pretrained(json_dir)
        assert not list(json_dir.glob("*.model"))
    return sp_dir, json_dir, sp_path, _lines(shared_data, 100, 115)


def test_sentencepiece_folder_gives_our_tokenizer(tokenizer_dirs):
    sp_dir, _, sp_path, lines = tokenizer_dirs
    tok = load_hf_tokenizer(sp_dir)
    assert isinstance(tok, Tokenizer)
    ref = spm.SentencePieceProcessor(model_file=str(sp_path))
    for line in lines:
        assert tok.encode(line) == ref.EncodeAsIds(line)
    hf_tok = transformers.AutoTokenizer.from_pretrained(sp_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (
        hf_tok.bos_token_id, hf_tok.eos_token_id, 0, len(hf_tok))
    # spiece.model (T5) and sentencepiece.bpe.model (mBART) are found too
    for name in ("spiece.model", "sentencepiece.bpe.model"):
        other = sp_dir.parent / name.replace(".", "_")
        other.mkdir(exist_ok=True)
        shutil.copyfile(sp_path, other / name)
        assert load_hf_tokenizer(other).encode(lines[0]) == tok.encode(lines[0])


def test_tokenizer_json_adapter_matches_transformers(tokenizer_dirs):
    _, json_dir, _, lines = tokenizer_dirs
    tok = load_hf_tokenizer(json_dir)
    assert isinstance(tok, HFJsonTokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(json_dir)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (hf_tok.bos_token_id, hf_tok.eos_token_id, len(hf_tok))
    assert tok.pad_id == (hf_tok.pad_token_id or 0)
    for line in lines:
        ids = tok.encode(line)
        assert ids == hf_tok.encode(line, add_special_tokens=False)
        assert tok.decode(ids + [tok.eos_id]) == hf_tok.decode(ids, skip_special_tokens=True)


def test_sentencepiece_vs_converted_fast_tokenizer(tokenizer_dirs):
    """HF's converted (fast) tokenizer skips SentencePiece's NFKC normaliser and ranks BPE
    merges its own way: on NFKC, space-collapsed text most lines agree, and both round-trip exactly."""
    sp_dir, json_dir, _, lines = tokenizer_dirs
    ours, theirs = load_hf_tokenizer(sp_dir), load_hf_tokenizer(json_dir)
    lines = [" ".join(unicodedata.normalize("NFKC", line).split()) for line in lines]  # SP collapses spaces
    same = sum(ours.encode(line) == theirs.encode(line) for line in lines)
    assert same >= 0.75 * len(lines), f"{same}/{len(lines)}"
    for line in lines:
        assert ours.decode(ours.encode(line)) == line
        assert theirs.decode(theirs.encode(line)) == line


def test_special_token_ids(tokenizer_dirs):
    sp_dir, json_dir, sp_path, _ = tokenizer_dirs
    expected = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}  # train_tokenizer's ids
    assert special_token_ids(sp_path) == expected
    assert special_token_ids(sp_dir) == expected
    assert {k: v for k, v in special_token_ids(json_dir).items() if k != "pad_token_id"} == {
        "bos_token_id": 2, "eos_token_id": 3}


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_hf_tokenizer(tmp_path)
