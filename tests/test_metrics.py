"""jaxft.eval.metrics and jaxft.eval.report: sacreBLEU scores, tiers, reports."""

import json
import logging

import pytest

from jaxft.eval import metrics, report
from jaxft.eval.metrics import DirectionScores, bleu_tokenizer, score_direction
from jaxft.eval.report import EvalReport

SYSTEMS = "newstest2017.{}.en-de.de"
# sacreBLEU's test.sh values, as in ../shared/data/README.md.
BLEU_REF = {"C-3MA.4959": 22.67, "FBK.4870": 26.33, "KIT.4950": 26.08, "uedin-nmt.4722": 28.30}
CHRF_EPS_REF = {"C-3MA.4959": (51.9533, 49.1683), "FBK.4870": (54.7152, 52.2330)}


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


@pytest.fixture
def wmt17(shared_data):
    root = shared_data / "wmt17_ende_systems"
    return root, _lines(root / "newstest2017.ref.de")


# ------------------------------------------------------------- reference scores


@pytest.mark.shared_data
@pytest.mark.parametrize("system", sorted(BLEU_REF))
def test_bleu_matches_sacrebleu_reference(wmt17, system):
    root, ref = wmt17
    hyp = _lines(root / SYSTEMS.format(system))
    s = score_direction(hyp, ref, tgt_lang="de", direction="en-de")
    assert s.n == 3004 and s.tokenizer == "13a"
    assert round(s.bleu, 2) == BLEU_REF[system]
    assert "tok:13a" in s.bleu_signature and "nrefs:1" in s.bleu_signature


@pytest.mark.shared_data
@pytest.mark.parametrize("system", sorted(CHRF_EPS_REF))
def test_chrf_eps_matches_sacrebleu_reference(wmt17, system):
    root, ref = wmt17
    hyp = _lines(root / SYSTEMS.format(system))
    s = score_direction(hyp, [ref], tgt_lang="deu_Latn", chrf_eps_smoothing=True)
    assert (round(s.chrf, 4), round(s.chrfpp, 4)) == CHRF_EPS_REF[system]
    assert s.chrf_eps_smoothing and "nw:0" in s.chrf_signature and "nw:2" in s.chrfpp_signature


# ------------------------------------------------------------- tokenizers


@pytest.fixture
def no_mecab(monkeypatch):
    monkeypatch.setattr(metrics, "mecab_available", lambda lang: False)
    monkeypatch.setattr(metrics, "_warned", set())


@pytest.mark.parametrize("code", ["zh", "ZH", "zho_Hans", "zho_Hant", "zh-Hant", "cmn", "yue_Hant"])
def test_chinese_codes_use_zh(code):
    assert bleu_tokenizer(code) == "zh"


@pytest.mark.parametrize("code", ["de", "deu_Latn", "en", "eng_Latn", "hin_Deva", "yo", "fra"])
def test_other_codes_use_13a(code):
    assert bleu_tokenizer(code) == "13a"


@pytest.mark.parametrize("code,fallback", [("ja", "ja"), ("jpn_Jpan", "ja"), ("jpn", "ja"),
                                           ("ko", "ko"), ("kor_Hang", "ko"), ("kor", "ko")])
def test_ja_ko_fall_back_to_char_with_one_warning(no_mecab, caplog, code, fallback):
    with caplog.at_level(logging.WARNING, logger=metrics.__name__):
        assert bleu_tokenizer(code) == "char"
        assert bleu_tokenizer(code) == "char"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"{fallback}-mecab" in warnings[0].getMessage()


def test_ja_ko_use_mecab_when_available(monkeypatch):
    monkeypatch.setattr(metrics, "mecab_available", lambda lang: lang in ("ja", "ko"))
    assert bleu_tokenizer("jpn_Jpan") == "ja-mecab"
    assert bleu_tokenizer("ko") == "ko-mecab"


def test_mecab_available_is_honest():
    """Whatever this machine has, the answer must agree with building the tokenizer."""
    from sacrebleu.tokenizers import tokenizer_ja_mecab
    if tokenizer_ja_mecab.MeCab is None:
        assert not metrics.mecab_available("ja")
    assert not metrics.mecab_available("de")


def test_signatures_contain_tokenizer(no_mecab):
    zh = score_direction(["我喜欢猫。"], ["我喜欢狗。"], tgt_lang="zho_Hans")
    assert zh.tokenizer == "zh" and "tok:zh" in zh.bleu_signature
    ja = score_direction(["猫が好きです。"], ["犬が好きです。"], tgt_lang="jpn_Jpan")
    assert ja.tokenizer == "char" and "tok:char" in ja.bleu_signature
    over = score_direction(["a cat"], ["a dog"], tgt_lang="de", tokenize="intl")
    assert over.tokenizer == "intl" and "tok:intl" in over.bleu_signature
    assert "version:" in over.chrf_signature and "tok:" not in over.chrf_signature


# ------------------------------------------------------------- scoring


def test_perfect_hypothesis_scores_100():
    refs = ["The quick brown fox jumps over the lazy dog.", "Ein kleiner Test mit Wörtern."]
    s = score_direction(refs, refs, tgt_lang="de")
    assert s.bleu == pytest.approx(100.0)
    assert s.chrf == pytest.approx(100.0) and s.chrfpp == pytest.approx(100.0)


def test_multiple_reference_streams():
    hyps = ["the cat sat on the mat today", "a dog barked loudly at night"]
    wrong = ["something else entirely here", "nothing in common with it"]
    s = score_direction(hyps, [wrong, hyps], tgt_lang="en")
    assert s.bleu == pytest.approx(100.0) and "nrefs:2" in s.bleu_signature


@pytest.mark.parametrize("hyps,refs,match", [
    ([], [], r"en-de: no hypotheses \(0 hypotheses, 0 references\)"),
    (["a"], [], r"en-de: no references"),
    (["a", "b"], ["a"], r"en-de: 2 hypotheses but 1 references"),
    (["a", "b"], [["a", "b"], ["a"]], r"en-de: 2 hypotheses but 1 reference stream 1"),
])
def test_bad_inputs_name_direction_and_counts(hyps, refs, match):
    with pytest.raises(ValueError, match=match):
        score_direction(hyps, refs, tgt_lang="de", direction="en-de")


def test_default_label_is_target_language():
    with pytest.raises(ValueError, match=r"->fr: 1 hypotheses but 3 references"):
        score_direction(["a"], ["a", "b", "c"], tgt_lang="fr")


# ------------------------------------------------------------- report


def _fake(bleu, chrf, chrfpp, *, tgt, n=10, tok="13a"):
    return DirectionScores(bleu=bleu, chrf=chrf, chrfpp=chrfpp, n=n, tgt_lang=tgt, tokenizer=tok,
                           bleu_signature=f"nrefs:1|tok:{tok}", chrf_signature="nc:6|nw:0",
                           chrfpp_signature="nc:6|nw:2")


@pytest.fixture
def rep():
    scores = {
        "en-de": _fake(30.0, 60.0, 58.0, tgt="de", n=100),
        "de-en": _fake(34.0, 62.0, 60.0, tgt="en", n=100),
        "en-hi": _fake(20.0, 50.0, 46.0, tgt="hin_Deva", n=50),
        "eng_Latn-yor_Latn": _fake(4.0, 20.0, 18.0, tgt="yor_Latn", n=30),
        "en-zh": _fake(25.0, 30.0, 28.0, tgt="zh", n=20, tok="zh"),
    }
    # languages in any spelling, or a direction name
    return EvalReport(scores, {"high": ["deu"], "mid": ["hi"], "low": ["yo", "en-zh"]})


def test_averages_overall_and_per_tier(rep):
    avg = rep.averages()
    assert avg["n_directions"] == 5
    assert avg["bleu"] == pytest.approx((30 + 34 + 20 + 4 + 25) / 5)
    assert avg["chrfpp"] == pytest.approx((58 + 60 + 46 + 18 + 28) / 5)
    tiers = rep.tier_averages()
    assert list(tiers) == ["high", "mid", "low"]
    assert tiers["high"]["directions"] == ["en-de", "de-en"]  # source and target side
    assert tiers["high"]["bleu"] == pytest.approx(32.0)
    assert tiers["high"]["chrf"] == pytest.approx(61.0)
    assert tiers["mid"]["directions"] == ["en-hi"] and tiers["mid"]["chrf"] == 50.0
    assert tiers["low"]["directions"] == ["eng_Latn-yor_Latn", "en-zh"]
    assert tiers["low"]["bleu"] == pytest.approx(14.5)
    assert rep.untiered() == []


def test_untiered_empty_tier_and_conflicts():
    scores = {"en-de": _fake(30.0, 60.0, 58.0, tgt="de"), "en-fr": _fake(40.0, 65.0, 63.0, tgt="fr")}
    r = EvalReport(scores, {"high": ["de"], "low": ["sw"]})
    assert r.untiered() == ["en-fr"]
    assert r.tier_averages()["low"] == {"n_directions": 0, "bleu": None, "chrf": None,
                                        "chrfpp": None, "directions": []}
    assert "| **low** (0 directions) | – | – | – | 0 |" in r.to_markdown()
    bcp = EvalReport({"en-zh-Hant": _fake(1.0, 2.0, 3.0, tgt="zh-Hant"),
                      "zho_Hans-eng_Latn": _fake(1.0, 2.0, 3.0, tgt="eng_Latn")},
                     {"high": ["zho_Hant"], "mid": ["zh"]})
    assert bcp.tier_of == {"en-zh-Hant": "high", "zho_Hans-eng_Latn": "mid"}
    with pytest.raises(ValueError, match=r"'en-de' matches tiers \['high', 'low'\]"):
        EvalReport(scores, {"high": ["de"], "low": ["en"]})
    with pytest.raises(TypeError, match="tier 'low'"):
        EvalReport(scores, {"low": "sw"})
    with pytest.raises(ValueError, match="no directions"):
        EvalReport({})


def test_json_contents(rep):
    data = json.loads(rep.to_json())
    assert set(data) == {"directions", "signatures", "averages", "tiers", "untiered"}
    assert data["directions"]["en-de"]["bleu"] == 30.0
    assert data["directions"]["en-de"]["tier"] == "high"
    assert data["directions"]["en-zh"]["tokenizer"] == "zh"
    assert data["signatures"]["bleu"] == {"nrefs:1|tok:13a": ["en-de", "de-en", "en-hi",
                                                              "eng_Latn-yor_Latn"],
                                          "nrefs:1|tok:zh": ["en-zh"]}
    assert data["averages"]["bleu"] == pytest.approx(22.6)
    assert data["tiers"]["mid"]["directions"] == ["en-hi"]


def test_markdown_contents(rep):
    md = rep.to_markdown()
    lines = md.splitlines()
    assert lines[0] == "| direction | BLEU | chrF | chrF++ | n |"
    assert "| en-de | 30.00 | 60.00 | 58.00 | 100 |" in lines
    assert "| **average** (5 directions) | 22.60 | 44.40 | 42.00 | 300 |" in lines
    assert "| **high** (2 directions) | 32.00 | 61.00 | 59.00 | 200 |" in lines
    assert "| **low** (2 directions) | 14.50 | 25.00 | 23.00 | 50 |" in lines
    sig = next(line for line in lines if line.startswith("Macro averages"))
    assert "`nrefs:1|tok:zh` (en-zh)" in sig and "chrF `nc:6|nw:0`" in sig
    assert "chrF++ `nc:6|nw:2`" in sig


def test_write_real_scores(tmp_path):
    refs = ["Das ist ein kleiner Test.", "Noch ein Satz für die Auswertung."]
    s = score_direction(["Das ist ein Test.", "Noch ein Satz."], refs, tgt_lang="de")
    json_path, md_path = EvalReport({"en-de": s}).write(tmp_path / "out")
    assert json.loads(json_path.read_text())["directions"]["en-de"]["bleu"] == s.bleu
    assert s.bleu_signature in md_path.read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.json", "eval.md"]


def test_write_is_atomic(tmp_path, rep, monkeypatch):
    rep.write(tmp_path)
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}

    def boom(*args, **kwargs):
        raise RuntimeError("serialisation failed")

    # fails while serialising the second file: neither file is touched
    monkeypatch.setattr(EvalReport, "to_markdown", boom)
    with pytest.raises(RuntimeError):
        rep.write(tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()

    # fails mid-write of the temp file: old file intact, no temp file left behind
    real_fsync = report.os.fsync
    monkeypatch.setattr(report.os, "fsync", boom)
    with pytest.raises(RuntimeError):
        EvalReport({"en-fr": _fake(1.0, 2.0, 3.0, tgt="fr")}).write(tmp_path)
    monkeypatch.setattr(report.os, "fsync", real_fsync)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before
