"""jaxft.outputs and every writing command: an output never is, contains or lies
inside an input; an existing output is refused unless --overwrite (and a folder
jaxft did not write never is replaced); outputs appear atomically.  The CLI
tests run `jaxft.cli.main` in-process and fail before any model is loaded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from jaxft.cli import main
from jaxft.outputs import OutputError, check_output, read_jsonl, safe_output

from trainutil import write_run_config


def tree_digest(root: Path) -> dict[str, str]:
    """Every file (sha256 of its bytes), folder and link under `root`, by relative path."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".old")))


# --------------------------------------------------------------------------- jaxft.outputs


@pytest.fixture
def src(tmp_path) -> Path:
    d = tmp_path / "src"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "x.bin").write_bytes(b"\x00input")
    return d


@pytest.mark.parametrize("where, msg", [("same", "is an input"), ("inside", "lies inside an input"),
                                        ("parent", "contains an input")])
def test_overlap_with_an_input_is_refused(src, where, msg):
    out = {"same": src, "inside": src / "sub" / "new", "parent": src.parent}[where]
    before = tree_digest(src)
    with pytest.raises(OutputError, match=msg) as err:
        with safe_output(out, [src]):
            pytest.fail("entered the with block")
    assert str(out) in str(err.value) and "\n" not in str(err.value)
    assert tree_digest(src) == before and not leftovers(src.parent) and not leftovers(src / "sub")
    # a symlink to an input is the input; None and hub ids are not paths
    (src.parent / "link").symlink_to(src)
    with pytest.raises(OutputError, match="is an input"):
        check_output(src.parent / "link", [src])
    assert check_output(src.parent / "new", [None, "hf:org/name"]) == (src.parent / "new").resolve()


def test_existing_dir_and_file_are_refused_without_overwrite(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "params").write_text("old")
    (tmp_path / "f.model").write_text("old")
    for out, kind in ((tmp_path / "d", "dir"), (tmp_path / "f.model", "file")):
        with pytest.raises(OutputError, match=r"already exists; choose a new path or pass --overwrite"):
            with safe_output(out, kind=kind):
                pytest.fail("entered the with block")
    with pytest.raises(OutputError, match="is a file; refusing to replace it with a folder"):
        check_output(tmp_path / "f.model", overwrite=True, kind="dir")
    with pytest.raises(OutputError, match="is a folder; refusing to replace it with a file"):
        check_output(tmp_path / "d", overwrite=True, kind="file")
    assert (tmp_path / "d" / "params").read_text() == "old" and (tmp_path / "f.model").read_text() == "old"


def test_overwrite_replaces_atomically(tmp_path):
    out = tmp_path / "out"
    with safe_output(out) as tmp:
        assert tmp.is_dir() and not out.exists() and tmp.parent == out.parent.resolve()
        (tmp / "params").write_text("first")
        (tmp / "extra").write_text("only in the first")
    assert tree_digest(out).keys() == {"params", "extra"}
    with safe_output(out, overwrite=True) as tmp:
        (tmp / "params").write_text("second")
        assert (out / "params").read_text() == "first"  # the old output stays in place until the end
    assert sorted(p.name for p in out.iterdir()) == ["params"] and (out / "params").read_text() == "second"
    with safe_output(tmp_path / "tok.model", kind="file") as tmp:
        assert not tmp.exists()
        tmp.write_text("v1")
    with safe_output(tmp_path / "tok.model", kind="file", overwrite=True) as tmp:
        tmp.write_text("v2")
    assert (tmp_path / "tok.model").read_text() == "v2" and not leftovers(tmp_path)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failure_inside_the_with_leaves_the_old_output(tmp_path, overwrite):
    out = tmp_path / "out"
    if overwrite:
        with safe_output(out) as tmp:
            (tmp / "params").write_bytes(b"\x01old")
    before = tree_digest(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with safe_output(out, overwrite=overwrite) as tmp:
            (tmp / "params").write_bytes(b"half")
            raise RuntimeError("boom")
    assert tree_digest(tmp_path) == before and not leftovers(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with safe_output(tmp_path / "f", kind="file") as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert tree_digest(tmp_path) == before


def test_a_folder_jaxft_did_not_write_is_never_replaced(tmp_path):
    mine = tmp_path / "mine"
    (mine / "photos").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    before = tree_digest(mine)
    with pytest.raises(OutputError, match=r"is a folder jaxft did not write \(notes.txt, photos\); refusing"):
        with safe_output(mine, overwrite=True):
            pytest.fail("entered the with block")
    assert tree_digest(mine) == before and not leftovers(tmp_path)
    (tmp_path / "empty").mkdir()
    with safe_output(tmp_path / "empty", overwrite=True) as tmp:  # an empty folder holds nothing to lose
        (tmp / "eval.json").write_text("{}")
    assert (tmp_path / "empty" / "eval.json").is_file()


def test_an_interrupted_overwrite_is_undone(tmp_path):
    """Killed between moving the old output aside and renaming the new one: the next command
    puts the old one back before deciding anything."""
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "params").write_text("old")
    (tmp_path / ".out.partial").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        with safe_output(tmp_path / "out"):
            pass
    assert (tmp_path / "out" / "params").read_text() == "old"
    with safe_output(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "params").write_text("new")
    assert (tmp_path / "out" / "params").read_text() == "new" and not leftovers(tmp_path)


def test_eval_report_write_is_a_safe_output(tmp_path):
    from jaxft.eval.metrics import score_direction
    from jaxft.eval.report import EvalReport

    report = EvalReport({"en-de": score_direction(["Das ist ein Test."], ["Das ist ein Test."], tgt_lang="de")})
    (tmp_path / "data").mkdir()
    with pytest.raises(OutputError, match="--out .*lies inside an input"):
        report.write(tmp_path / "data" / "ev", inputs=[tmp_path / "data"], flag="--out")
    json_path, _ = report.write(tmp_path / "ev", inputs=[tmp_path / "data"], overwrite=False)
    with pytest.raises(OutputError, match="already exists"):
        report.write(tmp_path / "ev", overwrite=False)
    assert json.loads(json_path.read_text())["directions"]["en-de"]["bleu"] == pytest.approx(100.0)
    assert sorted(os.listdir(tmp_path)) == ["data", "ev"]


# --------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Inputs of every writing command under <ws>/in (nothing is loaded: refusals come first):
    two jaxft folders, a sparse diff, an HF folder, a run dir and an experiment config."""
    root = tmp_path_factory.mktemp("ws")
    inp = root / "in"
    for name in ("base", "ft"):
        (inp / name / "params" / "d").mkdir(parents=True)
        (inp / name / "params" / "d" / "0.bin").write_bytes(os.urandom(64))
        (inp / name / "model.yaml").write_text("model:\n  d_model: 16\n")
    (inp / "delta").mkdir()
    (inp / "delta" / "diff.json").write_text('{"format": "jaxft-sparse-diff"}')
    (inp / "hf").mkdir()
    (inp / "hf" / "config.json").write_text('{"model_type": "llama"}')
    (inp / "hf" / "model.safetensors").write_bytes(os.urandom(64))
    config = write_run_config(inp, steps=2, name="run")
    (inp / "run" / "checkpoints" / "2").mkdir(parents=True)
    (inp / "run" / "checkpoints" / "2" / "x").write_bytes(os.urandom(32))
    shutil.copyfile(config, inp / "run" / "config.yaml")
    (root / "taken").mkdir()
    (root / "taken" / "params").write_text("an earlier output")
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("not ours")
    (root / "taken.txt").write_text("a file")
    return root


COMMANDS = {  # argv given (inputs by name, out); the inputs an output may not overlap
    "compose": (lambda i, o: ["compose", i["base"], "+", i["delta"], "--out", o], ("base", "delta")),
    "compose-run": (lambda i, o: ["compose", i["run"], "--add", f"{i['delta']}*0.5", "--out", o], ("run", "delta")),
    "diff": (lambda i, o: ["diff", i["ft"], i["base"], "--out", o], ("ft", "base")),
    "hf-to-jaxft": (lambda i, o: ["convert", "hf-to-jaxft", i["hf"], o], ("hf",)),
    "jaxft-to-hf": (lambda i, o: ["convert", "jaxft-to-hf", i["base"], o], ("base",)),
    "export": (lambda i, o: ["export", i["run"], o], ("run",)),
    "eval": (lambda i, o: ["eval", i["run.yaml"], "--run-dir", i["run"], "--out", o],
             ("run", "run.yaml", "corpus/dev.eng_Latn", "corpus/train.rus_Cyrl")),  # + the config's data
}
CASES = {  # outs given (the inputs' paths, ws) -> (extra flags, what the one error line says)
    "is-input": (lambda paths, ws: paths, [], "is an input of this command"),
    "inside-input": (lambda paths, ws: [p / "sub" / "new" for p in paths], ["--overwrite"], "lies inside an input"),
    "contains-input": (lambda paths, ws: [ws / "in", ws] + [ws / "in" / "corpus"] * ("corpus" in str(paths)),
                       ["--overwrite"], "contains an input"),
    "exists": (lambda paths, ws: [ws / "taken", ws / "taken.txt"], [],
               "already exists; choose a new path or pass --overwrite"),
    "not-ours": (lambda paths, ws: [ws / "notes"], ["--overwrite"], "is a folder jaxft did not write"),
    "file-for-a-folder": (lambda paths, ws: [ws / "taken.txt"], ["--overwrite"],
                          "is a file; refusing to replace it with a folder"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", COMMANDS)
def test_commands_refuse_unsafe_outputs_and_touch_nothing(ws, command, case, capsys):
    argv, names = COMMANDS[command]
    by_name = {n: ws / "in" / n for n in ("base", "ft", "delta", "hf", "run", "run.yaml")}
    outs, flags, msg = CASES[case]
    before = tree_digest(ws)
    for out in outs([ws / "in" / n for n in names], ws):
        assert main([*map(str, argv(by_name, out)), *flags]) == 2, out
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("jaxft: "), err
        assert str(out) in err[0] and msg in err[0], err[0]
    assert tree_digest(ws) == before  # every input byte-identical, nothing added or left behind


def test_diff_overwrite_and_compose_over_its_base(tmp_path, capsys):
    """The reported bugs on real folders: `compose BASE + DIFF --out BASE` and `diff FT BASE --out
    BASE` are refused before anything is read or written; --overwrite replaces a diff in one step."""
    from flax import nnx

    from jaxft.config.schema import ModelConfig
    from jaxft.interop.convert import save_params, write_model_yaml
    from jaxft.models.registry import build_model
    from jaxft.peft import sparse

    tiny = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=32,
                       dtype="float32", max_seq_len=16)
    for name, seed in (("base", 0), ("ft", 1)):
        save_params(tmp_path / name / "params", nnx.state(build_model(tiny, rngs=nnx.Rngs(seed)), nnx.Param))
        write_model_yaml(tmp_path / name / "model.yaml", tiny)
    base, ft, delta = (str(tmp_path / n) for n in ("base", "ft", "delta"))
    inputs = {n: tree_digest(tmp_path / n) for n in ("base", "ft")}
    assert main(["diff", ft, base, "--out", delta]) == 0
    assert json.loads((tmp_path / "delta" / sparse.DIFF_JSON).read_text())["dense"]  # a dense diff
    for argv in (["diff", ft, base, "--out", delta], ["diff", ft, base, "--out", base],
                 ["compose", base, "+", delta, "--out", base], ["compose", base, "+", delta, "--out", delta]):
        capsys.readouterr()
        assert main(argv) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert main(["diff", ft, base, "--out", delta, "--sparse-k", "10", "--overwrite"]) == 0
    meta = json.loads((tmp_path / "delta" / sparse.DIFF_JSON).read_text())
    assert meta["count"] == 10 and not meta["dense"]  # replaced by the sparse one
    assert sorted(os.listdir(tmp_path)) == ["base", "delta", "ft"]  # no temporary or old folder left
    assert {n: tree_digest(tmp_path / n) for n in ("base", "ft")} == inputs


def test_read_jsonl_skips_a_line_cut_short_and_reads_a_missing_file_as_empty(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n[1, 2]\n\n{"step": 2, "lo')  # a list, a blank, a kill mid-line
    assert read_jsonl(path) == [{"step": 1, "loss": 2.5}]
    assert read_jsonl(tmp_path / "absent.jsonl") == []
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        read_jsonl(path, strict=True)
