"""Two local processes x 4 CPU devices (gloo collectives) train exactly like
one process x 8 devices, including a preemption checkpoint written by the two
processes (after SIGTERM to one of them) and restored by them in a second launch."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxft.config.loader import load_config
from jaxft.train.loop import train
from trainutil import read_jsonl

from trainutil import free_port, write_run_config

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # `make test` runs it alone, after the parallel pass
CONSTANT_LR = {"optimizer.schedule": "constant"}


def launch_two(cfg_path, overrides=(), *, slow: float = 0.0, sigterm_after_step: int | None = None,
               expect: int = 0, delay_second: float = 0.0):
    """`jaxft train` in two processes; optionally each step slowed by `slow` seconds,
    process 1 (only) sent SIGTERM once step `sigterm_after_step`'s metrics line exists,
    and process 1 starting training `delay_second` seconds after process 0."""
    port = free_port()
    tests = os.path.dirname(os.path.abspath(__file__))
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4".strip(), JAX_PLATFORMS="cpu",
               JAXFT_DEBUG="1", PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    sets = [a for o in overrides for a in ("--set", o)]
    procs = []
    for i in range(2):
        args = ["train", str(cfg_path), *sets, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                "--process-id", str(i)]
        delay = delay_second if i == 1 else 0.0
        code = (f"import sys, trainutil; sys.exit(trainutil.cli_train_slowly({args[1]!r}, {slow}, *{args[2:]!r}, "
                f"start_delay={delay}))")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    if sigterm_after_step is not None:
        metrics = Path(load_config(cfg_path).run_dir) / "metrics.jsonl"
        line = f'"step": {sigterm_after_step}, "kind": "train"'
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and line in metrics.read_text()):
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=600) for p in procs]
    # Both processes' stderr on failure: the one that failed first is not always process 0.
    report = "\n".join(f"--- process {i} (status {p.returncode}):\n{err[-4000:]}"
                       for i, (p, (_, err)) in enumerate(zip(procs, outs)))
    assert [p.returncode for p in procs] == [expect, expect], report


def test_two_processes_match_one_process_across_a_preemption(tmp_path):
    """SIGTERM to ONE of two processes: JAX's preemption sync makes both stop after
    the same step, write one checkpoint together and exit 75; a second launch, with one
    process starting 40 s late, restores it in both and ends with the losses of a 1-process run."""
    single = train(load_config(write_run_config(tmp_path, steps=8, name="single", extra=CONSTANT_LR)),
                   base_dir=tmp_path)
    multi_cfg = write_run_config(tmp_path, steps=8, name="multi", extra={**CONSTANT_LR, "checkpoint.every": 100})
    launch_two(multi_cfg, slow=0.3, sigterm_after_step=2, expect=75)
    saved = [int(p.name) for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 2 < saved[0] < 8, saved
    # Restores the preemption checkpoint in both processes and runs to step 8, process 1 arriving
    # 40 s late: longer than gloo's fixed 30 s deadline for setting up its communicators, which the
    # steps' compile-then-meet barrier keeps from starting until both processes are there.
    launch_two(multi_cfg, delay_second=40)
    rows = [r for r in read_jsonl(tmp_path / "multi" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 9))  # one line per step across the preemption
    for r in rows:
        assert r["loss"] == pytest.approx(single.losses[r["step"]], rel=1e-5, abs=1e-6), r["step"]
    dev = [r for r in read_jsonl(tmp_path / "multi" / "metrics.jsonl") if r["kind"] == "dev"]
    assert dev[-1]["dev_loss"] == pytest.approx(single.dev_after, rel=1e-5)
