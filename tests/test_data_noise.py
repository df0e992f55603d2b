import collections
import random

import numpy as np
import pytest

from jaxft.config.schema import DataConfig, SourceConfig, TokenizerConfig
from jaxft.data import noise
from jaxft.data.readers import DataError, Example
from jaxft.data.seq2seq import Seq2SeqFeaturizer
from jaxft.data.tokenizer import train_tokenizer

WORDS = "the a cat dog house runs blue green quick slow river Haus Katze blau".split()
SENTINELS = [f"<extra_id_{i}>" for i in range(10)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=8)) + "." for _ in range(300)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t.model",
                           TokenizerConfig(train_vocab_size=400, model_type="bpe"),
                           user_defined_symbols=["<mask>", *SENTINELS])


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=8)) for _ in range(300)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("plain") / "t.model",
                           TokenizerConfig(train_vocab_size=350, model_type="bpe"))


def _runs(mask):
    """Lengths of the True runs of a boolean array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def test_span_corruption_noise_statistics():
    rng = np.random.default_rng(0)
    total = noise_tokens = 0
    spans = []
    for _ in range(3000):
        n = int(rng.integers(20, 400))
        mask = noise.random_spans_noise_mask(n, 0.15, 3.0, rng)
        assert mask.shape == (n,) and not mask[0] and mask[-1]  # T5: starts non-noise, ends noise
        assert mask.sum() == min(max(round(0.15 * n), 1), n - 1)
        total, noise_tokens = total + n, noise_tokens + mask.sum()
        spans.extend(_runs(mask))
    assert abs(noise_tokens / total - 0.15) < 0.01
    assert abs(np.mean(spans) - 3.0) < 0.2
    assert not noise.random_spans_noise_mask(1, 0.15, 3.0, rng).any()


def test_span_corruption_reconstructs_and_uses_sentinels_in_order():
    rng = np.random.default_rng(1)
    sentinels = list(range(1000, 900, -1))
    for _ in range(200):
        tokens = rng.integers(5, 500, size=int(rng.integers(2, 120))).tolist()
        mask = noise.random_spans_noise_mask(len(tokens), 0.15, 3.0, rng)
        src, tgt = noise.span_corruption(tokens, mask, sentinels)
        k = len(_runs(mask))
        assert [t for t in src if t > 900] == sentinels[:k] == [t for t in tgt if t > 900]
        assert len(src) == len(tokens) - mask.sum() + k and len(tgt) == mask.sum() + k
        assert noise.merge_span_corruption(src, tgt, sentinels) == tokens
    with pytest.raises(DataError, match="more than 2 sentinel"):
        noise.span_corruption(list(range(10)), np.array([0, 1, 0, 1, 0, 1] + [0] * 4, bool), [99, 98])


def test_sentinel_ids_from_pieces_or_t5_layout(tok, plain_tok):
    assert noise.sentinel_ids(tok) == [tok.piece_id(p) for p in SENTINELS] == list(range(5, 15))
    ids = noise.sentinel_ids(plain_tok)
    assert len(ids) == 100 and ids[0] == plain_tok.vocab_size + 99 and ids[-1] == plain_tok.vocab_size


def _cfg(**kw):
    return DataConfig(**{"seq_len": 128, "seed": 3, **kw})


def test_span_corruption_featurizer_round_trip_and_determinism(tok):
    src_cfg = SourceConfig(type="text", task="span_corruption", path="x", tgt_lang="de", name="mono")
    f = Seq2SeqFeaturizer(tok, _cfg(lang_tokens="lang_code"), src_cfg, decoder_start_id=0)
    sentinels = noise.sentinel_ids(tok)
    rng = random.Random(2)
    for index in range(50):
        text = " ".join(rng.choices(WORDS, k=rng.randint(3, 25)))
        out = f(Example("", text, None, "de", "span_corruption"), index)
        src, tgt = out["enc_inputs"].tolist(), out["targets"].tolist()
        assert src[-1] == tgt[-1] == tok.eos_id and tgt[0] == sentinels[0]  # no language tokens
        assert noise.merge_span_corruption(src[:-1], tgt[:-1], sentinels) == tok.encode(text)
        assert out["inputs"].tolist() == [0] + tgt[:-1] and out["weights"].tolist() == [1.0] * len(tgt)
        again = f(Example("", text, None, "de", "span_corruption"), index)
        assert all(np.array_equal(out[k], again[k]) for k in out)
    text = " ".join(WORDS * 7)  # ~100 tokens: 15 noise tokens in 5 spans
    outs = {tuple(f(Example("", text, None, "de", "span_corruption"), i)["enc_inputs"]) for i in range(10)}
    assert len(outs) > 5  # the index seeds the noise


def test_infilling_statistics():
    rng = np.random.default_rng(0)
    total = masked = 0
    lengths = []
    for _ in range(3000):
        n = int(rng.integers(20, 400))
        spans = noise.infilling_spans(n, 0.35, 3.5, rng)
        assert sum(k for _, k in spans) == round(0.35 * n)
        ends = [s + k for s, k in spans]
        assert all(e < s for e, (s, _) in zip(ends, spans[1:])) and ends[-1] <= n  # ordered, apart
        assert all(k >= 1 for _, k in spans)
        total, masked = total + n, masked + sum(k for _, k in spans)
        lengths.extend(k for _, k in spans)
    assert abs(masked / total - 0.35) < 0.03
    # draws of 0 are discarded: zero-truncated Poisson mean; the last span of each
    # text is cut short, which lowers the mean a little for short texts
    zt_mean = 3.5 / (1 - np.exp(-3.5))
    assert zt_mean - 0.3 < np.mean(lengths) < zt_mean
    long = [k for _ in range(20) for _, k in noise.infilling_spans(20000, 0.35, 3.5, rng)]
    assert abs(np.mean(long) - zt_mean) < 0.05
    counts = collections.Counter(long)
    assert 0 not in counts and abs(counts[1] / len(long) - 3.5 * np.exp(-3.5) / (1 - np.exp(-3.5))) < 0.01


def test_text_infilling():
    assert noise.text_infilling([1, 2, 3, 4, 5, 6], [(1, 2), (4, 1)], 99) == [1, 99, 4, 99, 6]
    assert noise.text_infilling([1, 2], [], 99) == [1, 2]


@pytest.mark.parametrize("text", [
    "One two. Three four? Five six! Seven eight.",
    "我很好。你好吗？再见。谢谢！",
    "यह एक है। यह दो है। यह तीन है।",
    "هل أنت بخير؟ نعم أنا بخير. شكرا؟",
    "Version 3.5 is out. It is good!",
])
def test_sentence_permutation_is_a_permutation(text):
    sentences = noise.split_sentences(text)
    assert len(sentences) >= 2
    seen = set()
    for seed in range(30):
        permuted = noise.permute_sentences(text, np.random.default_rng(seed))
        assert sorted(noise.split_sentences(permuted)) == sorted(sentences)
        seen.add(permuted)
    assert len(seen) > 1
    assert noise.split_sentences("Version 3.5 is out. It is good") == ["Version 3.5 is out.", "It is good"]
    assert noise.permute_sentences("no sentence end", np.random.default_rng(0)) == "no sentence end"


def test_infilling_featurizer(tok):
    src_cfg = SourceConfig(type="text", task="infilling", path="x", tgt_lang="de", name="mono")
    f = Seq2SeqFeaturizer(tok, _cfg(), src_cfg, decoder_start_id=3)
    mask = tok.piece_id("<mask>")
    text = "the cat runs. a dog runs. the house is blue. Katze blau."
    out = f(Example("", text, None, "de", "infilling"), 0)
    assert out["targets"].tolist() == tok.encode(text) + [tok.eos_id]
    src = out["enc_inputs"].tolist()
    assert src[-1] == tok.eos_id and mask in src and len(src) < len(out["targets"])
    assert out["inputs"].tolist() == [3] + out["targets"].tolist()[:-1]


def test_infilling_needs_a_mask_piece(plain_tok):
    src_cfg = SourceConfig(type="text", task="infilling", path="x", tgt_lang="de", name="mono")
    with pytest.raises(DataError, match="'<mask>'.*extend_tokenizer"):
        Seq2SeqFeaturizer(plain_tok, _cfg(), src_cfg, decoder_start_id=3)


def test_noise_truncation_keeps_both_sides_within_lengths(tok):
    for task in ("span_corruption", "infilling"):
        src_cfg = SourceConfig(type="text", task=task, path="x", tgt_lang="de", name="mono")
        f = Seq2SeqFeaturizer(tok, _cfg(seq_len=12, encoder_seq_len=10, overlong="truncate"), src_cfg,
                              decoder_start_id=0)
        text = " ".join(WORDS * 3)
        out = f(Example("", text, None, "de", task), 7)
        assert len(out["enc_inputs"]) <= 10 and len(out["targets"]) <= 12
        assert out["enc_inputs"][-1] == out["targets"][-1] == tok.eos_id and f.stats.truncated == 1
        skip = Seq2SeqFeaturizer(tok, _cfg(seq_len=12, encoder_seq_len=10), src_cfg, decoder_start_id=0)
        assert skip(Example("", text, None, "de", task), 7) is None and skip.stats.overlong_skipped == 1
