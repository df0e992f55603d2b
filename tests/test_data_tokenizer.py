import pytest

from jaxft.config.schema import TokenizerConfig
from jaxft.data.tokenizer import Tokenizer, train_tokenizer

TEXTS = [f"The {a} house number {i} is near the {b} river. Ẹ̀rín àti ayọ̀ {i}." for i in range(300)
         for a, b in [("green", "blue")]] + ["Guten Tag, wie geht es dir heute?"] * 50


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_training_is_deterministic_and_defines_special_ids(tmp_path, model_type):
    cfg = TokenizerConfig(train_vocab_size=400, model_type=model_type)
    a = train_tokenizer(iter(TEXTS), tmp_path / "a.model", cfg)
    b = train_tokenizer(list(TEXTS), tmp_path / "sub" / "b.model", cfg)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "sub" / "b.model").read_bytes()
    assert (a.pad_id, a.id_to_piece(1), a.bos_id, a.eos_id) == (0, "<unk>", 2, 3)
    assert a.vocab_size == b.vocab_size <= 400
    assert a.path == str(tmp_path / "a.model")


def test_byte_fallback_round_trips_unseen_script(tmp_path):
    tok = train_tokenizer(iter(TEXTS), tmp_path / "t.model", TokenizerConfig(train_vocab_size=400))
    text = "Ẹ̀rín 漢字 ᱥᱟᱱᱛᱟᱲᱤ"
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids) and 1 not in ids  # no <unk>: bytes instead
    assert tok.decode(ids) == text


def test_max_sentences_limits_the_training_input(tmp_path):
    cfg = TokenizerConfig(train_vocab_size=300, model_type="bpe", byte_fallback=False, max_sentences=10)
    few = train_tokenizer(iter(TEXTS[:10]), tmp_path / "a.model", cfg)
    more = train_tokenizer(iter(TEXTS[:10] + ["zzzz qqqq xxxx"] * 100), tmp_path / "b.model", cfg)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert few.vocab_size == more.vocab_size


def test_train_needs_a_vocab_size(tmp_path):
    with pytest.raises(ValueError, match="train_vocab_size"):
        train_tokenizer(iter(TEXTS), tmp_path / "t.model", TokenizerConfig())


def test_load_model_without_pad(shared_data):
    tok = Tokenizer.load(shared_data / "tokenizers" / "sp_toy_unigram1000.model")
    assert tok.vocab_size == 1000 and tok.pad_id == 0 and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.decode(tok.encode("I am a cat.")) == "I am a cat."


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.load(tmp_path / "nope.model")
