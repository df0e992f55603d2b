"""Experiment suites: expansion, running in dependency order, failure isolation, resuming."""

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from jaxft.config.errors import ConfigError
from jaxft.suite import runner
from jaxft.suite.spec import load_suite

from trainutil import write_run_config

EXPERIMENT = """\
run_dir: runs/x
model: {preset: tiny-llama, vocab_size: 256, d_model: 32, n_layers: 1, n_heads: 4, n_kv_heads: 2, mlp_dim: 64}
data:
  tokenizer: {train_vocab_size: 256}
  train: [{type: tsv, path: d.tsv, src_lang: en, tgt_lang: de}]
train: {steps: 4}
"""


def _suite(tmp_path, body: str, name="suite.yaml") -> Path:
    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def test_grid_zip_seeds_names_and_stage_references(tmp_path):
    path = _suite(tmp_path, """\
        suite_dir: out
        experiment: exp.yaml
        set: {train.steps: 3}
        stages:
          - name: adapt
            grid: {peft.method: [lora, sparse], optimizer.lr: [0.001, 0.003]}
            seeds: [0, 1]
            run_name: "{peft.method}-lr{optimizer.lr}-s{train.seed}"
          - name: pairs
            zip: {optimizer.lr: [0.1, 0.2], optimizer.warmup_steps: [1, 2]}
          - name: second
            set: {model.init_from: "run:{adapt.lora-lr0.001-s0}", train.steps: 5}
        """)
    suite = load_suite(path)
    ids = [r.id for r in suite.runs]
    assert len(ids) == 2 * 2 * 2 + 2 + 1 and ids[0] == "adapt.lora-lr0.001-s0" and ids[7] == "adapt.sparse-lr0.003-s1"
    assert ids[8:] == ["pairs.0.1-1", "pairs.0.2-2", "second.second"]
    first = suite.run("adapt.lora-lr0.001-s0")
    assert first.run_dir == tmp_path / "out" / "adapt.lora-lr0.001-s0"
    assert first.config.peft.method == "lora" and first.config.train.steps == 3
    assert first.config.train.seed == first.config.data.seed == 0 and suite.run("adapt.lora-lr0.001-s1").config.data.seed == 1
    assert first.config.run_dir == str(first.run_dir) and first.depends == ()
    second = suite.run("second.second")
    assert second.depends == ("adapt.lora-lr0.001-s0",)
    assert second.config.model.init_from == f"run:{first.run_dir}" and second.config.train.steps == 5
    assert suite.run("pairs.0.2-2").config.optimizer.warmup_steps == 2
    table = runner.plan_table(suite)
    assert "| second.second | adapt.lora-lr0.001-s0 |" in table
    commands = [c for c in runner.emit_commands(suite).splitlines() if not c.startswith("#")]
    assert len(commands) == 11 and commands[0].startswith("jaxft train ") and f"run_dir={first.run_dir}" in commands[0]


@pytest.mark.parametrize("body,message", [
    ("stages:\n  - name: a\n    grid: {train.seed: [1, 1]}\n", r"suite.yaml:\d+: stages\[0\]: two runs are named 'a.1'"),
    ("stages:\n  - name: a\n    set: {model.init_from: 'run:{b.b}'}\n  - name: b\n",
     r"\{b.b\}: a later stage or this one"),
    ("stages:\n  - name: a\n    set: {optimizer.lrr: 0.1}\n", r"suite.yaml:\d+: run a.a: .*optimizer.lrr: unknown key"),
    ("stages:\n  - name: a\n    zip: {train.seed: [1, 2], optimizer.lr: [0.1]}\n", r"zip axes must have equal lengths"),
    ("stages:\n  - name: a\n  - name: a\n", r"stage name 'a' is used twice"),
    ("stagez: []\n", r"suite.yaml:\d+: stagez: unknown key \(did you mean 'stages'\?\)"),
])
def test_bad_suites_are_one_line_errors_naming_the_file(tmp_path, body, message):
    path = _suite(tmp_path, "suite_dir: out\nexperiment: exp.yaml\n" + body)
    with pytest.raises(ConfigError, match=message) as e:
        load_suite(path)
    assert "\n" not in str(e.value)


FAKE_TRAIN = """\
import json, os, sys, time
args = sys.argv[1:]
sets = dict(a.split("=", 1) for a in args[args.index("train") + 2:][1::2])
run_dir = sets["run_dir"]
os.makedirs(run_dir, exist_ok=True)
calls = os.path.join(run_dir, "calls")
open(calls, "a").write("x")
if json.loads(sets.get("optimizer.lr", "0")) == 0.5:
    print("jaxft: data.train[0]: d.tsv: file does not exist", file=sys.stderr)
    sys.exit(2)
open(os.path.join(run_dir, "config.yaml"), "w").write(open(os.environ["FAKE_CONFIG"]).read())
open(os.path.join(run_dir, "metrics.jsonl"), "w").write(json.dumps({"step": 4, "kind": "train", "loss": 1.5}) + "\\n")
"""


def _fake(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    return [sys.executable, str(script)]


CHAIN = """\
suite_dir: out
experiment: exp.yaml
stages:
  - name: a
    grid: {optimizer.lr: [0.5, 0.1]}   # the fake trainers fail lr 0.5
  - name: b
    set: {model.init_from: "run:{a.0.5}"}
  - name: c
    set: {model.init_from: "run:{a.0.1}"}
"""


def test_a_failed_run_blocks_its_dependents_only_and_a_rerun_skips_done_runs(tmp_path, monkeypatch):
    path = _suite(tmp_path, CHAIN)
    suite = load_suite(path)
    monkeypatch.setattr(runner, "changed_since_done", lambda plan: [])
    env = dict(os.environ, FAKE_CONFIG=str(tmp_path / "exp.yaml"))
    result = runner.run_suite(suite, python=_fake(tmp_path), env=env)
    st = result.state
    assert st["a.0.5"]["status"] == "failed" and st["a.0.5"]["error"] == "jaxft: data.train[0]: d.tsv: file does not exist"
    assert st["a.0.1"]["status"] == "done" and st["c.c"]["status"] == "done"
    assert st["b.b"] == {"status": "blocked", "error": "needs a.0.5 (not done)"}
    assert result.exit_status == 0
    done_files = {p: p.read_bytes() for r in ("a.0.1", "c.c") for p in (suite.suite_dir / r).iterdir()}
    again = runner.run_suite(suite, python=_fake(tmp_path), env=env)  # done runs are skipped, untouched
    assert {p: p.read_bytes() for p in done_files} == done_files
    assert (suite.suite_dir / "a.0.5" / "calls").read_text() == "xx"  # the failed one was tried again
    assert again.state["b.b"]["status"] == "blocked"
    rows = {r["run"]: r for r in runner.status_rows(suite)}
    assert rows["c.c"]["state"] == "done" and rows["c.c"]["step"] == 4 and rows["c.c"]["loss"] == 1.5
    text = runner.format_status(list(rows.values()))
    assert "| a.0.5 | failed: jaxft: data.train[0]: d.tsv: file does not exist |" in text
    runner.run_suite(suite, python=_fake(tmp_path), env=env, only="a.*")
    assert (suite.suite_dir / "a.0.5" / "calls").read_text() == "xxx"
    assert not (suite.suite_dir / "b.b" / "calls").exists()  # a blocked run is never started


def test_a_run_left_running_by_a_killed_suite_shows_interrupted(tmp_path):
    path = _suite(tmp_path, "suite_dir: out\nexperiment: exp.yaml\nstages: [{name: a}]\n")
    suite = load_suite(path)
    suite.suite_dir.mkdir()
    (suite.suite_dir / runner.STATE_FILE).write_text(json.dumps({"a.a": {"status": "running", "pid": 2 ** 22 + 7}}))
    assert runner.status_rows(suite)[0]["state"] == "interrupted"


@pytest.mark.slow
def test_a_real_suite_runs_resumes_and_refuses_a_changed_finished_run(tmp_path):
    exp = write_run_config(tmp_path, steps=3, extra={"checkpoint.every": 3})
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text(yaml.safe_dump({
        "suite_dir": "suite", "experiment": exp.name,
        "stages": [{"name": "base", "seeds": [0]},
                   {"name": "more", "set": {"model.init_from": "run:{base.0}", "train.steps": 2}}]}))
    suite = load_suite(suite_path)
    result = runner.run_suite(suite)
    assert [result.state[r]["status"] for r in ("base.0", "more.more")] == ["done", "done"], result.state
    rows = {r["run"]: r for r in runner.status_rows(suite)}
    metrics = [json.loads(x) for x in (suite.suite_dir / "base.0" / "metrics.jsonl").read_text().splitlines()]
    last_train = [m for m in metrics if m["kind"] == "train"][-1]
    assert rows["base.0"]["step"] == 3 and rows["base.0"]["loss"] == last_train["loss"]
    assert rows["more.more"]["steps"] == 2 and rows["more.more"]["dev_loss"] is not None
    from jaxft.suite.report import write_report

    md, files = write_report(suite)
    report = json.loads((suite.suite_dir / "report" / "report.json").read_text())
    last_dev = [m for m in metrics if m["kind"] == "dev"][-1]["dev_loss"]
    assert report["runs"][0]["dev_loss"] == last_dev and report["runs"][0]["loss"] == last_train["loss"]
    assert (suite.suite_dir / "report" / "loss_curves.png").stat().st_size > 5000 and "| base.0 | done | 3/3 |" in md
    before = {p: p.stat().st_mtime_ns for p in (suite.suite_dir / "base.0").rglob("*") if p.is_file()}
    runner.run_suite(load_suite(suite_path))  # nothing to do: every file of the finished runs untouched
    assert {p: p.stat().st_mtime_ns for p in before} == before
    changed = yaml.safe_load(suite_path.read_text())
    changed["set"] = {"optimizer.lr": 0.5}
    suite_path.write_text(yaml.safe_dump(changed))
    refused = runner.run_suite(load_suite(suite_path), only="base.*")
    assert refused.state["base.0"]["status"] == "failed" and "optimizer.lr" in refused.state["base.0"]["error"]
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.slow
def test_a_suite_composes_two_earlier_runs_sparse_diffs(tmp_path):
    """LT-SFT language + task composition as one suite file: two sparse runs from the same
    initialisation, then a run with `peft.compose` of both diffs (one step at lr 0, only the
    final norm trainable): its weights are init + diff_a + diff_b, and the report shows each
    run's trainable size from params.json."""
    import numpy as np

    from jaxft.peft import sparse
    from jaxft.runs.export import run_checkpoint
    from jaxft.suite.report import write_report

    exp = write_run_config(tmp_path, steps=4, extra={"checkpoint.every": 4})
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text(yaml.safe_dump({
        "suite_dir": "suite", "experiment": exp.name,
        # one layer: every kind of parameter is still there, and its runs compile about half as much
        "set": {"peft.sparse": {"phase1_steps": 2, "k": 300}, "model.n_layers": 1},
        "stages": [
            {"name": "lang", "variants": {"a": {"peft.method": "sparse", "optimizer.lr": 0.01},
                                          "b": {"peft.method": "sparse", "optimizer.lr": 0.02}}},
            {"name": "both", "set": {"peft.compose": ["{lang.a}/sparse_diff", "{lang.b}/sparse_diff"],
                                     "optimizer.lr": 0.0, "optimizer.warmup_steps": 0, "train.steps": 1,
                                     "train.trainable": ["final_norm"]}}]}))
    suite = load_suite(suite_path)
    assert suite.run("both.both").depends == ("lang.a", "lang.b")
    result = runner.run_suite(suite, max_parallel=2)
    assert all(st["status"] == "done" for st in result.state.values()), result.state
    def flat(run):
        paths, leaves, _ = sparse.flat_with_paths(run_checkpoint(suite.suite_dir / run).params)
        return {p: np.asarray(x, np.float32) for p, x in zip(paths, leaves)}

    a, b, both = flat("lang.a"), flat("lang.b"), flat("both.both")
    dense = []
    for run in ("lang.a", "lang.b"):
        out = {k: np.zeros_like(v) for k, v in a.items()}
        for name, t in sparse.load_diff(suite.suite_dir / run / "sparse_diff").tensors.items():
            out[name].reshape(-1)[t.indices] = t.values
        dense.append(out)
    changed = 0
    for k in a:
        init = a[k] - dense[0][k]
        np.testing.assert_allclose(b[k] - dense[1][k], init, atol=1e-6)  # one initialisation
        np.testing.assert_allclose(both[k], init + dense[0][k] + dense[1][k], atol=1e-6, err_msg=k)
        changed += int((dense[0][k] != 0).sum())
    assert changed == 300
    md, _ = write_report(suite)
    report = json.loads((suite.suite_dir / "report" / "report.json").read_text())
    sizes = {r["run"]: r["trainable"] for r in report["runs"]}
    params = json.loads((suite.suite_dir / "lang.a" / "params.json").read_text())
    assert sizes["lang.a"] == 300 == params["updated"] and params["method"] == "sparse"
    assert 0 < sizes["both.both"] < 300  # the final norm only


@pytest.mark.slow
def test_kill_9_of_the_suite_mid_run_then_resume(tmp_path):
    """The suite process is SIGKILLed while its second run trains: that run gets SIGTERM (it
    never outlives its suite) and checkpoints; the rerun leaves the finished run's files
    byte-identical and finishes the interrupted one."""
    import signal
    import subprocess
    import time

    exp = write_run_config(tmp_path, steps=3, extra={"checkpoint.every": 1, "checkpoint.async_save": False})
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text(yaml.safe_dump({
        "suite_dir": "suite", "experiment": exp.name,
        # 20 steps, each with a synchronous checkpoint (~0.3 s): seconds of room for the kill after step 1
        "stages": [{"name": "first"}, {"name": "second", "set": {"train.steps": 20}}]}))
    suite = load_suite(suite_path)
    proc = subprocess.Popen([sys.executable, "-m", "jaxft.cli", "suite", "run", str(suite_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = suite.suite_dir / "second.second" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
        time.sleep(0.2)
    assert metrics.is_file(), "the second run never started training"
    child = runner.read_state(suite)["second.second"]["pid"]
    first = {p: p.read_bytes() for p in (suite.suite_dir / "first.first").rglob("*") if p.is_file()}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for _ in range(600):  # the run exits on its own (SIGTERM from the dead suite: checkpoint, exit 75)
        if not runner._alive(child):
            break
        time.sleep(0.2)
    assert not runner._alive(child), "the run outlived its killed suite"
    assert runner.status_rows(suite)[1]["state"] == "interrupted"
    result = runner.run_suite(load_suite(suite_path))
    assert result.state["second.second"]["status"] == "done"
    assert {p: p.read_bytes() for p in first} == first
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"kind": "train"' in x]
    assert steps == list(range(1, 21))  # resumed from its checkpoint: every step exactly once


FAKE_EVAL_TRAIN = """\
import json, os, sys
args = sys.argv[1:]
sets = {k: json.loads(v) if k != "run_dir" else v for k, v in (a.split("=", 1) for a in args[args.index("train") + 2:][1::2])}
run_dir = sets["run_dir"]
os.makedirs(run_dir, exist_ok=True)
lr, seed = sets.get("optimizer.lr", 0.1), sets.get("train.seed", 0)
rows = [{"step": s, "kind": "train", "loss": 5.0 - s * lr, "seq_tokens_per_s": 100.0 * s} for s in (1, 2, 3)]
rows.append({"step": 3, "kind": "dev", "dev_loss": {"en-de": 2.0 + seed, "en-yo": 3.0 + seed}})
rows.append({"step": 3, "kind": "eval", "scores": {"en-de": {"bleu": 10.0 + seed, "chrf": 40.0 + 10 * lr, "chrfpp": 38.0},
                                                   "en-yo": {"bleu": 2.0, "chrf": 20.0 + seed, "chrfpp": 18.0}},
             "average": {"chrf": 30.0 + seed}})
open(os.path.join(run_dir, "metrics.jsonl"), "w").write("".join(json.dumps(r) + "\\n" for r in rows))
"""


def _md_tables(md: str) -> dict[str, list[dict[str, str]]]:
    """'## Title' -> the rows of the Markdown table under it, as dicts by column."""
    out, title, head = {}, None, None
    for line in md.splitlines():
        if line.startswith("## "):
            title, head = line[3:], None
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if head is None:
                head = cells
                out[title] = []
            else:
                out[title].append(dict(zip(head, cells)))
    return out


def test_report_numbers_come_from_the_runs_metrics_with_seed_means_tiers_and_plots(tmp_path):
    from jaxft.suite.report import write_report

    (tmp_path / "exp.yaml").write_text(EXPERIMENT + "eval: {tier_high: [de], tier_low: [yo]}\n")
    path = tmp_path / "suite.yaml"
    path.write_text("suite_dir: out\nexperiment: exp.yaml\nstages:\n  - name: a\n"
                    "    grid: {optimizer.lr: [0.1, 0.2]}\n    seeds: [0, 1]\n")
    suite = load_suite(path)
    script = tmp_path / "fake_eval.py"
    script.write_text(FAKE_EVAL_TRAIN)
    runner.run_suite(suite, python=[sys.executable, str(script)], only="a.0.1-*")  # half of the suite
    md, files = write_report(suite, axis="optimizer.lr")
    tables = _md_tables(md)
    runs = {r["run"]: r for r in tables["Runs"]}
    assert set(runs) == {"a.0.1-0", "a.0.1-1", "a.0.2-0", "a.0.2-1"}
    row = runs["a.0.1-1"]
    assert row["state"] == "done" and row["step"] == "3/4" and row["loss"] == "4.7"
    assert row["avg_chrf"] == "31" and row["high_chrf"] == "41" and row["low_chrf"] == "21"
    assert row["tokens_per_s"] == "250"  # mean over logged steps after the first
    chrf = {r["run"]: r for r in tables["chrF per direction"]}
    assert chrf["a.0.1-1"]["en-de"] == "41" and chrf["a.0.1-1"]["en-yo"] == "21" and chrf["a.0.2-0"]["en-de"] == "-"
    assert {r["run"]: r for r in tables["Dev loss (nats / target token) per direction"]}["a.0.1-1"]["en-de"] == "3"
    assert runs["a.0.2-0"]["state"] == "pending" and runs["a.0.2-0"]["loss"] == "-"
    group = {r["group"]: r for r in tables["Mean ± std over seeds"]}["a.0.1"]
    assert group["runs"] == "2" and group["avg_chrf"] == "30.75 ± 0.35"  # seeds 0 and 1: (41+20)/2, (41+21)/2
    report = json.loads((suite.suite_dir / "report" / "report.json").read_text())
    assert report["runs"][1]["scores"]["en-de"]["bleu"] == 11.0
    csv_text = (suite.suite_dir / "report" / "report.csv").read_text().splitlines()
    assert csv_text[0].startswith("run,state,step,loss") and len(csv_text) == 5
    pngs = [f for f in files if f.suffix == ".png"]
    assert {f.name for f in pngs} == {"loss_curves.png", "chrf_by_tier.png", "avg_chrf_vs_optimizer_lr.png"}
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000 for f in pngs)
    status = {r["run"]: r for r in runner.status_rows(suite)}
    assert status["a.0.1-1"]["best"] == "chrf 31.00" and status["a.0.2-0"]["best"] is None
    with pytest.raises(ValueError, match="--axis model.d_model: not an axis"):
        write_report(suite, axis="model.d_model")


def test_paths_in_the_suite_file_are_relative_to_it(tmp_path):
    (tmp_path / "sub").mkdir()
    path = _suite(tmp_path, """\
        suite_dir: out
        experiment: exp.yaml
        set: {model.init_from: "run:runs/base", data.tokenizer.path: tok/spm.model, data.index_dir: /abs/idx}
        stages: [{name: a}]
        """, name="sub/../suite.yaml")
    cfg = load_suite(path).runs[0].config
    assert cfg.model.init_from == f"run:{tmp_path / 'runs/base'}"
    assert cfg.data.tokenizer.path == str(tmp_path / "tok/spm.model") and cfg.data.index_dir == "/abs/idx"


def test_variants_are_named_sets_of_overrides_and_source_paths_are_relative_to_the_suite(tmp_path):
    path = _suite(tmp_path, """\
        suite_dir: out
        experiment: exp.yaml
        set:
          data.dev: [{type: text, src_path: "corpus/dev.{src}", tgt_path: "corpus/dev.{tgt}", directions: [en-de]}]
        stages:
          - name: m
            variants:
              full: {peft.method: none, optimizer.lr: 1.0e-4}
              lora: {peft.method: lora, optimizer.lr: 3.0e-3}
            seeds: [0, 1]
          - name: one
            set: {"data.train[0].path": other.tsv}
        """)
    suite = load_suite(path)
    assert [r.id for r in suite.runs] == ["m.full-0", "m.full-1", "m.lora-0", "m.lora-1", "one.one"]
    lora = suite.run("m.lora-1").config
    assert lora.peft.method == "lora" and lora.optimizer.lr == 3e-3 and lora.train.seed == 1
    assert suite.run("m.full-0").axes == {"variant": "full", "seed": 0}
    assert lora.data.dev[0].src_path == str(tmp_path / "corpus/dev.{src}")  # {src}: the language, kept
    assert suite.runs[-1].config.data.train[0].path == str(tmp_path / "other.tsv")
    bad = _suite(tmp_path, """\
        suite_dir: out
        experiment: exp.yaml
        stages:
          - name: m
            grid: {optimizer.lr: [0.1, 0.2]}
            variants: {a: {optimizer.lr: 0.3}}
        """, name="bad.yaml")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: stages\[0\]: 'optimizer.lr' is an axis twice"):
        load_suite(bad)


SLOW_FAKE_TRAIN = """\
import json, os, re, sys, time
args = sys.argv[1:]
sets = dict(a.split("=", 1) for a in args[args.index("train") + 2:][1::2])
os.makedirs(sets["run_dir"], exist_ok=True)
t0 = time.time()
time.sleep(3.0)  # long enough that the second run starts before the first ends on a loaded machine
m = re.search(r"device_count=(\\d+)", os.environ.get("XLA_FLAGS", ""))
info = {"start": t0, "end": time.time(), "devices": int(m.group(1)) if m else None,
        "cpus": sorted(os.sched_getaffinity(0))}
open(os.path.join(sets["run_dir"], "info.json"), "w").write(json.dumps(info))
"""


def test_max_parallel_runs_independent_runs_at_once_each_on_its_share_of_the_devices(tmp_path):
    path = _suite(tmp_path, """\
        suite_dir: out
        experiment: exp.yaml
        stages:
          - name: a
            grid: {optimizer.lr: [0.1, 0.2, 0.3]}
          - name: b
            set: {model.init_from: "run:{a.0.1}"}
        """)
    suite = load_suite(path)
    script = tmp_path / "slow_fake.py"
    script.write_text(SLOW_FAKE_TRAIN)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_foo=1")
    result = runner.run_suite(suite, python=[sys.executable, str(script)], env=env, max_parallel=2, poll_s=0.05)
    assert all(st["status"] == "done" for st in result.state.values()) and len(result.state) == 4
    info = {r.id: json.loads((r.run_dir / "info.json").read_text()) for r in suite.runs}
    assert all(i["devices"] == 4 for i in info.values())  # 8 fake devices, 2 slots
    spans = sorted((i["start"], i["end"]) for i in info.values())
    overlaps = [sum(s < t0 < e for s, e in spans) for t0, _ in spans]
    assert max(overlaps) == 1  # two at a time, never three
    assert spans[1][0] < spans[0][1]  # the first two ran at the same time
    assert info["b.b"]["start"] >= info["a.0.1"]["end"]  # a dependent waits for its run
    if len(os.sched_getaffinity(0)) >= 2:  # the cores are split too
        assert not set(info["a.0.1"]["cpus"]) & set(info["a.0.2"]["cpus"])


def test_device_slots_split_gpus_and_refuse_a_tpu():
    slots = runner.device_slots(2, {"JAX_PLATFORMS": "cuda", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1", "2,3"]
    with pytest.raises(ValueError, match="--max-parallel 3: only 2 GPU"):
        runner.device_slots(3, {"JAX_PLATFORMS": "cuda", "CUDA_VISIBLE_DEVICES": "0,1"})
    with pytest.raises(ValueError, match="--max-parallel 2: not on tpu .*--emit-commands"):
        runner.device_slots(2, {"JAX_PLATFORMS": "tpu"})
    cpu = runner.device_slots(2, {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert [s.env["XLA_FLAGS"] for s in cpu] == ["--xla_force_host_platform_device_count=1"] * 2
    assert runner.device_slots(1, {"JAX_PLATFORMS": "tpu"})[0].env == {"JAX_PLATFORMS": "tpu"}


def test_emitted_commands_are_a_shell_script_with_each_runs_needs(tmp_path):
    path = _suite(tmp_path, """\
        suite_dir: out
        experiment: exp.yaml
        stages:
          - name: a
            grid: {optimizer.lr: [0.1, 0.2]}
          - name: b
            set: {model.init_from: "run:{a.0.1}"}
        """)
    suite = load_suite(path)
    lines = runner.emit_commands(suite).splitlines()
    assert lines[0] == "# run a.0.1" and lines[4] == "# run b.b needs a.0.1"
    assert lines[5].startswith("jaxft train ") and f"run_dir={suite.run('b.b').run_dir}" in lines[5]
    assert runner.emit_commands(suite, only="b.*").splitlines()[0] == "# run b.b needs a.0.1"
    assert "| a.0.2 |" not in runner.plan_table(suite, only="a.0.1")


def test_the_tpu_queue_runs_the_emitted_commands_in_order_skipping_done_and_blocked_runs(tmp_path):
    """tpu_scripts/run-queue.sh with a stand-in `jaxft train` (the real `jaxft suite run
    --emit-commands`): a preempted run is resumed (train-loop.sh), a failed run blocks only
    its dependents, a second pass skips what finished."""
    import subprocess

    path = _suite(tmp_path, CHAIN)
    calls = tmp_path / "calls"
    fake = tmp_path / "fake-jaxft"
    # `suite ...` is the real command; `train ...`: run a.0.1 is preempted once, a.0.5 fails
    fake.write_text(f"""#!/usr/bin/env bash
[ "$1" = suite ] && exec {sys.executable} -m jaxft.cli "$@"
run=$(printf '%s\\n' "$@" | sed -n 's|^run_dir=.*/||p')
echo "$run" >> {calls}
case $run in
  a.0.5) exit 2 ;;
  a.0.1) [ "$(grep -c '^a.0.1$' {calls})" -eq 1 ] && exit 75 ;;
esac
exit 0
""")
    fake.chmod(0o755)
    script = Path(__file__).parent.parent / "tpu_scripts" / "run-queue.sh"
    env = dict(os.environ, JAXFT=str(fake), RESTART_DELAY="0", QUEUE_STATE=str(tmp_path / "q"))
    done = subprocess.run(["bash", str(script), str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert calls.read_text().split() == ["a.0.5", "a.0.1", "a.0.1", "c.c"]
    q = tmp_path / "q"
    assert sorted(p.name for p in q.iterdir()) == ["a.0.1.done", "a.0.5.failed", "b.b.blocked", "c.c.done"]
    assert (q / "a.0.5.failed").read_text().strip() == "2" and "needs a.0.5" in (q / "b.b.blocked").read_text()
    again = subprocess.run(["bash", str(script), str(path), "--only", "a.*"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 1 and calls.read_text().split()[4:] == ["a.0.5"]  # done runs skipped


def test_the_shipped_suites_expand_to_the_studies_they_describe():
    """configs/suites/*.yaml load and expand (every run's config validated) without running."""
    suites = Path(__file__).parent.parent / "configs" / "suites"
    demo = load_suite(suites / "demo.yaml")
    assert [r.config.peft.method for r in demo.runs] == ["none", "none", "lora", "lora", "sparse", "sparse"]
    ml50 = load_suite(suites / "ml50.yaml")
    assert [r.id for r in ml50.runs] == ["bilingual.deu", "bilingual.rus", "bilingual.kor", "bilingual.heb",
                                         "m2m.T1.0", "m2m.T5.0"]
    kor = ml50.run("bilingual.kor").config
    assert [s.directions for s in kor.data.train] == [("eng_Latn-kor_Hang", "kor_Hang-eng_Latn")]
    assert kor.data.dev[0].directions == ("eng_Latn-kor_Hang",) and kor.data.train[0].max_examples == 300
    m2m = [ml50.run(f"m2m.T{t}").config for t in ("1.0", "5.0")]
    assert [c.data.temperature for c in m2m] == [1.0, 5.0] and len(m2m[0].data.dev[0].directions) == 4
    assert m2m[0].eval.tier_low == ("kor_Hang", "heb_Hebr")
    assert Path(kor.data.train[0].src_path).is_absolute() and "runs/demo/corpus" in kor.data.train[0].src_path
    alma = load_suite(suites / "alma.yaml")
    assert [r.id for r in alma.runs] == ["mono.mono", "parallel.from_base-none", "parallel.from_base-lora",
                                         "parallel.from_mono-none", "parallel.from_mono-lora"]
    assert alma.run("mono.mono").config.data.train[0].task == "lm"
    from_mono = alma.run("parallel.from_mono-lora")
    assert from_mono.depends == ("mono.mono",) and from_mono.config.peft.method == "lora"
    assert from_mono.config.model.init_from == f"run:{alma.run('mono.mono').run_dir}"
    assert alma.run("parallel.from_base-none").config.model.init_from.endswith("runs/demo/decoder")


def test_the_lang_adapt_suite_wires_the_ltsft_recipe_by_run_references(tmp_path):
    """configs/suites/lang_adapt.yaml, copied next to the four lang_adapt_*.yaml configs as its
    comment says: the composition of each step names the earlier runs' diffs."""
    import shutil

    root = Path(__file__).parent.parent / "configs"
    for p in [*root.glob("experiments/lang_adapt_*.yaml"), root / "suites" / "lang_adapt.yaml"]:
        shutil.copy(p, tmp_path / p.name)
    suite = load_suite(tmp_path / "lang_adapt.yaml")
    runs = {r.id: r for r in suite.runs}
    assert list(runs) == ["lang_src.lang_src", "lang_tgt.lang_tgt", "task.task", "zero_shot.zero_shot"]
    diff = lambda run: f"{suite.suite_dir / run}/sparse_diff"  # noqa: E731
    assert runs["task.task"].config.peft.compose == (diff("lang_src.lang_src"),)
    assert runs["zero_shot.zero_shot"].config.peft.compose == (diff("lang_tgt.lang_tgt"), diff("task.task"))
    assert runs["zero_shot.zero_shot"].depends == ("lang_tgt.lang_tgt", "task.task")
    assert runs["lang_tgt.lang_tgt"].depends == () and runs["lang_tgt.lang_tgt"].config.data.train[0].src_lang == "mai_Deva"
    assert runs["zero_shot.zero_shot"].config.optimizer.lr == 0.0
    assert runs["task.task"].config.data.train[0].src_path == str(tmp_path / "parallel/{src}-{tgt}.{src}")
