"""End-to-end training runs: exact resume, checkpoint fallback, refusing an
incompatible resume, and a real kill -9 in the middle of a run."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxft.config.loader import load_config
from jaxft.train.loop import train
from trainutil import read_jsonl
from jaxft.runs.resume import ResumeError

from trainutil import write_run_config


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Last logged loss per step (a resumed run appends to the same file)."""
    out = {}
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        if row["kind"] == "train":
            out[row["step"]] = row["loss"]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    cfg_path = write_run_config(tmp, steps=6)
    result = train(load_config(cfg_path), base_dir=tmp)
    return tmp, result


def test_uninterrupted_run_learns_and_reports_dev_loss(reference):
    _, result = reference
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert set(result.dev_before) == set(result.dev_after) == {"eng_Latn-deu_Latn", "deu_Latn-eng_Latn"}
    assert all(result.dev_after[k] < result.dev_before[k] for k in result.dev_after)
    assert (result.run_dir / "config.yaml").exists()
    assert list((result.run_dir / "tb").glob("events.out.tfevents.*"))
    rows = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    for row in rows:
        assert {"loss", "lr", "grad_norm", "seq_tokens_per_s", "mfu", "tokens"} <= set(row)
        assert row["seq_tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["grad_norm"] > 0
        assert row["data_wait_s"] >= 0 and 0 <= row["data_wait_frac"] < 1  # host time blocked on the batch
    assert rows[0]["lr"] < rows[2]["lr"]  # warmup


def test_data_worker_processes_train_the_same_losses(reference):
    tmp, ref = reference
    cfg = load_config(write_run_config(tmp, steps=6, name="workers", extra={"data.workers": 2}))
    result = train(cfg, base_dir=tmp)
    assert result.losses == ref.losses


def test_resume_reproduces_uninterrupted_losses_exactly(reference):
    tmp, ref = reference
    cfg = load_config(write_run_config(tmp, steps=6, name="resumed"))
    first = train(cfg, base_dir=tmp, stop_after=3)  # "preempted" after step 3 (checkpoint at 2 and 3)
    assert first.step == 3
    second = train(cfg, base_dir=tmp)
    assert sorted(second.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert second.losses[step] == ref.losses[step], step  # bitwise on CPU
    assert second.dev_after == ref.dev_after


def test_truncated_latest_checkpoint_falls_back_with_warning(reference, caplog):
    tmp, ref = reference
    cfg = load_config(write_run_config(tmp, steps=6, name="corrupt"))
    train(cfg, base_dir=tmp, stop_after=4)  # checkpoints at 2 and 4
    ckpt4 = Path(cfg.run_dir) / "checkpoints" / "4" / "params"
    victims = [p for p in ckpt4.rglob("*") if p.is_file() and p.stat().st_size > 0 and "manifest" not in p.name
               and p.suffix != ".json"]
    assert victims
    for p in victims:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    with caplog.at_level(logging.WARNING):
        resumed = train(cfg, base_dir=tmp)
    assert any("cannot be restored" in r.message for r in caplog.records)
    assert sorted(resumed.losses) == [3, 4, 5, 6]
    assert resumed.losses[6] == ref.losses[6]
    aside = list((Path(cfg.run_dir) / "unreadable_checkpoints").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("4-")  # kept, not deleted


def test_incompatible_config_is_refused_and_nothing_is_written(reference):
    tmp, _ = reference
    path = write_run_config(tmp, steps=6, name="changed")
    cfg = load_config(path)
    train(cfg, base_dir=tmp, stop_after=2)
    run_dir = Path(cfg.run_dir)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(ResumeError, match=r"model.d_model: 32 -> 64"):
        train(load_config(path, ["model.d_model=64"]), base_dir=tmp)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    # Changing only bookkeeping (log cadence, more steps) or memory (remat, loss chunks) resumes fine.
    more = train(load_config(path, ["train.log_every=2", "model.remat=full", "train.loss_chunk=16",
                                           "train.loss_chunk_mib=0"]), base_dir=tmp)
    assert more.step == 6


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted(reference):
    tmp, ref = reference
    path = write_run_config(tmp, steps=6, name="killed", extra={"checkpoint.every": 1})
    tests_dir = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    slow = [sys.executable, "-c", f"import trainutil; trainutil.train_slowly({str(path)!r}, 0.5)"]
    cmd = [sys.executable, "-m", "jaxft.cli", "train", str(path)]
    proc = subprocess.Popen(slow, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_dir = tmp / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpt_dir / "3").is_dir():
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpt_dir / "3").is_dir(), proc.stderr.read().decode()[-2000:]
    assert not (ckpt_dir / "6").exists()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    losses = losses_by_step(tmp / "killed")
    for step in (4, 5, 6):
        assert losses[step] == ref.losses[step]
    assert np.isfinite(list(losses.values())).all()
