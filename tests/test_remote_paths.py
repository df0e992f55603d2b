"""Remote run dirs and inputs (gs://) through `jaxft.paths` (issue 15, item 4).

The first tests need nothing: URLs stay URLs (config loader, sources, run dirs) and the helpers
behave on local paths exactly as the code they replaced.  The rest run against a fake GCS: the
pure-Python `gcp-storage-emulator` (in this process) reached by gcsfs (etils.epath's backend
without TensorFlow) and by tensorstore (orbax's arrays), skipped when those packages are
missing.  The emulator omits the ``x-goog-generation`` header real GCS sends with every
download (tensorstore's OCDBT manifest reads need it), so the fixture adds it.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import yaml

from jaxft import paths
from jaxft.config.loader import load_config
from jaxft.data.readers import DataError
from jaxft.data.sources import expand_sources, open_source
from jaxft.runs.layout import RunDir

from trainutil import write_run_config

BUCKET = "gs://bucket"


# --------------------------------------------------------------------------- no store needed


def test_urls_and_local_paths():
    assert paths.is_remote("gs://b/run") and paths.is_remote("s3://b/x") and paths.is_remote(Path("x")) is False
    assert not paths.is_remote("file:///tmp/x") and not paths.is_remote("runs/x") and not paths.is_remote("hf:a/b")
    assert paths.as_path("runs/x") == Path("runs/x") and type(paths.as_path("runs/x")) is type(Path("runs/x"))
    assert paths.as_path("file:///tmp/x") == Path("/tmp/x")
    url = paths.as_path("gs://bucket/run")
    assert str(url) == "gs://bucket/run" and str(url / "checkpoints") == "gs://bucket/run/checkpoints"
    assert str(paths.as_path(url)) == "gs://bucket/run" and str(paths.absolute(url)) == "gs://bucket/run"
    assert paths.absolute("runs/x") == Path("runs/x").absolute()
    with pytest.raises(ValueError, match="unsupported URL scheme ftp://"):
        paths.as_path("ftp://host/x")
    assert str(paths.beside("gs://b/cfg/x.yaml", "../data/a.txt")) == "gs://b/data/a.txt"
    assert str(paths.beside("gs://b/cfg/x.yaml", "gs://c/y")) == "gs://c/y"
    assert paths.beside("/a/b/c.yaml", "../d") == Path("/a/d")


def test_config_keeps_urls_verbatim(tmp_path):
    """`gs://bucket/run` stays itself (not `./gs:/bucket/run`), from the file and from --set; data and
    tokenizer URLs are never resolved against the config's folder; relative paths still are."""
    cfg_path = write_run_config(tmp_path, steps=2)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["run_dir"] = "gs://bucket/run"
    raw["data"]["tokenizer"] = {"path": "gs://bucket/tok/sp.model"}
    raw["data"]["train"][0].update(src_path="gs://bucket/corpus/train.{src}", tgt_path="gs://bucket/corpus/train.{tgt}")
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path)
    assert cfg.run_dir == "gs://bucket/run" and cfg.data.tokenizer.path == "gs://bucket/tok/sp.model"
    assert cfg.data.train[0].src_path == "gs://bucket/corpus/train.{src}"
    assert cfg.data.dev[0].src_path == str(tmp_path / "corpus" / "dev.{src}")  # a relative path: resolved
    assert load_config(cfg_path, ["run_dir=gs://bucket/other"]).run_dir == "gs://bucket/other"
    (src, *_) = expand_sources(cfg.data.train, tmp_path)
    assert (src.src_path, src.tgt_path) == ("gs://bucket/corpus/train.eng_Latn", "gs://bucket/corpus/train.deu_Latn")
    rd = RunDir(cfg.run_dir)
    assert str(rd.config) == "gs://bucket/run/config.yaml" and str(rd.checkpoint_dir("best")) == "gs://bucket/run/best"
    assert RunDir(tmp_path / "r").root == tmp_path / "r"


def test_local_paths_through_the_helpers(tmp_path):
    """The helpers on local paths (what every local run goes through): atomic writes leave no
    temporary file, copies and moves of folders, staging is the target itself."""
    target = tmp_path / "a" / "f.txt"
    target.parent.mkdir()
    paths.write_atomic(target, b"one")
    paths.write_atomic(target, b"two")
    assert target.read_bytes() == b"two" and sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "g").write_text("g")
    paths.copy(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "sub" / "g").read_text() == "g" and (tmp_path / "b" / "f.txt").read_bytes() == b"two"
    paths.move(tmp_path / "b", tmp_path / "c")
    assert not (tmp_path / "b").exists() and (tmp_path / "c" / "f.txt").is_file()
    paths.remove(tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert paths.local_copy(target) == target
    with paths.staged(tmp_path / "d") as out:
        assert out == tmp_path / "d"
    with pytest.raises(DataError, match="must be a local folder"):
        from jaxft.data.index import cache_root

        cache_root("gs://bucket/index")


def test_commands_writing_local_files_refuse_a_url_output(capsys):
    """An OUT written with local-file APIs (safetensors, SentencePiece) is refused when it is a URL,
    instead of becoming a local `gs:/...` folder."""
    from jaxft.cli import main

    for argv in (["convert", "jaxft-to-hf", "src", "gs://bucket/out"], ["export", "gs://bucket/run", "gs://b/out"],
                 ["tokenizer", "train", "a.txt", "--out", "gs://b/sp.model", "--vocab-size", "100"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "must be a local path" in capsys.readouterr().err
    assert not Path("gs:").exists()


# --------------------------------------------------------------------------- a fake GCS


def _start_emulator(port: int):
    import http.server
    import types

    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    plain = objects.download

    def download(request, response, storage, *args, **kwargs):  # + the generation header real GCS sends
        plain(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
        except Exception:  # noqa: BLE001 - not found: the handler set the status
            pass

    class Quiet(http.server.HTTPServer):
        def handle_error(self, request, client_address):  # clients closing early are not test failures
            pass

    objects.download = download  # `get ... ?alt=media` calls it by name
    for _, table in server.HANDLERS:
        for method, fn in list(table.items()):
            if fn is plain:
                table[method] = download
    server.server = types.SimpleNamespace(HTTPServer=Quiet, BaseHTTPRequestHandler=http.server.BaseHTTPRequestHandler)
    emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
    emulator.start()
    return emulator


@pytest.fixture(scope="module")
def gcs():
    """A fake GCS bucket `gs://bucket` for this module (gcsfs for etils.epath, tensorstore for orbax)."""
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    import logging

    import fsspec
    import gcsfs.core
    from etils.epath import backend

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "FSSPEC_GCS_TOKEN": "anon",
           "FSSPEC_GCS_PROJECT": "test", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for name in ("gs", "gcs"):  # the plain client (no gRPC bucket-type probe)
            fsspec.register_implementation(name, gcsfs.core.GCSFileSystem, clobber=True)
        gcsfs.core.GCSFileSystem.clear_instance_cache()
        type(backend.fsspec_backend)._get_filesystem.cache_clear()
        emulator = _start_emulator(port)
        try:
            yield BUCKET
        finally:
            emulator.stop()
            gcsfs.core.GCSFileSystem.clear_instance_cache()
            type(backend.fsspec_backend)._get_filesystem.cache_clear()


def test_paths_on_gcs(gcs, tmp_path):
    """Atomic replace = one object write; folders copy both ways; a move is copy + delete; a local
    copy is made once per URL + size + mtime (a changed object gets a new one)."""
    f = f"{gcs}/t/one.txt"
    paths.write_atomic(f, b"first")
    paths.write_atomic(f, b"second")
    assert paths.as_path(f).read_bytes() == b"second" and paths.lexists(f)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "x").write_text("x")
    (tmp_path / "d" / "y").write_text("y")
    with paths.staged(f"{gcs}/t/d") as out:
        assert not paths.is_remote(out)
        paths.copy(tmp_path / "d", out)
    paths.move(f"{gcs}/t/d", f"{gcs}/t/e")
    assert not paths.as_path(f"{gcs}/t/d").exists()
    local = paths.local_copy(f"{gcs}/t/e")
    assert (local / "sub" / "x").read_text() == "x" and (local / "y").read_text() == "y"
    first = paths.local_copy(f)
    assert first.read_bytes() == b"second" and paths.local_copy(f) == first
    paths.write_atomic(f, b"third!")
    assert paths.local_copy(f) != first and paths.local_copy(f).read_bytes() == b"third!"
    paths.remove(f"{gcs}/t")
    assert not paths.as_path(f"{gcs}/t").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        paths.local_copy(f"{gcs}/nothing/here")


def test_a_config_on_gcs_with_a_base_overlay_from_the_cli(gcs, capsys):
    """`jaxft config show gs://.../exp.yaml`: the URL reaches the loader intact (not `gs:/...`),
    its `base:` overlay is read beside it, and relative data paths resolve under its folder."""
    from jaxft.cli import main

    paths.write_atomic(f"{gcs}/cfg/base.yaml", b"model: {preset: tiny-llama, n_layers: 3}\noptimizer: {lr: 0.01}\n")
    paths.write_atomic(f"{gcs}/cfg/exp.yaml", yaml.safe_dump({
        "base": "base.yaml", "run_dir": f"{gcs}/run", "optimizer": {"lr": 0.02},
        "data": {"train": [{"type": "text", "src_path": "../corpus/a.{src}", "tgt_path": "../corpus/a.{tgt}",
                            "directions": ["eng_Latn-deu_Latn"]}]}}).encode())
    assert main(["config", "show", f"{gcs}/cfg/exp.yaml", "--set", "train.steps=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["n_layers"] == 3 and shown["optimizer"]["lr"] == 0.02 and shown["train"]["steps"] == 7
    assert shown["data"]["train"][0]["src_path"] == f"{gcs}/corpus/a.{{src}}" and shown["run_dir"] == f"{gcs}/run"
    assert main(["config", "show", f"{gcs}/cfg/missing.yaml"]) == 2
    assert f"{gcs}/cfg/missing.yaml" in capsys.readouterr().err


def test_compose_reads_sparse_diffs_from_gcs(gcs, tmp_path):
    """`peft.compose` / `compose_into` with diffs on gs:// composes what the local diffs compose."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxft.config.schema import SparseConfig
    from jaxft.models import build_model
    from jaxft.peft import sparse
    from jaxft.peft.compose import compose_into
    from test_peft_sparse import TINY, perturbed

    theta0 = nnx.state(build_model(TINY, rngs=nnx.Rngs(0)), nnx.Param)
    cfg = SparseConfig(k=0.05)
    lang = perturbed(theta0, 1, 0.1)
    local = sparse.save_diff(tmp_path / "lang", lang, theta0, sparse.select_mask(lang, theta0, cfg, seed=0), cfg)
    paths.copy(local, f"{gcs}/diffs/lang")
    models = [build_model(TINY, rngs=nnx.Rngs(0)) for _ in range(2)]
    compose_into(models[0], [f"{local} * 0.5"])
    compose_into(models[1], [f"{gcs}/diffs/lang * 0.5"])
    a, b = (jax.tree.leaves(nnx.state(m, nnx.Param)) for m in models)
    assert any(not np.array_equal(x, y) for x, y in zip(a, jax.tree.leaves(theta0)))  # it changed the model
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compose_into(models[1], [f"{gcs}/diffs/nope"])


def test_tokenizer_data_and_outputs_on_gcs(gcs, tmp_path):
    """A SentencePiece model and text / JSONL sources read from gs:// give what the local files
    give; a record source there is a one-line error; safe_output writes a folder there."""
    from jaxft.config.schema import SourceConfig, TokenizerConfig
    from jaxft.data.tokenizer import Tokenizer, train_tokenizer
    from jaxft.outputs import OutputError, atomic_write_text, safe_output

    texts = [f"line {i} of a small corpus with words {i * 7 % 13}" for i in range(200)]
    tok = train_tokenizer(texts, f"{gcs}/tok/sp.model", TokenizerConfig(train_vocab_size=300))
    assert tok.path == f"{gcs}/tok/sp.model" and paths.as_path(tok.path).is_file()
    assert Tokenizer.load(f"{gcs}/tok/sp.model").encode(texts[3]) == tok.encode(texts[3])
    (tmp_path / "a.txt").write_text("\n".join(texts[:20]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(t.upper() for t in texts[:20]) + "\n")
    paths.copy(tmp_path / "a.txt", f"{gcs}/corpus/a.txt")
    paths.copy(tmp_path / "b.txt", f"{gcs}/corpus/b.txt")
    pair = dict(type="text", src_lang="eng_Latn", tgt_lang="deu_Latn", name="x")
    local = open_source(SourceConfig(src_path=str(tmp_path / "a.txt"), tgt_path=str(tmp_path / "b.txt"), **pair))
    remote = open_source(SourceConfig(src_path=f"{gcs}/corpus/a.txt", tgt_path=f"{gcs}/corpus/b.txt", **pair))
    assert len(remote) == len(local) == 20 and [remote[i].src for i in range(20)] == [local[i].src for i in range(20)]
    rows = [json.dumps({"text": t}) for t in texts[:5]]
    paths.write_atomic(f"{gcs}/corpus/c.jsonl", ("\n".join(rows) + "\n").encode())
    lm = open_source(SourceConfig(type="jsonl", task="lm", path=f"{gcs}/corpus/c.jsonl", name="c"))
    assert len(lm) == 5
    with pytest.raises(DataError, match="reads local files only"):
        open_source(SourceConfig(type="parquet", path=f"{gcs}/corpus/d.parquet", name="d", src_lang="eng_Latn",
                                 tgt_lang="deu_Latn"))
    out = f"{gcs}/reports/r"
    for text in ("1", "2"):
        with safe_output(out, [tmp_path], overwrite=True) as tmp:
            atomic_write_text(tmp / "eval.json", text)
    assert (paths.as_path(out) / "eval.json").read_text() == "2"
    assert sorted(p.name for p in paths.as_path(f"{gcs}/reports").iterdir()) == ["r"]  # no .partial / .old left
    with pytest.raises(OutputError, match="already exists"):
        with safe_output(out, []):
            pass


@pytest.mark.slow
def test_train_resume_and_restore_on_gcs(gcs, tmp_path):
    """`jaxft train` with `run_dir: gs://bucket/run` and its text data on gs://: the tokenizer it
    trains, config.yaml, params.json, metrics and checkpoints are written there; a second
    invocation resumes from the checkpoint (the metrics line of a step logged after it, as a kill
    would leave, is dropped: one line per step), the run restores for inference (`jaxft translate`
    / `eval`'s loader) and `jaxft export` writes it to a local folder."""
    from jaxft.eval.translate import load_translator
    from jaxft.runs.export import export_run
    from jaxft.train.loop import train
    from trainutil import read_jsonl

    cfg_path = write_run_config(tmp_path, steps=5)
    paths.copy(tmp_path / "corpus", f"{gcs}/corpus")
    raw = yaml.safe_load(cfg_path.read_text())
    raw["run_dir"] = f"{gcs}/run"
    for section in ("train", "dev"):
        for src in raw["data"][section]:
            src.update(src_path=f"{gcs}/{src['src_path']}", tgt_path=f"{gcs}/{src['tgt_path']}")
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path)
    first = train(cfg, base_dir=tmp_path, stop_after=3)  # checkpoints at 2 and 3
    run = paths.as_path(cfg.run_dir)
    assert first.step == 3 and {"config.yaml", "params.json", "tokenizer.model", "metrics.jsonl", "tb",
                                "checkpoints"} <= {p.name for p in run.iterdir()}
    assert not Path("gs:").exists() and not (tmp_path / "gs:").exists()  # nothing written under ./gs:/
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + json.dumps({"step": 4, "kind": "train", "loss": 0.0}) + "\n")
    second = train(cfg, base_dir=tmp_path)
    assert sorted(second.losses) == [4, 5] and second.step == 5
    rows = [(r["step"], r["kind"]) for r in read_jsonl(metrics)]
    assert [s for s, k in rows if k == "train"] == [1, 2, 3, 4, 5]
    assert all(r["loss"] > 0 for r in read_jsonl(metrics) if r["kind"] == "train")  # the fake step-4 line is gone
    assert len(list((run / "tb").iterdir())) == 2  # one event file per invocation
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [3, 4, 5]
    translator, run_cfg = load_translator(cfg.run_dir)
    assert run_cfg.run_dir == f"{gcs}/run" and translator.tokenizer.vocab_size <= 512
    out = export_run(cfg.run_dir, tmp_path / "exported")
    assert (out / "model.yaml").is_file() and (out / "params").is_dir()
    assert (out / "tokenizer" / "tokenizer.model").is_file()
    assert os.environ["STORAGE_EMULATOR_HOST"]  # (the fixture's store, not GCS)
