"""docs/recipes.md "Adapting a trained run to a new language", run with the CLI only on the
demo corpus: train a base on eng<->deu; `jaxft vocab extend` it with pieces learned from
Russian text; `jaxft train` LoRA + the embedding rows (modules_to_save) on eng->rus;
`jaxft eval`; `jaxft export` merged to Hugging Face and as a PEFT adapter."""

import json

import numpy as np
import pytest
import yaml

from jaxft.cli import main
from jaxft.demo.corpus import build_corpus

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow

MODEL = {"preset": "tiny-llama", "vocab_size": 384, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "mlp_dim": 64, "dtype": "float32"}


def _config(path, run_dir, directions, **sections):
    cfg = {"run_dir": str(run_dir), "model": dict(MODEL),
           "data": {"train": [{"type": "text", "src_path": "corpus/train.{src}", "tgt_path": "corpus/train.{tgt}",
                               "directions": directions}],
                    "dev": [{"type": "text", "src_path": "corpus/dev.{src}", "tgt_path": "corpus/dev.{tgt}",
                             "directions": directions}],
                    "seq_len": 96},
           "optimizer": {"lr": 3e-3, "warmup_steps": 2},
           "train": {"steps": 12, "global_batch": 8, "log_every": 4, "dev_batches": 1, "progress_bar": False},
           "checkpoint": {"every": 12, "async_save": False},
           "eval": {"max_examples": 4, "decode": {"max_len": 24}}}
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def test_new_language_recipe_with_the_cli_only(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    build_corpus(tmp_path / "corpus", n_train=160, n_dev=8, n_test=8, languages=["eng_Latn", "deu_Latn", "rus_Cyrl"])
    base = _config(tmp_path / "base.yaml", tmp_path / "runs/base", ["eng_Latn-deu_Latn", "deu_Latn-eng_Latn"],
                   data={"tokenizer": {"train_vocab_size": 360}})
    assert main(["train", str(base)]) == 0

    # 1. Grow the vocabulary with pieces learned from the new language.
    assert main(["vocab", "extend", "runs/base", "--out", "models/base+ru", "--from-corpus", "corpus/train.rus_Cyrl",
                 "--new-pieces", "40"]) == 0
    report = json.loads((tmp_path / "models/base+ru/vocab_report.json").read_text())
    grown = report["after"]["vocab_size"]
    assert report["after"]["tokenizer_size"] > report["before"]["tokenizer_size"]
    assert grown >= report["after"]["tokenizer_size"]

    # 2. LoRA on attention + the embedding / head rows trained fully, eng->rus.
    adapt = _config(tmp_path / "adapt.yaml", tmp_path / "runs/adapt", ["eng_Latn-rus_Cyrl"],
                    model={**MODEL, "vocab_size": grown, "init_from": "run:models/base+ru"},
                    data={"tokenizer": {"path": "models/base+ru/tokenizer"}},
                    peft={"method": "lora", "lora": {"rank": 4, "modules_to_save": ["^embed/", "^lm_head/"]}})
    assert main(["train", str(adapt)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "runs/adapt/metrics.jsonl").read_text().splitlines()]
    dev = [r["dev_loss"]["eng_Latn-rus_Cyrl"] for r in rows if r["kind"] == "dev"]
    assert dev[-1] < dev[0]  # the new direction was learned

    # 3. Score it.
    capsys.readouterr()
    assert main(["eval", str(adapt), "--out", "eval_adapt"]) == 0
    scores = json.loads((tmp_path / "eval_adapt/eval.json").read_text())
    assert "eng_Latn-rus_Cyrl" in json.dumps(scores)

    # 4. Export: merged for transformers, and the adapter alone for PEFT.
    assert main(["export", "runs/adapt", "hf_merged", "--format", "hf", "--merge-lora"]) == 0
    assert main(["export", "runs/adapt", "peft_adapter", "--format", "hf", "--adapter"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_merged").eval()
    assert merged.config.vocab_size == grown
    ids = torch.tensor([[1, 5, 9, grown - 1, 17, 3]])
    from jaxft.runs.model import restore_model
    ours = np.asarray(restore_model(tmp_path / "runs/adapt").model()(ids.numpy().astype(np.int32)))
    with torch.no_grad():
        theirs = merged(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "peft_adapter/adapter_config.json").is_file()
    config = json.loads((tmp_path / "peft_adapter/adapter_config.json").read_text())
    assert config["r"] == 4 and config["modules_to_save"]
