import json
import random

import numpy as np
import pytest

from jaxft.config.schema import DataConfig, SourceConfig, TokenizerConfig
from jaxft.data import noise
from jaxft.data.langcodes import MBART50, flores_code, mbart50_code
from jaxft.data.pipeline import build_dev_batches, build_train_pipeline, read_directions
from jaxft.data.readers import DataError, Example
from jaxft.data.seq2seq import ROW_KEYS, Seq2SeqFeaturizer
from jaxft.data.tasks import OverlongError
from jaxft.data.tokenizer import train_tokenizer

WORDS = "the a cat dog house runs blue green quick slow river Haus Katze blau ilé ajá".split()
SYMBOLS = ["<2de>", "de_DE", "en_XX", "eng_Latn", "deu_Latn", "<mask>"] + [f"<extra_id_{i}>" for i in range(10)]
ENC, DEC = ("enc_inputs", "enc_segment_ids", "enc_positions"), ("inputs", "targets", "weights",
                                                               "segment_ids", "positions")


def _sentence(rng):
    return " ".join(rng.choices(WORDS, k=rng.randint(1, 10)))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(1)
    return train_tokenizer([_sentence(rng) for _ in range(500)], tmp_path_factory.mktemp("tok") / "t.model",
                           TokenizerConfig(train_vocab_size=400, model_type="bpe"),
                           user_defined_symbols=SYMBOLS)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    rows = "".join(f"{_sentence(rng)}\t{_sentence(rng)}\n" for _ in range(120))
    (d / "train.en-de.tsv").write_text("src\ttgt\n" + rows)
    (d / "dev.en-de.tsv").write_text("src\ttgt\n" + rows)
    (d / "mono.de.txt").write_text("".join(_sentence(rng) + ". " + _sentence(rng) + ".\n" for _ in range(60)))
    return d


# ---------------------------------------------------------------- conventions

EX = Example("the cat", "die Katze", "en", "de", "translation")
SRC = SourceConfig(type="tsv", path="x", src_lang="en", tgt_lang="de", name="en-de")


def _feat(tok, start=0, src=SRC, **kw):
    return Seq2SeqFeaturizer(tok, DataConfig(seq_len=32, **kw), src, decoder_start_id=start, key="data.train[0]")


def test_user_symbols_have_fixed_ids(tok):
    assert [tok.piece_id(p) for p in SYMBOLS] == list(range(4, 4 + len(SYMBOLS)))  # after pad unk bos eos


@pytest.mark.parametrize("mode,style,src_prefix,tgt_prefix", [
    ("none", "flores", [], []),
    ("t5_tag", "flores", [4], []),  # <2de>
    ("lang_code", "mbart50", [6], [5]),  # en_XX ... / de_DE ...
    ("lang_code", "flores", [7], [8]),  # eng_Latn ... / deu_Latn ...
])
def test_lang_token_conventions(tok, mode, style, src_prefix, tgt_prefix):
    start = 3 if mode == "lang_code" else 0  # mBART/NLLB start with eos; T5 with pad
    out = _feat(tok, start, lang_tokens=mode, lang_code_style=style)(EX)
    eos = tok.eos_id
    src = src_prefix + tok.encode("the cat") + [eos]
    tgt = tgt_prefix + tok.encode("die Katze") + [eos]
    assert out["enc_inputs"].tolist() == src
    assert out["targets"].tolist() == tgt
    assert out["inputs"].tolist() == [start] + tgt[:-1]
    assert out["weights"].tolist() == [1.0] * len(tgt)  # the language code is trained on, as in HF
    assert {k: v.dtype for k, v in out.items()} == {"enc_inputs": np.int32, "inputs": np.int32,
                                                     "targets": np.int32, "weights": np.float32}


def test_prompt_task_has_no_language_tokens(tok):
    src = SourceConfig(type="jsonl", task="prompt", path="x", name="xp3")
    out = _feat(tok, 0, src=src, lang_tokens="t5_tag")(Example("the cat", "blau", None, None, "prompt"))
    assert out["enc_inputs"].tolist() == tok.encode("the cat") + [tok.eos_id]
    assert out["targets"].tolist() == tok.encode("blau") + [tok.eos_id]


def test_infilling_gets_the_language_code_on_both_sides(tok):
    src = SourceConfig(type="text", task="infilling", path="x", tgt_lang="de", name="mono")
    out = _feat(tok, 3, src=src, lang_tokens="lang_code", lang_code_style="mbart50")(
        Example("", "the cat runs. a dog.", None, "de", "infilling"), 4)
    assert out["enc_inputs"][0] == out["targets"][0] == 5  # de_DE
    assert out["targets"].tolist()[1:] == tok.encode("the cat runs. a dog.") + [tok.eos_id]


def test_missing_language_pieces_are_named(tok):
    yo = SourceConfig(type="tsv", path="x", src_lang="en", tgt_lang="yo", name="en-yo")
    with pytest.raises(DataError, match=r"data.lang_tokens: t5_tag.*'<2yo>'.*data.train\[0\].*extend_tokenizer"):
        _feat(tok, src=yo, lang_tokens="t5_tag")
    with pytest.raises(DataError, match="'yor_Latn' is not a piece"):
        _feat(tok, src=yo, lang_tokens="lang_code")
    with pytest.raises(DataError, match="'yo' has no mBART-50 language token"):
        _feat(tok, src=yo, lang_tokens="lang_code", lang_code_style="mbart50")
    with pytest.raises(DataError, match="not an encoder-decoder task"):
        _feat(tok, src=SourceConfig(type="text", task="lm", path="x", name="m"))


def test_language_code_tables():
    assert len(MBART50) == 52 and len(set(MBART50)) == 52
    cases = {"de": ("deu_Latn", "de_DE"), "eng": ("eng_Latn", "en_XX"), "ar": ("arb_Arab", "ar_AR"),
             "ja": ("jpn_Jpan", "ja_XX"), "ko": ("kor_Hang", "ko_KR"), "ru": ("rus_Cyrl", "ru_RU"),
             "uk": ("ukr_Cyrl", "uk_UA"), "he": ("heb_Hebr", "he_IL"), "th": ("tha_Thai", "th_TH"),
             "fr": ("fra_Latn", "fr_XX"), "es_ES": ("spa_Latn", "es_XX"), "zh-Hant": ("zho_Hant", "zh_CN"),
             "zho_Hans": ("zho_Hans", "zh_CN"), "fa": ("pes_Arab", "fa_IR"), "tl": ("tgl_Latn", "tl_XX"),
             "sw": ("swh_Latn", "sw_KE"), "ps": ("pbt_Arab", "ps_AF"), "pt-BR": ("por_Latn", "pt_XX")}
    for code, (flores, mbart) in cases.items():
        assert (flores_code(code), mbart50_code(code)) == (flores, mbart), code
    assert all(mbart50_code(c) == c for c in MBART50)


def test_overlong_policies(tok):
    long = Example(" ".join(["the cat"] * 30), "blau", "en", "de", "translation")
    f = _feat(tok, encoder_seq_len=8)
    assert f(long) is None and f.stats.overlong_skipped == 1
    t = _feat(tok, lang_tokens="t5_tag", encoder_seq_len=8, overlong="truncate")
    src = t(long)["enc_inputs"].tolist()
    assert len(src) == 8 and src[0] == 4 and src[-1] == tok.eos_id and t.stats.truncated == 1
    tgt_long = Example("a", " ".join(["Katze"] * 50), "en", "de", "translation")
    out = t(tgt_long)
    assert len(out["targets"]) == 32 and out["targets"][-1] == tok.eos_id
    with pytest.raises(OverlongError, match="data.encoder_seq_len=8"):
        _feat(tok, encoder_seq_len=8, overlong="error")(long)


# ------------------------------------------------------------------- pipeline


def _cfg(**kw):
    train = (SourceConfig(type="tsv", path="{split}.{src}-{tgt}.tsv", directions=("en-de",)),
             SourceConfig(type="text", task="span_corruption", path="mono.de.txt", tgt_lang="de"))
    base = dict(train=train, dev=train[:1], seq_len=40, encoder_seq_len=48, temperature=1.0, seed=5,
                lang_tokens="t5_tag")
    return DataConfig(**{**base, **kw})


def _pipe(tok, data_dir, cfg=None, **kw):
    kw = {"global_batch": 4, "encoder_decoder": True, "decoder_start_id": 0, **kw}
    return build_train_pipeline(cfg or _cfg(), tok, base_dir=data_dir, **kw)


def _batches(p, n):
    return [next(p) for _ in range(n)]


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_seq2seq_rows_shapes_and_errors(tok, data_dir):
    b = next(_pipe(tok, data_dir))
    assert set(b) == set(ROW_KEYS)
    assert all(b[k].shape == (4, 48) for k in ENC) and all(b[k].shape == (4, 40) for k in DEC)
    assert all(b[k].dtype == (np.float32 if k == "weights" else np.int32) for k in ROW_KEYS)
    with pytest.raises(ValueError, match="decoder_start_id"):
        _pipe(tok, data_dir, decoder_start_id=None)
    with pytest.raises(DataError, match=r"data.train\[1\].task: span_corruption needs an encoder-decoder"):
        build_train_pipeline(_cfg(), tok, global_batch=4, base_dir=data_dir)


def _segments(row, keys, seg_key):
    seg = row[seg_key]
    out = []
    for s in range(1, int(seg.max()) + 1):
        idx = np.flatnonzero(seg == s)
        assert idx.tolist() == list(range(idx[0], idx[0] + len(idx)))  # contiguous
        out.append((idx, tuple(tuple(row[k][idx].tolist()) for k in keys)))
    used = seg > 0
    assert used[: used.sum()].all() and not any(row[k][~used].any() for k in keys)  # padding last, all 0
    return out


def test_packing_aligns_both_sides_and_segments_are_the_unpacked_examples(tok, data_dir):
    packed = _batches(_pipe(tok, data_dir), 6)
    unpacked = _batches(_pipe(tok, data_dir, cfg=_cfg(packing=False)), 40)
    max_segments = 0
    for r in range(4):
        examples = []
        for b in unpacked:
            row = {k: v[r] for k, v in b.items()}
            (_, src), = _segments(row, ("enc_inputs",), "enc_segment_ids")
            (_, dec), = _segments(row, ("inputs", "targets", "weights"), "segment_ids")
            examples.append(src + dec)
        got = []
        for b in packed:
            row = {k: v[r] for k, v in b.items()}
            enc = _segments(row, ("enc_inputs",), "enc_segment_ids")
            dec = _segments(row, ("inputs", "targets", "weights"), "segment_ids")
            assert len(enc) == len(dec)  # segment k on both sides
            for (ei, e), (di, d) in zip(enc, dec):
                assert row["enc_positions"][ei].tolist() == list(range(len(ei)))
                assert row["positions"][di].tolist() == list(range(len(di)))
                got.append(e + d)
            max_segments = max(max_segments, len(enc))
        assert got == examples[: len(got)]  # same examples, same order, as unpacked
    assert max_segments > 1


def test_seq2seq_determinism_resume_and_two_processes(tok, data_dir):
    one = _batches(_pipe(tok, data_dir), 4)
    _assert_same(_batches(_pipe(tok, data_dir), 4), one)
    other = _batches(_pipe(tok, data_dir, cfg=_cfg(seed=6)), 4)
    assert any(not np.array_equal(x["enc_inputs"], y["enc_inputs"]) for x, y in zip(one, other))
    # resume
    p = _pipe(tok, data_dir)
    _batches(p, 2)
    state = json.loads(json.dumps(p.get_state()))
    expected = _batches(p, 3)
    q = _pipe(tok, data_dir)
    q.set_state(state)
    _assert_same(_batches(q, 3), expected)
    # two processes give the rows of one
    parts = [_batches(_pipe(tok, data_dir, process_index=i, process_count=2), 4) for i in range(2)]
    for step in range(4):
        for k in ROW_KEYS:
            np.testing.assert_array_equal(np.concatenate([parts[0][step][k], parts[1][step][k]]), one[step][k])


def test_translation_and_span_corruption_mix(tok, data_dir):
    p = _pipe(tok, data_dir, cfg=_cfg(temperature=2.0), global_batch=8)
    rates = {r["direction"]: r for r in p.rates}
    assert list(rates) == ["en-de", "mono.de"]
    expected = np.sqrt([120, 60]) / np.sqrt([120, 60]).sum()
    np.testing.assert_allclose([r["target"] for r in rates.values()], expected)
    np.testing.assert_allclose([r["realised"] for r in rates.values()], expected, atol=0.01)
    sentinels, tag = set(noise.sentinel_ids(tok)), tok.piece_id("<2de>")
    kinds = {"translation": 0, "span_corruption": 0}
    for b in _batches(p, 20):
        for r in range(8):
            row = {k: v[r] for k, v in b.items()}
            for (_, (src,)) in _segments(row, ("enc_inputs",), "enc_segment_ids"):
                if src[0] == tag:
                    kinds["translation"] += 1
                else:
                    assert sentinels & set(src)
                    kinds["span_corruption"] += 1
    share = kinds["span_corruption"] / sum(kinds.values())
    assert abs(share - expected[1]) < 0.06
    stats = p.stats
    assert stats["mono.de"]["tokenized_examples"] > 0 and stats["en-de"]["tokenized_examples"] > 0


def test_seq2seq_dev_batches(tok, data_dir):
    cfg = _cfg(seq_len=64, encoder_seq_len=64, lang_tokens="lang_code", lang_code_style="mbart50")
    dev = build_dev_batches(cfg, tok, batch_size=8, base_dir=data_dir, max_batches=3, encoder_decoder=True,
                            decoder_start_id=3)
    batches = dev["en-de"]
    assert len(batches) == 3 and all(b[k].shape == (8, 64) for b in batches for k in ROW_KEYS)
    ex = read_directions(cfg, data_dir, split="dev")[0].examples[0]
    d = read_directions(cfg, data_dir, split="dev")[0]
    first = Seq2SeqFeaturizer(tok, cfg, d.config, decoder_start_id=3)(ex)
    n, m = len(first["enc_inputs"]), len(first["targets"])
    assert batches[0]["enc_inputs"][0, :n].tolist() == first["enc_inputs"].tolist()
    assert batches[0]["inputs"][0, :m].tolist() == first["inputs"].tolist()
    assert batches[0]["enc_inputs"][0, 0] == 6 and batches[0]["targets"][0, 0] == 5  # en_XX, de_DE
    assert batches[0]["segment_ids"][0].tolist() == [1] * m + [0] * (64 - m)
    with pytest.raises(ValueError, match="decoder_start_id"):
        build_dev_batches(cfg, tok, batch_size=8, base_dir=data_dir, max_batches=1, encoder_decoder=True)


# ------------------------------------------------------- over-long up front


@pytest.mark.parametrize("task,mode", [("translation", "t5_tag"), ("translation", "lang_code"),
                                       ("prompt", "t5_tag"), ("span_corruption", "none"), ("infilling", "lang_code")])
def test_lengths_agree_with_the_featurizer(tok, task, mode):
    mono = task in ("span_corruption", "infilling")
    src = SourceConfig(type="text" if mono else "tsv", task=task, path="x", name="s",
                       src_lang=None if mono else "en", tgt_lang=None if task == "prompt" else "de")
    f = Seq2SeqFeaturizer(tok, DataConfig(seq_len=512, lang_tokens=mode, lang_code_style="mbart50"), src,
                          decoder_start_id=3)
    rng = random.Random(3)
    texts = [_sentence(rng) + ". " + _sentence(rng) + "." for _ in range(30)] + ["", "a", "the cat"]
    # sentence joins that re-tokenize when permuted: "the。a" permuted is one piece longer, and with
    # the noise of index 21 (two spans of one token) the noised source would exceed the bound uncut
    texts += ["Katze blau。the cat。Haus", "blau! Katze", "the。a"]
    examples = [Example("" if mono else t[::-1] or "x", t or "a", "en", "de", task) for t in texts]
    lengths = f.lengths(examples)
    assert lengths.shape == (len(examples), 2) and f.limits == (512, 512)
    for ex, (n_src, n_tgt) in zip(examples, lengths.tolist()):
        for index in ([*range(6), 21, 22] if mono else [0]):  # the noise differs per stream index
            src_ids, tgt_ids = f.tokens(ex, index)
            assert len(tgt_ids) == n_tgt
            assert len(src_ids) <= n_src if task == "infilling" else len(src_ids) == n_src


def test_seq2seq_overlong_skip_and_error_up_front(tok, data_dir):
    cfg = _cfg(seq_len=8, encoder_seq_len=10)
    kept = {}
    for d in read_directions(cfg, data_dir, split="train"):  # the featurizer applied lazily, one by one
        f = Seq2SeqFeaturizer(tok, cfg, d.config, decoder_start_id=0, key=d.key)
        kept[d.name] = sum(f(ex, i) is not None for i, ex in enumerate(d.examples))
    assert 0 < kept["en-de"] < 120 and 0 < kept["mono.de"] < 60
    p = _pipe(tok, data_dir, cfg=cfg, global_batch=2)
    rates = {r["direction"]: r for r in p.rates}
    assert {n: r["examples"] for n, r in rates.items()} == kept
    assert p.stats["mono.de"]["overlong_skipped"] == 60 - kept["mono.de"]
    assert p.rates_table().splitlines()[3].split()[:3] == ["mono.de", str(kept["mono.de"]), str(60 - kept["mono.de"])]
    batches = _batches(p, 10)
    assert all(s["tokenized_overlong_skipped"] == 0 for s in p.stats.values())
    assert sum(s["tokenized_examples"] for s in p.stats.values()) > 20
    assert all(b["enc_segment_ids"].max() >= 1 for b in batches)
    # error: at build time, naming file:line and both lengths
    d = read_directions(cfg, data_dir, split="train")[0]
    f = Seq2SeqFeaturizer(tok, cfg, d.config, decoder_start_id=0)
    i = int(np.flatnonzero((f.lengths(d.examples) > np.array([10, 8])).any(axis=1))[0])
    with pytest.raises(OverlongError, match=rf"^{data_dir / 'train.en-de.tsv'}:{i + 2}: example of \d+ source tokens "
                                            rf"\(data.encoder_seq_len=10\) and \d+ target tokens \(data.seq_len=8\) "
                                            rf"is too long \(data.train\[0\].directions\[0\]; \d+ more"):
        _pipe(tok, data_dir, cfg=_cfg(seq_len=8, encoder_seq_len=10, overlong="error"), global_batch=2)
    with pytest.raises(OverlongError, match=rf"^{data_dir / 'dev.en-de.tsv'}:{i + 2}: example of "):
        build_dev_batches(_cfg(seq_len=8, encoder_seq_len=10, overlong="error"), tok, batch_size=2,
                          base_dir=data_dir, max_batches=1, encoder_decoder=True, decoder_start_id=0)
