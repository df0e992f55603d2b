"""Two local processes x 4 CPU devices (gloo collectives) train exactly like
one process x 8 devices, including a checkpoint written by the two processes
and restored by them in a second launch."""

import os
import socket
import subprocess
import sys

import pytest

from jaxft.config.loader import load_config
from jaxft.train.loop import train
from jaxft.train.metric_sinks import read_jsonl

from trainutil import write_run_config

pytestmark = pytest.mark.slow
CONSTANT_LR = {"optimizer.schedule": "constant"}  # so extending train.steps keeps the schedule


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(cfg_path, overrides=()):
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    sets = [a for o in overrides for a in ("--set", o)]
    procs = [subprocess.Popen([sys.executable, "-m", "jaxft.cli", "train", str(cfg_path), *sets,
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]


def test_two_processes_match_one_process(tmp_path):
    single = train(load_config(write_run_config(tmp_path, steps=6, name="single", extra=CONSTANT_LR)),
                   base_dir=tmp_path)
    multi_cfg = write_run_config(tmp_path, steps=4, name="multi", extra=CONSTANT_LR)
    launch_two(multi_cfg)  # steps 1-4, checkpoints at 2 and 4
    launch_two(multi_cfg, ["train.steps=6"])  # restores step 4 in both processes, runs 5-6
    rows = [r for r in read_jsonl(tmp_path / "multi" / "metrics.jsonl") if r["kind"] == "train"]
    losses = {r["step"]: r["loss"] for r in rows}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert losses[step] == pytest.approx(single.losses[step], rel=1e-5, abs=1e-6), step
    dev = [r for r in read_jsonl(tmp_path / "multi" / "metrics.jsonl") if r["kind"] == "dev"]
    assert dev[-1]["dev_loss"] == pytest.approx(single.dev_after, rel=1e-5)
