"""Zero-shot answer-choice evaluation: the JSONL layouts, and log-likelihood ranking
equal to a transformers reference on tiny decoder-only and encoder-decoder models."""

import dataclasses
import json

import numpy as np
import pytest
import yaml

from jaxft.config.schema import DataConfig, SourceConfig
from jaxft.data.choice import ChoiceExample, read_choice_source
from jaxft.data.readers import DataError
from jaxft.eval.choice import ChoiceScores, score_choices
from jaxft.interop import load_hf

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _read(tmp_path, records, **kw):
    path = _jsonl(tmp_path / "x.jsonl", records)
    return read_choice_source(SourceConfig(type="jsonl", path=str(path), **kw), tmp_path, "data.dev[0]")


def test_the_layouts_become_context_continuation_options(tmp_path):
    ex = _read(tmp_path, [{"premise": "It rained.", "hypothesis": "It was wet.", "label": 0}],
               task="multiple_choice", choice_format="xnli")[0]
    assert ex.options[2] == ("It rained. Question: It was wet. True, False or Neither? Answer:", "False")
    assert ex.label == 0
    ex = _read(tmp_path, [{"premise": "The man fell.", "question": "cause", "choice1": "He slipped.",
                           "choice2": "He sang.", "label": 0}], task="multiple_choice", choice_format="xcopa")[0]
    assert ex.options == (("The man fell because", "he slipped."), ("The man fell because", "he sang."))
    rec = {f"input_sentence_{i}": f"S{i}." for i in range(1, 5)} | {"sentence_quiz1": "A.", "sentence_quiz2": "B.",
                                                                     "answer_right_ending": 2}
    ex = _read(tmp_path, [rec], task="multiple_choice", choice_format="xstorycloze")[0]
    assert ex.options[1] == ("S1. S2. S3. S4.", "B.") and ex.label == 1
    ex = _read(tmp_path, [{"sentence": "Tom gave Bob a gift because _ was kind.", "option1": "Tom",
                           "option2": "Bob", "answer": "1"}], task="multiple_choice", choice_format="xwinograd")[0]
    assert ex.options == (("Tom gave Bob a gift because Tom", "was kind."),
                          ("Tom gave Bob a gift because Bob", "was kind.")) and ex.label == 0
    ex = _read(tmp_path, [{"text": "great film", "label": "positive"}], task="classification",
               choices=("negative", "positive"))[0]
    assert ex.options == (("great film", "negative"), ("great film", "positive")) and ex.label == 1


def test_bad_records_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"x\.jsonl:2: no field 'hypothesis'"):
        _read(tmp_path, [{"premise": "a", "hypothesis": "b", "label": 1}, {"premise": "a", "label": 1}],
              task="multiple_choice", choice_format="xnli")
    with pytest.raises(DataError, match=r"x\.jsonl:1: label 3 is not one of the 2 options"):
        _read(tmp_path, [{"prompt": "p", "choices": ["a", "b"], "label": 3}], task="multiple_choice")
    with pytest.raises(DataError, match=r"data\.dev\[0\]\.choices: .* label words"):
        _read(tmp_path, [{"text": "t", "label": 0}], task="classification")


class CharTokenizer:
    """Deterministic ids from characters (no SentencePiece model needed)."""

    def __init__(self, vocab, bos, eos):
        self.vocab, self.bos_id, self.eos_id = vocab, bos, eos

    def encode(self, text):
        return [3 + (ord(c) * 7) % (self.vocab - 3) for c in text]


EXAMPLES = [ChoiceExample((("The cat sat on", " the mat"), ("The cat sat on", " a dog"), ("The cat sat on", " x")), 0),
            ChoiceExample((("Hello", " world"), ("Hello", " there")), 1)]


def _hf_decoder_ll(model, tok, ctx, cont):
    ids = [tok.bos_id] + tok.encode(ctx) + tok.encode(cont)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1).numpy()
    n = len(tok.encode(cont))
    return sum(logp[len(ids) - n - 1 + k, ids[len(ids) - n + k]] for k in range(n))


def _hf_seq2seq_ll(model, tok, ctx, cont, start):
    enc, tgt = tok.encode(ctx) + [tok.eos_id], tok.encode(cont) + [tok.eos_id]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([[start] + tgt[:-1]]))
    logp = torch.log_softmax(out.logits[0].double(), -1).numpy()
    return sum(logp[k, t] for k, t in enumerate(tgt))


@pytest.mark.parametrize("kind", ["decoder", "seq2seq"])
def test_loglik_ranking_equals_transformers(kind, tmp_path):
    if kind == "decoder":
        from test_interop_decoder import CASES, make_hf_model
        hf = make_hf_model(*CASES["llama_gqa_untied"])
    else:
        from test_interop_encdec import make_hf_model
        hf = make_hf_model("t5_v1_1_saved_by_tf5")
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg, state = load_hf(tmp_path / "hf")
    cfg = dataclasses.replace(cfg, dtype="float32")  # compute in float32, as the reference
    from flax import nnx
    from jaxft.models.registry import build_model
    model = build_model(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, state)
    tok = CharTokenizer(cfg.vocab_size, bos=1, eos=2)
    data = DataConfig(seq_len=32, encoder_seq_len=24)
    scores = score_choices(model, tok, cfg, data, EXAMPLES, batch_size=4)  # 5 options: two batches, one padded
    for i, ex in enumerate(EXAMPLES):
        for j, (ctx, cont) in enumerate(ex.options):
            ref = _hf_decoder_ll(hf, tok, ctx, cont) if kind == "decoder" else \
                _hf_seq2seq_ll(hf, tok, ctx, cont, cfg.decoder_start_id or 0)
            np.testing.assert_allclose(scores.loglik[i, j], ref, rtol=1e-4, atol=1e-4)
    assert scores.loglik[1, 2] == -np.inf  # the second example has two options
    m = scores.metrics()
    want = np.mean([np.argmax([s for s in row if s > -np.inf]) == ex.label for row, ex in zip(scores.loglik, EXAMPLES)])
    assert m["acc"] == pytest.approx(100 * want) and m["examples"] == 2


def test_acc_norm_divides_by_continuation_bytes():
    s = ChoiceScores(np.array([[-4.0, -6.0]]), np.array([[2, 6]]), np.array([1]))
    assert s.metrics()["acc"] == 0.0 and s.metrics()["acc_norm"] == 100.0


def test_choice_sources_are_evaluation_only_and_skip_the_dev_loss(tmp_path):
    from jaxft.data.directions import read_directions
    from jaxft.data.sources import keyed_sources

    _jsonl(tmp_path / "copa_sw.jsonl", [{"premise": "p.", "question": "effect", "choice1": "A", "choice2": "B",
                                         "label": 1}])
    src = SourceConfig(type="jsonl", path="copa_sw.jsonl", task="multiple_choice", choice_format="xcopa",
                       src_lang="sw")
    with pytest.raises(DataError, match=r"data\.train\[0\]\.task: multiple_choice is for evaluation only"):
        keyed_sources([src], tmp_path, section="data.train")
    assert read_directions(DataConfig(dev=(src,)), tmp_path, split="dev") == []  # no dev loss over options

    from jaxft.data.choice import choice_sources, read_choice_source
    [(key, expanded)] = choice_sources([src], tmp_path, "data.dev")
    assert key == "data.dev[0]" and expanded.name == "copa_sw"
    assert read_choice_source(expanded, tmp_path, key)[0].label == 1


def test_choice_sources_in_training_eval_and_jaxft_eval(tmp_path, capsys):
    """A multiple_choice dev source next to the translation ones: scored during training (best
    checkpoint by acc), in metrics.jsonl, and by `jaxft eval` as an accuracy table."""
    from jaxft.cli import main
    from jaxft.config.loader import load_config
    from jaxft.eval.during_training import train_and_evaluate
    from jaxft.runs.model import restore_model
    from trainutil import read_jsonl
    from jaxft.data.tokenizer import Tokenizer
    from trainutil import write_run_config

    records = [{"premise": f"The {w} is red.", "question": "effect", "choice1": "It is seen.", "choice2": "It sings.",
                "label": i % 2} for i, w in enumerate(["car", "house", "ball", "apple", "door"])]
    _jsonl(tmp_path / "copa_en.jsonl", records)
    path = write_run_config(tmp_path, steps=2, name="run")
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["dev"].append({"type": "jsonl", "path": str(tmp_path / "copa_en.jsonl"), "task": "multiple_choice",
                               "choice_format": "xcopa", "src_lang": "eng_Latn"})
    cfg["eval"] = {"every": 2, "best_metric": "acc", "max_examples": 2, "decode": {"max_len": 8}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    config = load_config(path)
    train_and_evaluate(config, base_dir=tmp_path)
    row = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"][-1]
    got = row["choices"]["copa_en"]
    restored = restore_model(tmp_path / "run")
    want = score_choices(restored.model(), Tokenizer.load(tmp_path / "run" / "tokenizer.model"), config.model,
                         config.data, read_choice_source(
                             SourceConfig(type="jsonl", path=str(tmp_path / "copa_en.jsonl"), task="multiple_choice",
                                          choice_format="xcopa"), tmp_path, "k")[:2]).metrics()
    assert got["acc"] == pytest.approx(want["acc"]) and got["examples"] == 2
    assert row["average"]["acc"] == pytest.approx(want["acc"])
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["metric"] == "acc"
    capsys.readouterr()
    assert main(["eval", str(path), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "eval.md").read_text()
    assert "| copa_en | eng_Latn | multiple_choice |" in md and "| direction | BLEU |" in md


def test_hf_datasets_score_as_the_same_jsonl(tmp_path):
    """type hf (save_to_disk folders): an XCOPA-layout dataset, and a generic one with its own field
    names mapped by `fields` (in a DatasetDict split), score as the same records in JSONL."""
    datasets = pytest.importorskip("datasets")
    from flax import nnx

    from jaxft.config.schema import ModelConfig
    from jaxft.eval.choice import evaluate_choices
    from jaxft.models.registry import build_model
    from test_generation_eval import PRESETS

    copa = [{"premise": f"The {w} fell.", "question": q, "choice1": "It broke.", "choice2": "It sang.", "label": i % 2}
            for i, (w, q) in enumerate([("cup", "effect"), ("man", "cause"), ("vase", "effect"), ("tree", "cause")])]
    _jsonl(tmp_path / "copa.jsonl", copa)
    datasets.Dataset.from_list(copa).save_to_disk(str(tmp_path / "copa_hf"))
    mcq = [{"question": "Two plus two is", "options": ["four", "five", "six"], "answer": "four", "id": 1},
           {"question": "The sky is", "options": ["green", "blue"], "answer": "blue", "id": 2}]
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(mcq)}).save_to_disk(str(tmp_path / "mcq_hf"))
    _jsonl(tmp_path / "mcq.jsonl", [{"prompt": r["question"], "choices": r["options"],
                                     "label": r["options"].index(r["answer"])} for r in mcq])
    dev = (SourceConfig(type="jsonl", path="copa.jsonl", task="multiple_choice", choice_format="xcopa"),
           SourceConfig(type="hf", path="copa_hf", task="multiple_choice", choice_format="xcopa"),
           SourceConfig(type="jsonl", path="mcq.jsonl", task="multiple_choice"),
           SourceConfig(type="hf", path="mcq_hf", hf_split="validation", task="multiple_choice",
                         fields={"prompt": "question", "choices": "options", "label": "answer"}))
    read = [read_choice_source(src, tmp_path, f"data.dev[{i}]") for i, src in enumerate(dev)]
    for jsonl, hf in ((read[0], read[1]), (read[2], read[3])):
        assert [(e.options, e.label) for e in jsonl] == [(e.options, e.label) for e in hf]
    cfg = ModelConfig(**yaml.safe_load((PRESETS / "tiny-llama.yaml").read_text())["model"])
    model = build_model(cfg, rngs=nnx.Rngs(0))
    rows = evaluate_choices(model, CharTokenizer(cfg.vocab_size, bos=1, eos=2), cfg, DataConfig(dev=dev, seq_len=32),
                            base_dir=tmp_path, batch_size=8)
    assert rows["copa"] == rows["copa_hf"] and rows["mcq"] == rows["mcq_hf"] and rows["mcq_hf"]["examples"] == 2
    with pytest.raises(DataError, match=r"mcq_hf\[validation\]:0: data\.dev\[3\]\.fields\.label: the record has "
                                        r"no field 'answr'"):
        read_choice_source(dataclasses.replace(dev[3], fields={**dev[3].fields, "label": "answr"}), tmp_path,
                           "data.dev[3]")


def test_field_mapping_gathers_columns_and_reads_nested_fields(tmp_path):
    rec = {"q": {"text": "Pick one:"}, "A": "red", "B": "blue", "ans": "blue"}
    fields = {"prompt": "q.text", "choices": "A,B", "label": "ans"}
    ex = _read(tmp_path, [rec], task="multiple_choice", fields=fields)[0]
    assert ex.options == (("Pick one:", "red"), ("Pick one:", "blue")) and ex.label == 1
    with pytest.raises(DataError, match=r"x\.jsonl:1: no field 'prompt' .*map it with data\.dev\[0\]\.fields\.prompt"):
        _read(tmp_path, [rec], task="multiple_choice", fields={"choices": "A,B", "label": "ans"})
