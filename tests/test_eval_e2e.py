"""Decoding + sacreBLEU evaluation wired into training and the CLI."""

import json
import subprocess
import sys

import pytest
import yaml

from jaxft.cli import main
from jaxft.config.loader import load_config
from jaxft.config.schema import DecodeConfig
from jaxft.eval.translate import evaluate, load_run
from jaxft.eval.during_training import train_and_evaluate as train
from trainutil import read_jsonl

from trainutil import write_run_config

EVAL = {"eval.every": 3, "eval.decode": {"strategy": "greedy", "max_len": 12}, "eval.max_examples": 4,
        "eval.batch_size": 8}


@pytest.mark.parametrize("family", ["decoder", "mbart"])
def test_eval_during_training_keeps_best_and_cli_reports(tmp_path, family, capsys):
    path = write_run_config(tmp_path, steps=6, extra=EVAL, name=family)
    if family == "mbart":
        raw = yaml.safe_load(path.read_text())
        raw["model"] = {"preset": "tiny-mbart", "vocab_size": 512, "d_model": 32, "n_layers": 1,
                        "n_decoder_layers": 1, "n_heads": 4, "mlp_dim": 64, "dtype": "float32"}
        raw["data"].update(lang_tokens="lang_code", encoder_seq_len=64)
        path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    result = train(cfg, base_dir=tmp_path)
    evals = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    for row in evals:
        assert set(row["scores"]) == {"eng_Latn-deu_Latn", "deu_Latn-eng_Latn"}
        assert all(0 <= s["chrf"] <= 100 and 0 <= s["bleu"] <= 100 for s in row["scores"].values())
    best = json.loads((result.run_dir / "best" / "best.json").read_text())
    best_row = max(evals, key=lambda r: (r["average"]["chrf"], -r["step"]))
    assert best["step"] == best_row["step"] and best["value"] == pytest.approx(best_row["average"]["chrf"])
    assert (result.run_dir / "eval" / "step_6" / "eval.md").exists()

    # The best checkpoint re-scores to the logged value; greedy eval == translate().
    translator, run_cfg = load_run(result.run_dir, which="best")
    report = evaluate(translator, run_cfg, base_dir=tmp_path)
    assert report.averages()["chrf"] == pytest.approx(best["value"], abs=1e-6)
    dev = [line for line in (tmp_path / "corpus" / "dev.eng_Latn").read_text().splitlines()][:4]
    outs = translator.translate(dev, "eng_Latn", "deu_Latn", DecodeConfig(strategy="greedy", max_len=12), 8)
    assert len(outs) == 4

    assert main(["eval", str(path), "--checkpoint", "best", "--out", str(tmp_path / "ev")]) == 0
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["averages"]["chrf"] == pytest.approx(best["value"], abs=1e-6)
    assert "BLEU" in capsys.readouterr().out


def test_translate_cli_reads_stdin(tmp_path):
    path = write_run_config(tmp_path, steps=2, name="tr")
    train(load_config(path), base_dir=tmp_path)
    text = "Wednesday, April 26, 1978\nJapan, India, or Ireland\n"
    done = subprocess.run([sys.executable, "-m", "jaxft.cli", "translate", str(tmp_path / "tr"), "--src-lang",
                           "eng_Latn", "--tgt-lang", "deu_Latn", "--strategy", "greedy", "--max-len", "8",
                           "--batch-size", "8"], input=text, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.splitlines()) == 2
