"""Run dirs: inference restores params without an optimizer, every reading command
(translate, eval, compose, diff, export) leaves the run dir byte-identical (even
with an unreadable newest checkpoint, or none that fits the model), exports are
written atomically to new paths, and pre-split checkpoints get a one-line error."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx

from jaxft.cli import main
from jaxft.config.loader import load_config
from jaxft.eval.translate import load_run
from jaxft.peft.methods import METHODS, method_for
from jaxft.peft.compose import _model_from, load_checkpoint
from jaxft.runs.checkpoint import CheckpointFormatError
from jaxft.runs.export import export_run
from jaxft.runs.model import restore_model
from jaxft.train.loop import train

from test_outputs import tree_digest
from trainutil import write_run_config


QUICK = ["--set", "eval.decode.strategy=greedy", "--set", "eval.decode.max_len=6", "--max-examples", "2"]  # eval


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under `root`: its content digest and mtime (nothing added, moved or changed)."""
    return {rel: (digest, (root / rel).lstat().st_mtime_ns) for rel, digest in tree_digest(root).items()}


def copy_run(run: Path, to: Path, **model) -> Path:
    """A copy of a run dir whose config.yaml names the copy (and `model` keys changed)."""
    shutil.copytree(run, to)
    cfg = yaml.safe_load((to / "config.yaml").read_text())
    cfg["run_dir"] = str(to)
    cfg["model"].update(model)
    (to / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return to


def corrupt_params(step_dir: Path) -> None:
    victims = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.stat().st_size > 0
               and "manifest" not in p.name and p.suffix != ".json"]
    assert victims
    for p in victims:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


def logits(model: nnx.Module, ids: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    full = train(load_config(write_run_config(tmp, steps=4, name="full")), base_dir=tmp)
    path = write_run_config(tmp, steps=2, name="lora")
    raw = yaml.safe_load(path.read_text())
    raw["peft"] = {"method": "lora", "lora": {"rank": 2, "alpha": 4.0}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    lora = train(load_config(path), base_dir=tmp)
    return tmp, full.run_dir, lora.run_dir


def test_restore_model_builds_no_optimizer(runs, monkeypatch):
    _, full, _ = runs
    for name in ("adamw", "adafactor", "scale_by_adam"):
        monkeypatch.setattr(optax, name, lambda *a, **k: pytest.fail("inference built an optimizer"))
    restored = restore_model(full)
    assert restored.step == 4 and restored.config.train.steps == 4
    ids = np.arange(12, dtype=np.int32).reshape(2, 6) % 500 + 3
    assert np.isfinite(logits(restored.model(), ids)).all()


def test_reading_commands_never_change_the_run_dir(runs, tmp_path, caplog):
    tmp, full, _ = runs
    run = copy_run(full, tmp_path / "copy")
    good = restore_model(run)
    corrupt_params(run / "checkpoints" / "4")
    before = snapshot(run)
    with caplog.at_level(logging.WARNING):
        translator, _ = load_run(run)  # falls back to step 2
    assert any("cannot be restored" in r.message for r in caplog.records)
    assert restore_model(run).step == 2
    ids = np.arange(6, dtype=np.int32).reshape(1, 6) + 3
    assert not np.array_equal(logits(translator.model, ids), logits(good.model(), ids))  # step 2, not 4
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    assert main(["eval", str(tmp / "full.yaml"), "--run-dir", str(run), "--out", str(tmp_path / "ev"), *QUICK]) == 0
    assert snapshot(run) == before  # nothing moved aside, nothing written
    assert not (run / "unreadable_checkpoints").exists()


def test_export_jaxft_and_hf_match_the_run(runs, tmp_path):
    _, full, lora = runs
    before = {run: snapshot(run) for run in (full, lora)}
    ids = (np.arange(16, dtype=np.int32).reshape(2, 8) * 7) % 500 + 3
    for run in (full, lora):
        want = logits(restore_model(run).model(), ids)
        out = export_run(run, tmp_path / f"{run.name}-jaxft")
        ckpt = load_checkpoint(out)
        np.testing.assert_allclose(logits(_model_from(ckpt), ids), want, rtol=1e-5, atol=1e-5)
    hf = load_checkpoint(export_run(lora, tmp_path / "lora-hf", fmt="hf"))
    hf = dataclasses.replace(hf, cfg=dataclasses.replace(hf.cfg, dtype="float32"))  # HF loads compute in bf16
    np.testing.assert_allclose(logits(_model_from(hf), ids),
                               logits(restore_model(lora).model(), ids), rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob(".*partial"))
    assert {run: snapshot(run) for run in (full, lora)} == before


def test_export_refuses_existing_or_input_paths(runs, tmp_path, capsys):
    _, full, _ = runs
    (tmp_path / "taken").write_text("keep me")
    before = snapshot(full)
    assert main(["export", str(full), str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "keep me"
    assert main(["export", str(full), str(full / "inside")]) == 2
    assert "inside" in capsys.readouterr().err
    assert snapshot(full) == before


def test_pre_split_checkpoint_gets_a_one_line_error(runs, tmp_path):
    _, full, _ = runs
    run = tmp_path / "old"
    (run / "checkpoints" / "7" / "state").mkdir(parents=True)
    (run / "config.yaml").write_text((full / "config.yaml").read_text())
    with pytest.raises(CheckpointFormatError, match=r"7: written by jaxft 0.1 \(one 'state' item\)"):
        restore_model(run)


def test_one_dispatch_point_for_peft_methods():
    from jaxft.config.schema import PeftConfig, TrainConfig

    assert set(METHODS) == {"none", "lora", "sparse"}
    assert [method_for(PeftConfig(method=m), TrainConfig()).name for m in METHODS] == list(METHODS)
    assert method_for(PeftConfig(method="lora"), TrainConfig()).checkpoint_base is False
    assert method_for(PeftConfig(method="lora", save_base=True), TrainConfig()).checkpoint_base is True
    with pytest.raises(ValueError, match="peft.method: unknown 'dora'"):
        method_for(PeftConfig(method="dora"), TrainConfig())



def test_every_reading_command_leaves_the_run_dirs_byte_identical(runs, tmp_path, capsys):
    tmp, full, lora = runs
    before = {run: snapshot(run) for run in (full, lora)}
    (tmp_path / "in.txt").write_text("Wednesday, April 26, 1978\nJapan, India, or Ireland\n")
    assert main(["translate", str(full), "--src-lang", "eng_Latn", "--tgt-lang", "deu_Latn", "--input",
                 str(tmp_path / "in.txt"), "--strategy", "greedy", "--max-len", "6", "--batch-size", "8"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["eval", str(tmp / "full.yaml"), *QUICK]) == 0  # prints the report, writes nothing
    assert "BLEU" in (out := capsys.readouterr().out) and "wrote" not in out
    assert main(["eval", str(tmp / "full.yaml"), *QUICK, "--out", str(full / "eval")]) == 2
    assert main(["eval", str(tmp / "full.yaml"), *QUICK, "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "eval.json").is_file()
    delta, composed = tmp_path / "delta", tmp_path / "composed"
    assert main(["diff", str(full), str(lora), "--out", str(delta)]) == 0  # dense: full - lora (merged)
    assert main(["compose", str(lora), "+", str(delta), "--out", str(lora)]) == 2
    assert main(["compose", str(lora), "+", str(delta), "--out", str(composed)]) == 0
    ids = (np.arange(16, dtype=np.int32).reshape(2, 8) * 5) % 500 + 3
    np.testing.assert_allclose(logits(_model_from(load_checkpoint(composed)), ids),
                               logits(restore_model(full).model(), ids), rtol=1e-5, atol=1e-5)
    assert {run: snapshot(run) for run in (full, lora)} == before  # export: test_export_jaxft_and_hf_match_the_run


def test_checkpoints_that_do_not_fit_the_model_are_an_error_and_stay(runs, tmp_path, capsys):
    """No checkpoint restores for the config's model shape: every reading command fails with one
    line naming the run dir, and moves nothing (only training sets checkpoints aside)."""
    tmp, full, _ = runs
    run = copy_run(full, tmp_path / "misfit", mlp_dim=96)
    before = snapshot(run)
    (tmp_path / "in.txt").write_text("Japan\n")
    for argv in (["translate", str(run), "--src-lang", "eng_Latn", "--tgt-lang", "deu_Latn", "--input",
                  str(tmp_path / "in.txt")],
                 ["export", str(run), str(tmp_path / "exported")],
                 ["eval", str(tmp / "full.yaml"), "--run-dir", str(run), "--out", str(tmp_path / "ev")],
                 ["diff", str(run), str(full), "--out", str(tmp_path / "delta")]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jaxft: ")]
        assert len(errors) == 1 and str(run) in errors[0] and "checkpoint" in errors[0], errors
    assert snapshot(run) == before
    assert not (run / "unreadable_checkpoints").exists()
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "misfit"]  # no output, no temporary folder


def test_train_without_the_eval_hook_refuses_eval_every(tmp_path):
    cfg = load_config(write_run_config(tmp_path, steps=2, extra={"eval.every": 1}))
    with pytest.raises(ValueError, match="eval.every: evaluation during training needs the evaluation hook"):
        train(cfg, base_dir=tmp_path)
    assert not Path(cfg.run_dir).exists()  # refused before anything was written
