import numpy as np
import pytest

from jaxft.config.schema import TokenizerConfig
from jaxft.data.sources import Example
from jaxft.data.tasks import Featurizer, OverlongError, pad_row, render, token_counts
from jaxft.data.tokenizer import train_tokenizer

PROMPT = "Translate from {src_name} to {tgt_name}:\n{src}\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"the {w} cat sat on mat number {i} Translate from English to German Yoruba" for i in range(200)
             for w in ("red", "big")]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t.model",
                           TokenizerConfig(train_vocab_size=320, model_type="bpe"))


def _feat(tok, seq_len=64, overlong="skip", **kw):
    return Featurizer(tok, seq_len=seq_len, prompt_template=PROMPT, target_template="{tgt}",
                      overlong=overlong, source="en-de (data.train[0])", **kw)


EX = Example("the red cat", "the big mat", "eng_Latn", "deu_Latn", "translation")


def test_render_translation_prompt_and_other_tasks():
    assert render(EX, PROMPT, "<{tgt}>") == ("Translate from English to German:\nthe red cat\n", "<the big mat>")
    assert render(Example("q", "a", None, None, "prompt"), PROMPT, "{tgt}") == ("q", "a")
    assert render(Example("", "text", None, "yo", "lm"), PROMPT, "{tgt}") == ("", "text")


def test_tokens_inputs_targets_weights(tok):
    out = _feat(tok)(EX)
    prompt = tok.encode("Translate from English to German:\nthe red cat\n")
    target = tok.encode("the big mat")
    tokens = [tok.bos_id] + prompt + target + [tok.eos_id]
    np.testing.assert_array_equal(out["inputs"], tokens[:-1])
    np.testing.assert_array_equal(out["targets"], tokens[1:])
    # weight 1 exactly where the predicted token is a target token or eos
    expected = [0.0] * len(prompt) + [1.0] * (len(target) + 1)
    np.testing.assert_array_equal(out["weights"], expected)
    assert out["inputs"].dtype == np.int32 and out["weights"].dtype == np.float32


def test_lm_weights_everything_but_bos(tok):
    out = _feat(tok)(Example("", "the red cat", None, "en", "lm"))
    assert out["inputs"][0] == tok.bos_id and out["weights"].tolist() == [1.0] * len(out["inputs"])


def test_overlong_skip_is_counted(tok):
    f = _feat(tok, seq_len=8)
    assert f(EX) is None and f.stats.overlong_skipped == 1 and f.stats.examples == 0


def test_overlong_error_names_source_and_lengths(tok):
    with pytest.raises(OverlongError, match=r"'en-de \(data.train\[0\]\)': example of \d+ tokens > data.seq_len=8"):
        _feat(tok, seq_len=8, overlong="error")(EX)


def test_overlong_truncate_cuts_prompt_first(tok):
    full_tokens, full_mask = _feat(tok).tokens(EX)
    n_target = sum(full_mask)  # target + eos
    seq_len = n_target + 2  # tokens = seq_len + 1: room for bos + 2 prompt tokens
    f = _feat(tok, seq_len=seq_len, overlong="truncate")
    tokens, mask = f.tokens(EX)
    assert len(tokens) - 1 == seq_len and f.stats.truncated == 1
    assert tokens[:3] == full_tokens[:3]  # bos + start of the prompt (the instruction)
    assert tokens[3:] == full_tokens[-n_target:] and sum(mask) == n_target  # whole target + eos


def test_overlong_truncate_keeps_a_target_token_without_eos(tok):
    f = _feat(tok, seq_len=2, overlong="truncate")
    out = f(EX)
    target = tok.encode("the big mat")
    assert out["inputs"].tolist() == [tok.bos_id, target[0]]
    assert out["targets"].tolist() == target[:2] and out["weights"].tolist() == [1.0, 1.0]


def test_pad_row(tok):
    row = pad_row(_feat(tok)(EX), 64)
    n = int((row["segment_ids"] > 0).sum())
    assert row["positions"][:n].tolist() == list(range(n)) and not row["positions"][n:].any()
    assert not row["inputs"][n:].any() and not row["weights"][n:].any()


def test_bad_settings(tok):
    with pytest.raises(ValueError, match="data.overlong"):
        _feat(tok, overlong="drop")
    with pytest.raises(ValueError, match="seq_len"):
        _feat(tok, seq_len=1)


class _Batching:
    """A tokenizer with ``encode_batch`` (used by ``token_counts`` when present)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0
        self.bos_id, self.eos_id, self.path = tok.bos_id, tok.eos_id, tok.path

    def encode(self, text):
        raise AssertionError("encode_batch should be used")

    def encode_batch(self, texts):
        self.calls += 1
        return [self.tok.encode(t) for t in texts]


def test_lengths_agree_with_tokens(tok):
    examples = [EX, Example("q red", "a", None, None, "prompt"), Example("", "the red cat", None, "en", "lm"),
                Example("the red cat " * 9, "the big mat " * 7, "eng_Latn", "deu_Latn", "translation")]
    f = _feat(tok, seq_len=512)
    expected = [len(f.tokens(ex)[0]) - 1 for ex in examples]
    assert f.lengths(examples).tolist() == [[n] for n in expected] and f.limits == (512,)
    batching = _Batching(tok)
    assert _feat(batching, seq_len=512).lengths(examples).tolist() == [[n] for n in expected]
    assert batching.calls == 2  # prompts, then targets; "" is never sent
    assert token_counts(tok, []).shape == (0,)
    assert token_counts(tok, ["", "the"]).tolist() == [0, len(tok.encode("the"))]
    assert _feat(tok, seq_len=8).describe([30]) == "example of 30 tokens > data.seq_len=8"
