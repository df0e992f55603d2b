"""Generation evaluation (`task: generation`): reading prompts / references, exact match and chrF
against outputs known from the same decoding path, per-language tables with tiers, the best
checkpoint by `em`, suite columns, and the config checks of `fields` mappings."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import types

import pytest
import yaml
from flax import nnx
from sacrebleu.metrics import CHRF

from jaxft.config.errors import ConfigError
from jaxft.config.schema import Config, DataConfig, DecodeConfig, EvalConfig, ModelConfig, SourceConfig
from jaxft.data.choice import read_generation_source
from jaxft.data.readers import DataError
from jaxft.eval.generation import (evaluate_generation, generate_texts, generation_inputs, normalize,
                                   score_generation)
from jaxft.eval.report import EvalReport
from jaxft.models import build_model

PRESETS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models"
DECODE = DecodeConfig(max_len=6, min_len=6)  # six tokens: never an empty output
_MODEL: list = []


class LetterTokenizer:
    """Letters <-> ids 3..28 (no SentencePiece model needed); decode gives back the letters."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text):
        return [3 + ord(c) % 26 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + (i - 3) % 26) for i in ids)


def tiny_model():
    if not _MODEL:
        cfg = ModelConfig(**yaml.safe_load((PRESETS / "tiny-llama.yaml").read_text())["model"])
        _MODEL.append((cfg, build_model(cfg, rngs=nnx.Rngs(0))))
    return _MODEL[0]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_exact_match_and_chrf_by_hand():
    outs = ["Paris", " the  cat\tsat ", "Rome"]
    refs = [["paris", "Paris"], ["the cat sat"], ["Roma"]]
    got = score_generation(outs, refs)
    # hit: a second reference; hit: whitespace normalised; miss: case and spelling are kept
    assert got["em"] == pytest.approx(200 / 3) and got["examples"] == 3
    assert normalize(" a \n b  ") == "a b" and normalize("A") != normalize("a")
    want = CHRF().corpus_score(outs, [[r[0] for r in refs], ["Paris", None, None]]).score
    assert got["chrf"] == pytest.approx(want) and "nrefs:var" in got["chrf_signature"]
    one = score_generation(["the cat"], [["a cat", "the cat!"]])  # one segment: the better reference
    assert one["chrf"] == pytest.approx(max(CHRF().corpus_score(["the cat"], [[r]]).score
                                            for r in ("a cat", "the cat!")))


def test_records_fields_languages_and_text_pairs(tmp_path):
    _jsonl(tmp_path / "qa.jsonl", [
        {"prompt": "Q1", "references": ["a", "b"]}, {"prompt": "Q2", "reference": "c"},
        {"prompt": "Q3", "reference": 42}])
    exs = read_generation_source(SourceConfig(type="jsonl", path="qa.jsonl", task="generation", tgt_lang="de"),
                                 tmp_path, "data.dev[0]")
    assert [(e.prompt, e.references, e.lang) for e in exs] == [("Q1", ("a", "b"), "de"), ("Q2", ("c",), "de"),
                                                               ("Q3", ("42",), "de")]
    _jsonl(tmp_path / "ml.jsonl", [{"q": q, "a": str(i), "meta": {"l": lang}}
                                   for i, (q, lang) in enumerate([("x", "de"), ("y", "fr"), ("z", "de"), ("w", "fr")])])
    src = SourceConfig(type="jsonl", path="ml.jsonl", task="generation",
                       fields={"prompt": "q", "references": "a", "lang": "meta.l"})
    exs = read_generation_source(src, tmp_path, "data.dev[0]", limit=1)  # the first one per language
    assert [(e.prompt, e.lang) for e in exs] == [("x", "de"), ("y", "fr")]
    src = SourceConfig(type="jsonl", path="ml.jsonl", task="generation", src_field="q", tgt_field="a")
    assert read_generation_source(src, tmp_path, "k")[3].references == ("3",)
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    (tmp_path / "r.txt").write_text("uno\ndos\n")
    src = SourceConfig(type="text", src_path="p.txt", tgt_path="r.txt", task="generation")
    assert [(e.prompt, e.references) for e in read_generation_source(src, tmp_path, "k")] == [
        ("one", ("uno",)), ("two", ("dos",))]
    (tmp_path / "r.txt").write_text("uno\n")
    with pytest.raises(DataError, match="different numbers of lines"):
        read_generation_source(src, tmp_path, "data.dev[2]")
    _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "references": []}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: the references must be"):
        read_generation_source(SourceConfig(type="jsonl", path="bad.jsonl", task="generation"), tmp_path, "k")


def test_inputs_are_the_prompt_as_prefix_or_encoder_input():
    tok = LetterTokenizer()
    cfg, _ = tiny_model()
    assert generation_inputs(["ab"], tok, cfg, DataConfig(), 4) == [[1, *tok.encode("ab")]]
    short = dataclasses.replace(cfg, max_seq_len=6)
    assert generation_inputs(["abcdef"], tok, short, DataConfig(), 3) == [tok.encode("def")]  # the end is kept
    t5 = dataclasses.replace(cfg, family="t5")
    assert generation_inputs(["abcd"], tok, t5, DataConfig(seq_len=4), 3) == [tok.encode("bcd") + [2]]


def _known_outputs(tmp_path):
    """A JSONL source whose references are built from the model's own outputs: 2 of 3 exact matches
    in `de` (whitespace around one reference, the other in a second reference), 1 of 1 in `fr`."""
    cfg, model = tiny_model()
    prompts = ["hello", "world", "abc"]
    outs = generate_texts(model, LetterTokenizer(), cfg, DataConfig(), prompts, DECODE, 4)
    assert all(len(o) == 6 for o in outs) and outs[1][3:] != "zzz"
    _jsonl(tmp_path / "gen.jsonl", [
        {"prompt": "hello", "references": [f"  {outs[0]} "], "lang": "de"},
        {"prompt": "world", "references": [outs[1][:3] + "zzz"], "lang": "de"},
        {"prompt": "abc", "references": ["nope", outs[2]], "lang": "fr"}])
    return outs


def test_generation_table_per_language_with_tiers(tmp_path):
    outs = _known_outputs(tmp_path)
    cfg, model = tiny_model()
    data = DataConfig(dev=(SourceConfig(type="jsonl", path="gen.jsonl", task="generation"),))
    rows, outputs = evaluate_generation(model, LetterTokenizer(), cfg, data, base_dir=tmp_path, decode=DECODE,
                                        batch_size=4)
    assert list(rows) == ["gen/de", "gen/fr"]
    assert rows["gen/de"]["em"] == 50.0 and rows["gen/fr"]["em"] == 100.0 and rows["gen/de"]["examples"] == 2
    want = CHRF().corpus_score(outs[:2], [[f"  {outs[0]} ", outs[1][:3] + "zzz"]]).score
    assert rows["gen/de"]["chrf"] == pytest.approx(want) and rows["gen/fr"]["chrf"] == 100.0
    assert [o["output"] for o in outputs] == outs and [o["em"] for o in outputs] == [True, False, True]
    report = EvalReport({}, {"low": ["fra_Latn"], "high": ["de"]}, generations=rows, outputs=outputs)
    avg = report.averages()
    assert avg["em"] == 75.0 and avg["gen_chrf"] == pytest.approx((want + 100) / 2)
    tiers = report.to_dict()["generation_tiers"]
    assert tiers["low"]["sources"] == ["gen/fr"] and tiers["low"]["em"] == 100.0 and tiers["high"]["em"] == 50.0
    md = report.to_markdown()
    assert "| gen/de | de | 50.00 |" in md and "| **average** (2 sources) | | 75.00 |" in md
    assert "| **low** (1 sources) | | 100.00 | 100.00 | 1 |" in md
    report.write(tmp_path / "report")
    written = [json.loads(line) for line in (tmp_path / "report" / "generations.jsonl").read_text().splitlines()]
    assert written == outputs


class _FakeCheckpointer:
    def __init__(self):
        self.saved = []

    def save(self, step, *args):
        self.saved.append(step)

    def wait(self):
        pass


def test_best_checkpoint_by_exact_match(tmp_path):
    """EvalHook keeps the checkpoint by `em` (through jaxft.eval.translate.evaluate), logs the
    generation rows and writes the outputs beside the report."""
    from jaxft.eval.during_training import EvalHook
    from jaxft.runs.layout import RunDir

    _known_outputs(tmp_path)
    model_cfg, model = tiny_model()
    src = SourceConfig(type="jsonl", path="gen.jsonl", task="generation")
    cfg = Config(model=model_cfg, data=DataConfig(dev=(src,)),
                 eval=EvalConfig(every=1, best_metric="em", batch_size=4, decode=DECODE))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    written = []
    run = types.SimpleNamespace(
        cfg=cfg, graphdef=graphdef, tokenizer=LetterTokenizer(), base_dir=tmp_path, dirs=RunDir(tmp_path / "run"),
        writer=types.SimpleNamespace(write=lambda step, row, kind: written.append((step, kind, row))),
        checkpoint_items=lambda state: {}, pipeline=types.SimpleNamespace(get_state=lambda: {}), meta={}, is_main=True)
    run.dirs.best.mkdir(parents=True)
    hook = EvalHook()
    hook.best, hook.ckpt = None, _FakeCheckpointer()
    state = types.SimpleNamespace(params=params, rest=rest)
    hook.evaluate(run, 3, state)
    hook.best = 80.0  # an earlier evaluation was better: this one is not kept
    hook.evaluate(run, 4, state)
    assert hook.ckpt.saved == [3]
    assert json.loads(run.dirs.best_json.read_text()) == {"step": 3, "metric": "em", "value": 75.0}
    step, kind, row = written[0]
    assert kind == "eval" and row["average"]["em"] == 75.0 and row["generations"]["gen/fr"]["em"] == 100.0
    assert (run.dirs.eval_report(3) / "generations.jsonl").is_file()
    bad = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, best_metric="acc"))
    with pytest.raises(ValueError, match="eval.best_metric: acc has no value: the dev split has no answer-choice"):
        hook.evaluate(types.SimpleNamespace(**{**vars(run), "cfg": bad}), 5, state)


def test_generation_is_evaluation_only_and_fields_are_checked(tmp_path):
    from jaxft.config.loader import load_config
    from jaxft.data.directions import read_directions

    _jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "reference": "r"}])
    src = SourceConfig(type="jsonl", path="g.jsonl", task="generation")
    assert read_directions(DataConfig(dev=(src,)), tmp_path, split="dev") == []  # no dev loss

    def config(source: dict, section: str = "dev") -> pathlib.Path:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"data": {section: [source]}}, sort_keys=False))
        return path

    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: data\.train\[0\]\.task: generation is for evaluation only"):
        load_config(config({"type": "jsonl", "path": "g.jsonl", "task": "generation"}, "train"))
    with pytest.raises(ConfigError) as e:
        load_config(config({"type": "hf", "path": "x", "task": "multiple_choice", "fields": {"promt": "question"}}))
    assert "\n" not in str(e.value) and "data.dev[0].fields.promt: not a field of choice_format generic " \
        "(one of: prompt, choices, label)" in str(e.value)
    with pytest.raises(ConfigError, match=r"data\.dev\[0\]\.fields: only for tasks"):
        load_config(config({"type": "jsonl", "path": "g.jsonl", "src_lang": "de", "tgt_lang": "fr",
                            "fields": {"prompt": "q"}}))
    with pytest.raises(ConfigError, match=r"data\.dev\[0\]\.type: task generation reads jsonl / hf / text"):
        load_config(config({"type": "tsv", "path": "g.tsv", "task": "generation"}))
    with pytest.raises(ConfigError, match=r"data\.dev\[0\]\.fields\.prompt: src_field names this field too"):
        load_config(config({"type": "jsonl", "path": "g.jsonl", "task": "generation", "src_field": "a",
                            "fields": {"prompt": "q"}}))
    cfg = load_config(config({"type": "jsonl", "path": "g.jsonl", "task": "generation", "fields": {"prompt": "q"}}))
    hash(cfg)  # a fields mapping keeps configs hashable
    with pytest.raises(DataError) as e:  # a field the records lack: one line naming the key
        read_generation_source(cfg.data.dev[0], tmp_path, "data.dev[0]")
    assert "\n" not in str(e.value) and "g.jsonl:1: data.dev[0].fields.prompt: the record has no field 'q'" \
        in str(e.value)


def test_suite_report_columns(tmp_path):
    from jaxft.suite.report import _columns, run_summary

    rows = [{"kind": "train", "step": 2, "loss": 1.0},
            {"kind": "eval", "step": 2, "scores": {}, "average": {"em": 40.0, "gen_chrf": 55.5, "acc": 60.0}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = types.SimpleNamespace(id="s.a", stage="s", axes={}, run_dir=tmp_path, config=None)
    summary = run_summary(plan, {"status": "done"})
    assert summary["avg_em"] == 40.0 and summary["avg_gen_chrf"] == 55.5 and summary["avg_acc_norm"] is None
    assert {"avg_em", "avg_gen_chrf", "avg_acc"} <= set(_columns([summary]))
