"""Malformed inputs reachable from the CLI: one line on stderr naming the culprit, exit 2,
no traceback, and every input byte-identical afterwards.  All in-process (`main([...])`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx

from jaxft.cli import main
from jaxft.config.schema import ModelConfig, TokenizerConfig
from jaxft.data.tokenizer import train_tokenizer
from jaxft.interop import hf as hf_mod
from jaxft.interop.hf import abstract_params, save_hf

LINES = [f"{w} the quick brown fox {i} jumps over the lazy dog" for i, w in enumerate("abcdefgh" * 4)]
TINY = ModelConfig(family="decoder", vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=32,
                   max_seq_len=32, dtype="float32")
K_PROJ = "model.layers.0.self_attn.k_proj.weight"  # [8, 16]: transposed, it still has 128 values


# --------------------------------------------------------------------------- helpers


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under ``roots`` (or the file itself), by path, with its bytes."""
    out = {}
    for root in roots:
        for p in ([root] if root.is_file() else sorted(root.rglob("*"))):
            if p.is_file():
                out[str(p)] = p.read_bytes()
    return out


def fails(capsys, argv: list[str], *needles: str, status: int = 2) -> str:
    """Run the CLI; it must return ``status`` with exactly one stderr line naming every needle."""
    assert main([str(a) for a in argv]) == status
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxft: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sp") / "sp.model"
    train_tokenizer(LINES, path, TokenizerConfig(train_vocab_size=60, byte_fallback=False))
    return path


@pytest.fixture(scope="module")
def hf_template(tmp_path_factory, sp_model) -> Path:
    """A tiny LLaMA-style HF folder (config.json, model.safetensors, tokenizer.model)."""
    flat, _ = abstract_params(TINY)  # random numpy weights: no (slow) eager initialisation
    rng = np.random.default_rng(0)
    params = nnx.from_flat_state([(p, v.replace(rng.normal(0, 0.02, v.shape).astype(np.float32))) for p, v in flat])
    return save_hf(TINY, params, tmp_path_factory.mktemp("hf") / "hf", tokenizer_path=sp_model)


@pytest.fixture
def hf_dir(tmp_path, hf_template) -> Path:
    out = tmp_path / "hf"
    out.mkdir()
    for p in hf_template.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


def translate(source, *extra) -> list[str]:
    return ["translate", str(source), "--src-lang", "eng_Latn", "--tgt-lang", "deu_Latn", *extra]


def write_corpus(tmp: Path) -> None:
    (tmp / "train.en").write_text("\n".join(LINES[:8]) + "\n", encoding="utf-8")
    (tmp / "train.de").write_text("\n".join(reversed(LINES[:8])) + "\n", encoding="utf-8")


def train_config(tmp: Path, *, tokenizer: dict, model: dict | None = None, data: dict | None = None) -> Path:
    """A tiny `jaxft train` config over train.en / train.de in ``tmp``."""
    write_corpus(tmp)
    cfg = {
        "run_dir": str(tmp / "run"),
        "model": {"preset": "tiny-llama", "vocab_size": 64, "d_model": 16, "n_layers": 1, "n_heads": 2,
                  "n_kv_heads": 1, "mlp_dim": 32, "max_seq_len": 32, **(model or {})},
        "data": {"tokenizer": tokenizer, "seq_len": 32,
                 "train": [{"type": "text", "src_path": "train.en", "tgt_path": "train.de",
                            "src_lang": "eng_Latn", "tgt_lang": "deu_Latn"}], **(data or {})},
        "train": {"steps": 1, "global_batch": 8, "progress_bar": False},
        "optimizer": {"warmup_steps": 0},
    }
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- 1. corrupt SentencePiece models


@pytest.mark.parametrize("content, why", [(os.urandom(300), "cannot be parsed"), (b"", "empty")],
                         ids=["random", "empty"])
def test_corrupt_sentencepiece_in_config(tmp_path, capsys, content, why):
    (tmp_path / "bad.model").write_bytes(content)
    cfg = train_config(tmp_path, tokenizer={"path": "bad.model"})
    before = snapshot(tmp_path / "bad.model", cfg, tmp_path / "train.en")
    fails(capsys, ["train", cfg], "bad.model", "not a SentencePiece model", why)
    assert snapshot(tmp_path / "bad.model", cfg, tmp_path / "train.en") == before


@pytest.mark.parametrize("content", [os.urandom(300), b""], ids=["random", "empty"])
def test_corrupt_sentencepiece_in_hf_folder(hf_dir, capsys, content):
    (hf_dir / "tokenizer.model").write_bytes(content)
    (hf_dir.parent / "in.txt").write_text("hello\n", encoding="utf-8")
    before = snapshot(hf_dir.parent)
    fails(capsys, translate(hf_dir, "--input", hf_dir.parent / "in.txt"), "tokenizer.model",
          "not a SentencePiece model")
    assert snapshot(hf_dir.parent) == before


# --------------------------------------------------------------------------- 2. vocabulary too small


def test_tokenizer_train_vocab_too_small(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("hello world\nüñíçødé 漢字テキスト\n", encoding="utf-8")
    before = snapshot(tmp_path)
    line = fails(capsys, ["tokenizer", "train", text, "--out", tmp_path / "tok.model", "--vocab-size", "5"],
                 "--vocab-size=5", "text.txt", "too small", "byte-fallback")
    assert re.search(r"at least 2\d\d pieces for it \(\d+ distinct characters", line), line
    assert snapshot(tmp_path) == before  # no tok.model, no leftover temporary file


def test_config_train_vocab_too_small(tmp_path, capsys):
    cfg = train_config(tmp_path, tokenizer={"train_vocab_size": 8, "byte_fallback": False})
    before = snapshot(cfg, tmp_path / "train.en", tmp_path / "train.de")
    fails(capsys, ["train", cfg], "data.tokenizer.train_vocab_size=8", "too small", "distinct characters")
    assert snapshot(cfg, tmp_path / "train.en", tmp_path / "train.de") == before
    assert not (tmp_path / "run" / "tokenizer.model").exists()


def test_tokenizer_train_safe_output(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    out = tmp_path / "tok.model"
    argv = ["tokenizer", "train", text, "--out", out, "--vocab-size", "300"]
    assert main([str(a) for a in argv]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt", "tok.model"]  # no .vocab, no temp
    before = snapshot(tmp_path)
    capsys.readouterr()
    fails(capsys, argv, "--out", "tok.model", "already exists")
    fails(capsys, ["tokenizer", "train", text, "--out", text, "--vocab-size", "300"], "is an input")
    assert snapshot(tmp_path) == before
    assert main([str(a) for a in argv + ["--overwrite"]]) == 0
    assert snapshot(tmp_path) == before  # deterministic training: the same bytes


# --------------------------------------------------------------------------- 3. YAML with NUL / non-UTF-8


@pytest.mark.parametrize("content, needles", [
    (b"run_dir: runs/x\nseed: 1\x00\n", ("exp.yaml:2", "NUL byte")),
    (b"run_dir: runs/x\n# caf\xe9\n", ("exp.yaml:2", "not valid UTF-8", "0xe9")),
], ids=["nul", "latin1"])
def test_yaml_bad_bytes(tmp_path, capsys, content, needles):
    (tmp_path / "exp.yaml").write_bytes(content)
    fails(capsys, ["config", "show", tmp_path / "exp.yaml"], *needles)
    assert (tmp_path / "exp.yaml").read_bytes() == content


# --------------------------------------------------------------------------- 4. truncated safetensors


@pytest.mark.parametrize("cut, why", [(lambda b: b[:20], "header should be"), (lambda b: b[:-10], "truncated")],
                         ids=["header", "data"])
def test_truncated_safetensors(hf_dir, capsys, cut, why):
    st = hf_dir / "model.safetensors"
    st.write_bytes(cut(st.read_bytes()))
    before = snapshot(hf_dir)
    fails(capsys, ["convert", "hf-to-jaxft", hf_dir, hf_dir.parent / "out"], "model.safetensors", why)
    assert snapshot(hf_dir) == before


# --------------------------------------------------------------------------- 5. garbage config.json


@pytest.mark.parametrize("content, why", [
    (b"{not json", "not valid config.json"),
    (b"[1, 2]", "expected an object"),
    (b'{"hidden_size": 16}', "no 'model_type'"),
    (b'{"model_type": "llama", "hidden_size": "big"}', "config.json"),
    (b'{"model_type": "llama", \xff}', "invalid UTF-8"),
], ids=["not-json", "list", "no-model-type", "bad-value", "not-utf8"])
@pytest.mark.parametrize("command", ["convert", "translate"])
def test_garbage_config_json(hf_dir, capsys, content, why, command):
    (hf_dir / "config.json").write_bytes(content)
    before = snapshot(hf_dir)
    argv = ["convert", "hf-to-jaxft", hf_dir, hf_dir.parent / "out"] if command == "convert" else translate(hf_dir)
    fails(capsys, argv, hf_dir / "config.json", why)
    assert snapshot(hf_dir) == before


# --------------------------------------------------------------------------- 6. tensor of the wrong shape


@pytest.mark.parametrize("shape", [(16, 8), (8, 8)], ids=["transposed", "wrong-size"])
def test_wrong_tensor_shape(hf_dir, capsys, shape):
    from safetensors.numpy import load_file, save_file

    st = hf_dir / "model.safetensors"
    tensors = load_file(str(st))
    tensors[K_PROJ] = np.zeros(shape, np.float32)
    save_file(tensors, str(st), metadata={"format": "pt"})
    before = snapshot(hf_dir)
    fails(capsys, ["convert", "hf-to-jaxft", hf_dir, hf_dir.parent / "out"], "model.safetensors", K_PROJ,
          str(list(shape)), "[8, 16]")
    assert snapshot(hf_dir) == before


# --------------------------------------------------------------------------- 7. invalid UTF-8 in text inputs


def test_translate_input_invalid_utf8(hf_dir, capsys):
    src = hf_dir.parent / "in.txt"
    src.write_bytes(b"fine\nalso fine\nbad \xff here\n")
    before = snapshot(hf_dir.parent)
    fails(capsys, translate(hf_dir, "--input", src), "in.txt:3", "invalid UTF-8", "0xff")
    assert snapshot(hf_dir.parent) == before


def test_tokenizer_train_input_invalid_utf8(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"ok\n\nbad \xc3\x28 here\n")
    before = snapshot(tmp_path)
    fails(capsys, ["tokenizer", "train", tmp_path / "a.txt", tmp_path / "b.txt", "--out", tmp_path / "t.model",
                   "--vocab-size", "300"], "b.txt:3", "invalid UTF-8")
    assert snapshot(tmp_path) == before


def test_training_data_invalid_utf8(tmp_path, capsys):
    cfg = train_config(tmp_path, tokenizer={"train_vocab_size": 60, "byte_fallback": False},
                       data={"bad_lines": "error"})
    (tmp_path / "train.de").write_bytes(b"eins\nzwei \xff\n" + b"drei\n" * 6)
    before = snapshot(cfg, tmp_path / "train.en", tmp_path / "train.de")
    fails(capsys, ["train", cfg], "train.en:2", "train.de:2", "invalid UTF-8", "data.train[0]")
    assert snapshot(cfg, tmp_path / "train.en", tmp_path / "train.de") == before


# --------------------------------------------------------------------------- 8. hub ids only with hf:


def test_bare_hub_id_is_not_downloaded(tmp_path, capsys, monkeypatch, sp_model):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hf_mod, "download_from_hub", lambda repo: pytest.fail(f"downloaded {repo}"))
    fails(capsys, ["convert", "hf-to-jaxft", "acme/tiny-mt", "out"], "acme/tiny-mt: no such", "hf:acme/tiny-mt")
    fails(capsys, translate("acme/tiny-mt"), "acme/tiny-mt: no such", "hf:acme/tiny-mt")
    cfg = train_config(tmp_path, tokenizer={"path": "acme/tiny-mt"})
    fails(capsys, ["train", cfg], "data.tokenizer.path", "tiny-mt does not exist", "hf:acme/tiny-mt")
    assert not (tmp_path / "out").exists()


def test_hf_prefix_reaches_the_hub(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_download(repo):
        calls.append(repo)
        raise FileNotFoundError(f"hf:{repo}: fake hub reached")

    monkeypatch.setattr(hf_mod, "download_from_hub", fake_download)
    fails(capsys, ["convert", "hf-to-jaxft", "hf:acme/tiny-mt", "out"], "hf:acme/tiny-mt: fake hub reached")
    fails(capsys, translate("hf:acme/tiny-mt"), "fake hub reached")
    cfg = train_config(tmp_path, tokenizer={"path": "hf:acme/tiny-mt"})
    fails(capsys, ["train", cfg], "fake hub reached")
    with pytest.raises(FileNotFoundError, match="fake hub reached"):
        hf_mod.init_params_from("hf:acme/tiny-mt", TINY, None)
    assert calls == ["acme/tiny-mt"] * 4


def test_init_from_without_prefix(tmp_path, capsys, sp_model):
    cfg = train_config(tmp_path, tokenizer={"path": str(sp_model)}, model={"init_from": "acme/tiny-mt"})
    fails(capsys, ["train", cfg], "exp.yaml:", "model.init_from", "'acme/tiny-mt'", "hf:acme/tiny-mt")
    assert not (tmp_path / "run").exists()  # refused when the config is read, before anything is written


# --------------------------------------------------------------------------- 9. the audit: other files read


def _json_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "a": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


@pytest.mark.parametrize("name, content, why", [
    ("tokenizer.json", b'{"version": "1.0", "model": 3}', "not a valid tokenizer.json"),
    ("tokenizer_config.json", b'{"bos_token": ', "not valid tokenizer_config.json"),
    ("special_tokens_map.json", b'"<s>"', "expected an object"),
], ids=["tokenizer.json", "tokenizer_config", "special_tokens_map"])
def test_garbage_hf_tokenizer_files(hf_dir, capsys, name, content, why):
    pytest.importorskip("tokenizers")
    (hf_dir / "tokenizer.model").unlink()
    _json_tokenizer(hf_dir / "tokenizer.json")
    (hf_dir / name).write_bytes(content)
    before = snapshot(hf_dir)
    fails(capsys, translate(hf_dir), hf_dir / name, why)
    assert snapshot(hf_dir) == before


def test_garbage_safetensors_index(hf_dir, capsys):
    (hf_dir / "model.safetensors.index.json").write_text('{"weight_map": ["x"]}', encoding="utf-8")
    fails(capsys, ["convert", "hf-to-jaxft", hf_dir, hf_dir.parent / "out"], "model.safetensors.index.json",
          "weight_map")


def test_translate_stdin_invalid_utf8(hf_dir, capsys, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"good\nbad \xfe\n")))
    fails(capsys, translate(hf_dir), "<stdin>:2", "invalid UTF-8")


# --------------------------------------------------------------------------- OS errors, internal errors


def test_os_errors_name_the_file(tmp_path, capsys):
    (tmp_path / "folder.txt").mkdir()
    fails(capsys, ["tokenizer", "train", tmp_path / "folder.txt", "--out", tmp_path / "t.model",
                   "--vocab-size", "300"], "folder.txt: Is a directory")
    fails(capsys, ["config", "show", tmp_path / "missing.yaml"], "missing.yaml")


def test_internal_error_is_one_line(tmp_path, capsys, monkeypatch):
    import jaxft.config.loader as loader

    def boom(*a, **k):
        raise RuntimeError("kaputt\nsecond line")

    monkeypatch.setattr(loader, "load_config", boom)
    fails(capsys, ["config", "show", tmp_path / "x.yaml"], "internal error: RuntimeError: kaputt",
          "--debug", status=1)
    with pytest.raises(RuntimeError):
        main(["--debug", "config", "show", str(tmp_path / "x.yaml")])
