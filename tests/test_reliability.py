"""Preemption (SIGTERM / SIGINT), the non-finite guard, unreadable checkpoints,
exact metrics across kills, and a fixed lr schedule on resume."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from jaxft.cli import main
from jaxft.config.loader import load_config
from jaxft.runs.checkpoint import UnreadableCheckpoints
from jaxft.train.cadence import INTERRUPTED_EXIT, PREEMPTED_EXIT, Cadence
from jaxft.train.hooks import GuardHook
from jaxft.train.loop import train
from jaxft.train.metric_sinks import cut_back
from trainutil import read_jsonl

from trainutil import SignalHook, write_run_config


TESTS = str(Path(__file__).resolve().parent)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def train_lines(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rel")
    return tmp, train(load_config(write_run_config(tmp, steps=6)), base_dir=tmp)


def test_sigint_checkpoints_the_current_step_and_resume_is_exact(reference):
    tmp, ref = reference
    cfg = load_config(write_run_config(tmp, steps=6, name="sigint", extra={"checkpoint.every": 4}))
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite was started in the background
    # the signal arrives while step 3's hooks run: step 4 (the step in flight) finishes and is saved
    first = train(cfg, base_dir=tmp, hooks=[SignalHook(3, signal.SIGINT)])
    assert first.exit_status == INTERRUPTED_EXIT and first.step == 4
    assert sorted(p.name for p in (tmp / "sigint" / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    second = train(cfg, base_dir=tmp)
    assert second.exit_status == 0 and sorted(second.losses) == [5, 6]
    assert [second.losses[s] for s in (5, 6)] == [ref.losses[s] for s in (5, 6)]
    assert [r["step"] for r in train_lines(tmp / "sigint")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_sigterm_to_jaxft_train_checkpoints_exits_75_and_resumes_exactly(reference):
    """A real SIGTERM to a running `jaxft train` (slowed to 0.5 s a step)."""
    tmp, ref = reference
    path = write_run_config(tmp, steps=6, name="sigterm", extra={"checkpoint.every": 100})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    code = f"import sys, trainutil; sys.exit(trainutil.cli_train_slowly({str(path)!r}, 0.5))"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp / "sigterm" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and '"step": 2, "kind": "train"' in metrics.read_text()):
        time.sleep(0.05)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    seconds = time.perf_counter() - t0
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    assert "Traceback" not in err
    saved = sorted(int(p.name) for p in (tmp / "sigterm" / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < 6, saved
    print(f"SIGTERM -> exit: {seconds:.2f} s (stopped after step {saved[0]})")
    assert main(["train", str(path)]) == 0
    lines = train_lines(tmp / "sigterm")
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in lines] == [ref.losses[s] for s in range(1, 7)]


def test_nonfinite_steps_are_dropped_then_the_run_stops_with_status_3(tmp_path, capsys):
    huge = {"optimizer.lr": 1e9, "optimizer.warmup_steps": 0, "optimizer.clip_norm": None,
            "optimizer.schedule": "constant", "train.max_nonfinite": 3, "checkpoint.every": 1}
    path = write_run_config(tmp_path, steps=8, name="nan", extra=huge)
    assert main(["train", str(path)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 4: training diverged (3 non-finite step(s) in a row" in err[0]
    run = tmp_path / "nan"
    raw = (run / "metrics.jsonl").read_text()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
            for line in raw.splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["skipped"] for r in train_rows] == [0.0, 1.0, 1.0, 1.0]
    assert train_rows[1]["loss"] is None  # NaN is written as null
    # step 1 was healthy and saved; steps 2-4 were not saved, so nothing healthy was rotated away
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_all_checkpoints_unreadable_is_an_error_unless_restart(reference, tmp_path):
    tmp, ref = reference
    run = tmp_path / "bad"
    shutil.copytree(ref.run_dir, run)  # a finished 6-step run, checkpoints at 2, 4, 6
    path = write_run_config(tmp, steps=6, name="bad-config")
    path.write_text(path.read_text().replace(str(tmp / "bad-config"), str(run)))
    cfg = load_config(path)
    for p in (run / "checkpoints").rglob("*"):
        if p.is_file() and p.stat().st_size > 0 and p.suffix != ".json" and "manifest" not in p.name:
            p.write_bytes(b"\0" * 10)
    before = tree_bytes(run)
    with pytest.raises(UnreadableCheckpoints, match=r"checkpoints: no checkpoint can be restored \(steps 6, 4, 2;"):
        train(cfg, base_dir=tmp)
    assert tree_bytes(run) == before  # nothing moved or written
    result = train(cfg, base_dir=tmp, restart=True)
    assert result.losses == ref.losses  # from step 0 again, exactly the original run
    aside = sorted(p.name for p in (run / "unreadable_checkpoints").iterdir())
    assert [a.split("-")[0] for a in aside] == ["2", "4", "6", "metrics"]
    assert [r["step"] for r in train_lines(run)] == [1, 2, 3, 4, 5, 6]


def test_more_steps_on_resume_keep_the_schedule_length():
    from jaxft.config.schema import Config, OptimizerConfig, TrainConfig, to_dict
    from jaxft.runs.resume import check_compatible
    from jaxft.train.optim import make_schedule

    class Saved:  # a run dir whose checkpoints hold `config`
        def __init__(self, config):
            self.config = config

        def steps(self):
            return [4]

        def read_config(self, step):
            return self.config

    first = check_compatible(_NoCheckpoints(), Config(train=TrainConfig(steps=4)), Path("r"))
    assert first.optimizer.decay_steps == 4  # fixed when the run starts, stored in its config
    longer = check_compatible(Saved(to_dict(first)), Config(train=TrainConfig(steps=6)), Path("r"))
    assert longer.optimizer.decay_steps == 4 and longer.train.steps == 6
    schedule = make_schedule(longer.optimizer, longer.train.steps)
    end_lr = OptimizerConfig().lr * OptimizerConfig().end_lr_ratio
    assert float(schedule(4)) == pytest.approx(end_lr) and float(schedule(5)) == pytest.approx(end_lr)
    # a run written before the length was stored keeps its own train.steps as the length
    legacy = to_dict(Config(train=TrainConfig(steps=4)))
    assert check_compatible(Saved(legacy), Config(train=TrainConfig(steps=6)), Path("r")).optimizer.decay_steps == 4
    # an explicit, different length on resume is a change of the run: refused
    with pytest.raises(ValueError, match=r"optimizer.decay_steps: 4 -> 6"):
        check_compatible(Saved(to_dict(first)), Config(optimizer=OptimizerConfig(decay_steps=6),
                                                       train=TrainConfig(steps=6)), Path("r"))


class _NoCheckpoints:
    def steps(self):
        return []


def test_cut_back_keeps_exactly_the_lines_up_to_the_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "kind": "train", "loss": 1.0}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "ki', encoding="utf-8")  # cut short by kill -9
    assert cut_back(path, 3) == 3
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    assert cut_back(path, 3) == 0  # idempotent, file untouched
    assert cut_back(path, 0) == 3 and path.read_text() == ""


def test_time_cadence_and_step_cadence(monkeypatch):
    from jaxft.config.schema import CheckpointConfig, Config, TrainConfig

    cfg = Config(checkpoint=CheckpointConfig(every=4, every_minutes=1.0), train=TrainConfig(steps=10))
    clock = [0.0]
    monkeypatch.setattr("jaxft.train.cadence.time.monotonic", lambda: clock[0])
    cadence = Cadence(cfg)
    saves = []
    for step in range(1, 11):
        clock[0] += 25.0  # 25 s a step: 60 s after the last save of either kind
        save, stop = cadence.after_step(step, 10)
        assert not stop
        saves.append(save)
    assert [s for s, save in zip(range(1, 11), saves) if save] == [3, 4, 7, 8, 10]


def test_guard_warns_on_a_loss_spike(caplog):
    from jaxft.config.schema import Config, TrainConfig

    run = SimpleNamespace(cfg=Config(train=TrainConfig(spike_factor=3.0, spike_window=20)), meta={},
                          dirs=None, fetched=[], unhealthy=False)
    guard = GuardHook()
    guard.on_start(run, None)
    run.fetched = [(s, {"loss": 2.0 + 0.01 * s, "skipped": 0.0}) for s in range(1, 13)]
    run.fetched.append((13, {"loss": 50.0, "skipped": 0.0}))
    with caplog.at_level(logging.WARNING):
        guard.after_step(run, 13, None, None)
    assert any("step 13: loss spike" in r.message for r in caplog.records)
    assert run.meta["loss_spikes"] == 1 and not run.unhealthy


def test_train_loop_script_resumes_only_on_status_75(tmp_path):
    script = Path(TESTS).parent / "tpu_scripts" / "train-loop.sh"
    fake = tmp_path / "fake-jaxft"
    counter = tmp_path / "calls"
    # exits 75 twice (preempted), then with the status given in $FINAL
    fake.write_text('#!/usr/bin/env bash\necho "$@" >> "%s"\nn=$(wc -l < "%s")\n'
                    '[ "$n" -le 2 ] && exit 75\nexit "$FINAL"\n' % (counter, counter))
    fake.chmod(0o755)
    env = dict(os.environ, JAXFT=str(fake), RESTART_DELAY="0")
    for final in (0, 3):
        counter.unlink(missing_ok=True)
        done = subprocess.run(["bash", str(script), "cfg.yaml", "--set", "a=1"], env={**env, "FINAL": str(final)},
                              capture_output=True, text=True)
        assert done.returncode == final
        assert counter.read_text().splitlines() == ["train cfg.yaml --set a=1"] * 3
    counter.unlink()
    done = subprocess.run(["bash", str(script), "cfg.yaml"], env={**env, "FINAL": "75", "MAX_RESTARTS": "4"},
                          capture_output=True, text=True)
    assert done.returncode == 75 and len(counter.read_text().splitlines()) == 5


def test_train_refuses_a_foreign_non_empty_run_dir(tmp_path, capsys):
    path = write_run_config(tmp_path, steps=2, name="x", extra={})
    cfg_text = path.read_text().replace(f"run_dir: {tmp_path / 'x'}", f"run_dir: {tmp_path}")
    path.write_text(cfg_text)  # run_dir = the folder holding the config and the corpus
    before = tree_bytes(tmp_path)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a jaxft run dir (no config.yaml)" in err[0]
    assert tree_bytes(tmp_path) == before


def test_guard_stop_mode_stops_at_the_first_nonfinite_step_and_skip_mode_resets_its_count():
    from jaxft.config.schema import Config, TrainConfig
    from jaxft.train.hooks import DivergedError

    def guard_run(**train):
        run = SimpleNamespace(cfg=Config(train=TrainConfig(**train)), meta={}, dirs=SimpleNamespace(checkpoints="c"),
                              fetched=[], unhealthy=False)
        guard = GuardHook()
        guard.on_start(run, None)
        return run, guard

    run, guard = guard_run(nonfinite="stop")
    run.fetched = [(1, {"loss": 2.0, "skipped": 0.0}), (2, {"loss": float("nan"), "skipped": 1.0})]
    with pytest.raises(DivergedError, match=r"step 2: training diverged \(1 non-finite step\(s\) in a row"):
        guard.after_step(run, 2, None, None)
    run, guard = guard_run(nonfinite="skip", max_nonfinite=2)
    for step, skipped in [(1, 1.0), (2, 0.0), (3, 1.0)]:  # never two in a row
        run.fetched = [(step, {"loss": float("nan") if skipped else 2.0, "skipped": skipped})]
        guard.after_step(run, step, None, None)
        assert run.unhealthy == bool(skipped)
    assert run.meta["skipped_steps"] == 2


def test_a_sigterm_recorded_during_start_up_stops_before_step_1(reference):
    """`jaxft train` records a SIGTERM that arrives before training installs its handler;
    the cadence takes it over: exit 75 before any step, nothing trained."""
    from jaxft.cli import _EarlySignal

    tmp, _ = reference
    early = _EarlySignal()
    early(signal.SIGTERM, None)
    previous = signal.signal(signal.SIGTERM, early)
    try:
        result = train(load_config(write_run_config(tmp, steps=6, name="early")), base_dir=tmp)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_status == PREEMPTED_EXIT and result.step == 0 and result.losses == {}
