"""Config loading: overlays, presets, --set, strict typing, validation, dump/diff."""

from __future__ import annotations

import dataclasses
import logging
import textwrap
from pathlib import Path

import pytest

from jaxft.config import (
    Config,
    ConfigError,
    SourceConfig,
    config_diff,
    dump_config,
    load_config,
    validate,
)
from jaxft.config.schema import DecodeConfig

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def error(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_from_empty_file(tmp_path):
    assert load_config(write(tmp_path / "x.yaml", "")) == Config()


def test_base_merge_and_precedence(tmp_path):
    write(tmp_path / "a.yaml", """
        run_dir: runs/a
        optimizer: {lr: 1.0e-3, warmup_steps: 5}
        train: {steps: 50, trainable: [a, b, c]}
    """)
    write(tmp_path / "sub/b.yaml", """
        base: ../a.yaml
        optimizer: {lr: 2.0e-3}
        model: {d_model: 64, n_heads: 4}
    """)
    top = write(tmp_path / "sub/top.yaml", """
        base: [b.yaml]
        optimizer: {weight_decay: 0.1}
        train: {trainable: [z]}
    """)
    cfg = load_config(top)
    assert cfg.run_dir == "runs/a"
    assert cfg.optimizer.lr == 2e-3 and cfg.optimizer.warmup_steps == 5 and cfg.optimizer.weight_decay == 0.1
    assert cfg.train.steps == 50
    assert cfg.train.trainable == ("z",)  # lists replace, never concatenate
    assert (cfg.model.d_model, cfg.model.n_heads) == (64, 4)


def test_later_base_wins_over_earlier(tmp_path):
    write(tmp_path / "a.yaml", "train: {steps: 10, seed: 1}\n")
    write(tmp_path / "b.yaml", "train: {steps: 20}\n")
    cfg = load_config(write(tmp_path / "top.yaml", "base: [a.yaml, b.yaml]\n"))
    assert (cfg.train.steps, cfg.train.seed) == (20, 1)


def test_overrides(tmp_path):
    path = write(tmp_path / "x.yaml", """
        optimizer: {lr: 1.0e-3}
        data:
          train:
            - {path: a.tsv, src_lang: en, tgt_lang: de}
    """)
    cfg = load_config(path, [
        "optimizer.lr=3e-4",
        "optimizer.clip_norm=null",
        "train.progress_bar=false",
        "train.trainable=[lora, 'x/.*']",
        "model.rope_scaling.factor=8",
        "model.rope_scaling.type=llama3",
        "data.train[0].tgt_lang=fr",
        "run_dir=runs/a=b",
    ])
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.clip_norm is None
    assert cfg.train.progress_bar is False
    assert cfg.train.trainable == ("lora", "x/.*")
    assert cfg.model.rope_scaling.factor == 8.0 and cfg.model.rope_scaling.type == "llama3"
    assert cfg.data.train[0].tgt_lang == "fr" and cfg.data.train[0].src_lang == "en"
    assert cfg.run_dir == "runs/a=b"


def test_override_errors_name_set(tmp_path):
    path = write(tmp_path / "x.yaml", "")
    assert error(path, ("optimizer.lrr=1",)) == "--set: optimizer.lrr: unknown key (did you mean 'lr'?)"
    assert "expected key=value" in error(path, ("optimizer.lr",))
    assert "no such list item" in error(path, ("data.train[0].path=x",))
    assert "--set: train.steps: expected int" in error(path, ("train.steps=abc",))
    assert error(path, ("data.train=[{src_lang: en}, {srclang: de}]",)) == (
        "--set: data.train[1].srclang: unknown key (did you mean 'src_lang'?)")


def test_language_codes_and_exponent_floats(tmp_path):
    cfg = load_config(write(tmp_path / "x.yaml", """
        optimizer: {lr: 3e-4, eps: 1e-6}
        data:
          train: [{src_lang: en, tgt_lang: no}, {src_lang: on, tgt_lang: yes}]
    """))
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.eps == 1e-6
    assert [(s.src_lang, s.tgt_lang) for s in cfg.data.train] == [("en", "no"), ("on", "yes")]


def test_preset_merged_under_model_explicit_keys_win(tmp_path):
    write(tmp_path / "configs/models/tiny.yaml", """
        family: decoder
        d_model: 64
        n_heads: 4
        n_kv_heads: 2
        mlp_dim: 128
    """)
    write(tmp_path / "configs/base.yaml", "model: {mlp_dim: 96}\n")
    path = write(tmp_path / "configs/experiments/x.yaml", """
        base: ../base.yaml
        model: {preset: tiny, n_kv_heads: 1}
    """)
    cfg = load_config(path)
    assert cfg.model.preset == "tiny"
    assert (cfg.model.d_model, cfg.model.n_heads) == (64, 4)  # from the preset
    assert cfg.model.n_kv_heads == 1 and cfg.model.mlp_dim == 96  # explicit keys, even from a base, win
    assert load_config(path, ["model.d_model=32"]).model.d_model == 32


def test_preset_errors(tmp_path):
    write(tmp_path / "configs/models/tiny.yaml", "d_modle: 64\n")
    msg = error(write(tmp_path / "configs/x.yaml", "model: {preset: tiny}\n"))
    assert msg.startswith(str(tmp_path / "configs/models/tiny.yaml") + ":1: model.d_modle: unknown key")
    msg = error(write(tmp_path / "configs/y.yaml", "model:\n  preset: tinny\n"))
    assert msg == f"{tmp_path / 'configs/y.yaml'}:2: model.preset: unknown preset 'tinny' (did you mean 'tiny'?)"


def test_unknown_key_names_path_file_line_and_suggestion(tmp_path):
    path = write(tmp_path / "x.yaml", """
        train: {steps: 10}
        optimizer:
          lrr: 0.1
    """)
    assert error(path) == f"{path}:3: optimizer.lrr: unknown key (did you mean 'lr'?)"
    assert "optimzer: unknown key (did you mean 'optimizer'?)" in error(write(tmp_path / "y.yaml", "optimzer: {}\n"))


def test_error_in_base_names_base_file(tmp_path):
    base = write(tmp_path / "base.yaml", "train:\n  steps: 10\n  globl_batch: 8\n")
    top = write(tmp_path / "top.yaml", "base: base.yaml\ntrain: {seed: 3}\n")
    assert error(top) == f"{base}:3: train.globl_batch: unknown key (did you mean 'global_batch'?)"
    write(tmp_path / "bad_value.yaml", "train: {steps: ten}\n")
    assert error(write(tmp_path / "t2.yaml", "base: bad_value.yaml\n")).startswith(
        f"{tmp_path / 'bad_value.yaml'}:1: train.steps: expected int")


def test_source_list_error_path(tmp_path):
    path = write(tmp_path / "x.yaml", """
        data:
          train:
            - {src_lang: en, tgt_lang: de}
            - {src_lang: en, tgt_lang: fr}
            - src_lang: [en]
    """)
    assert error(path) == f"{path}:5: data.train[2].src_lang: expected str or null, got list"
    path = write(tmp_path / "y.yaml", "data:\n  train:\n    - {src_lng: en}\n")
    assert error(path) == f"{path}:3: data.train[0].src_lng: unknown key (did you mean 'src_lang'?)"


@pytest.mark.parametrize("text, expected", [
    ("train: {steps: '10'}", "train.steps: expected int, got str '10'"),
    ("train: {steps: true}", "train.steps: expected int, got bool True"),
    ("train: {steps: 1.5}", "train.steps: expected int, got float 1.5"),
    ("train: {steps: [1]}", "train.steps: expected int, got list"),
    ("optimizer: {lr: true}", "optimizer.lr: expected float, got bool True"),
    ("train: {trainable: x}", "train.trainable: expected list of str, got str 'x'"),
    ("model: {head_dim: x}", "model.head_dim: expected int or null, got str 'x'"),
    ("model: {family: 3}", "model.family: expected str, got int 3 (quote it if it is text)"),
    ("model: 3", "model: expected mapping, got int 3"),
    ("model: {rope_scaling: 2}", "model.rope_scaling: expected mapping or null, got int 2"),
])
def test_wrong_types(tmp_path, text, expected):
    path = write(tmp_path / "x.yaml", text + "\n")
    assert error(path) == f"{path}:1: {expected}"


def test_ints_for_floats_and_optionals(tmp_path):
    cfg = load_config(write(tmp_path / "x.yaml", "optimizer: {lr: 1, clip_norm: null}\nmodel: {head_dim: 16}\n"))
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.clip_norm is None and cfg.model.head_dim == 16


def test_literal_lists_allowed_values(tmp_path):
    path = write(tmp_path / "x.yaml", "optimizer:\n  schedule: cosin\n")
    assert error(path) == (
        f"{path}:2: optimizer.schedule: expected one of 'cosine', 'linear', 'rsqrt', 'constant'; got str 'cosin'")


@pytest.mark.parametrize("text, key", [
    ("model: {vocab_size: 0}", "model.vocab_size"),
    ("model: {d_model: -1}", "model.d_model"),
    ("model: {n_layers: 0}", "model.n_layers"),
    ("model: {n_heads: 0}", "model.n_heads"),
    ("model: {mlp_dim: 0}", "model.mlp_dim"),
    ("model: {max_seq_len: 0}", "model.max_seq_len"),
    ("model: {head_dim: 0}", "model.head_dim"),
    ("model: {d_model: 100, n_heads: 8}", "model.d_model"),
    ("model: {n_heads: 8, n_kv_heads: 3}", "model.n_kv_heads"),
    ("model: {n_heads: 8, n_kv_heads: 0}", "model.n_kv_heads"),
    ("model: {rope_scaling: {factor: 0}}", "model.rope_scaling.factor"),
    ("mesh: {data: 0}", "mesh.data"),
    ("mesh: {fsdp: -2}", "mesh.fsdp"),
    ("mesh: {tensor: 0}", "mesh.tensor"),
    ("mesh: {data: -1, fsdp: -1}", "mesh"),
    ("data: {seq_len: 0}", "data.seq_len"),
    ("data: {temperature: 0}", "data.temperature"),
    ("optimizer: {lr: -1.0e-3}", "optimizer.lr"),
    ("optimizer: {warmup_steps: -1}", "optimizer.warmup_steps"),
    ("optimizer: {warmup_steps: 11}\ntrain: {steps: 10}", "optimizer.warmup_steps"),
    ("optimizer: {decay_steps: 0}", "optimizer.decay_steps"),
    ("optimizer: {end_lr_ratio: -0.1}", "optimizer.end_lr_ratio"),
    ("optimizer: {weight_decay: -0.1}", "optimizer.weight_decay"),
    ("optimizer: {b1: 1.0}", "optimizer.b1"),
    ("optimizer: {b2: -0.5}", "optimizer.b2"),
    ("optimizer: {clip_norm: 0}", "optimizer.clip_norm"),
    ("train: {steps: 0}", "train.steps"),
    ("train: {global_batch: 0}", "train.global_batch"),
    ("train: {microbatches: 0}", "train.microbatches"),
    ("train: {log_every: 0}", "train.log_every"),
    ("train: {global_batch: 10, microbatches: 4}", "train.global_batch"),
    ("train: {dev_every: -1}", "train.dev_every"),
    ("train: {label_smoothing: 1.0}", "train.label_smoothing"),
    ("train: {z_loss: -1.0}", "train.z_loss"),
    ("checkpoint: {every: -1}", "checkpoint.every"),
    ("checkpoint: {keep: 0}", "checkpoint.keep"),
])
def test_impossible_values(tmp_path, text, key):
    path = write(tmp_path / "x.yaml", text + "\n")
    assert error(path).startswith(f"{path}:1: {key}: must ")


def test_impossible_value_messages_and_origins(tmp_path):
    base = write(tmp_path / "base.yaml", "train: {global_batch: 10}\n")
    top = write(tmp_path / "top.yaml", "base: base.yaml\n\ntrain: {microbatches: 4}\n")
    assert error(top) == f"{base}:1: train.global_batch: must be a multiple of train.microbatches=4, got 10"
    # only microbatches set explicitly: the error points at the line that set it
    top = write(tmp_path / "mb.yaml", "train:\n  microbatches: 3\n")
    assert error(top).startswith(f"{top}:2: train.global_batch: must be a multiple")
    assert error(write(tmp_path / "ok.yaml", ""), ("train.steps=0",)) == "--set: train.steps: must be > 0, got 0"
    assert load_config(write(tmp_path / "hd.yaml", "model: {d_model: 100, n_heads: 8, head_dim: 16}\n"))


def test_seq_len_limited_by_learned_positions_only(tmp_path):
    learned = "model:\n  family: bart\n  position: learned\n  max_seq_len: 64\n"
    data = "data:\n  train: [{path: t.txt, task: infilling, src_lang: de}]\n"
    top = write(tmp_path / "top.yaml", learned + data + "  seq_len: 65\n")
    assert error(top) == (f"{top}:7: data.seq_len: must be <= model.max_seq_len=64 (the learned position "
                          f"table of model.position: learned has that many rows), got 65")
    enc = write(tmp_path / "enc.yaml", learned + data + "  seq_len: 64\n  encoder_seq_len: 100\n")
    assert error(enc).startswith(f"{enc}:8: data.encoder_seq_len: must be <= model.max_seq_len=64 ")
    # only max_seq_len set (data.seq_len defaults to 256): the error points at the line that set it
    assert error(write(tmp_path / "m.yaml", learned + data)).startswith(f"{tmp_path / 'm.yaml'}:4: data.seq_len: ")
    assert error(tmp_path / "m.yaml", ("data.seq_len=65",)).startswith("--set: data.seq_len: must be <= ")
    assert load_config(tmp_path / "m.yaml", ("data.seq_len=64", "data.encoder_seq_len=64"))
    assert load_config(write(tmp_path / "preset.yaml", learned))  # no data sources: data.seq_len is unused
    # not a limit: RoPE / ALiBi, T5 relative buckets, sinusoidal (NLLB); nor encoder_seq_len of a decoder-only model
    for family, position, seq_len in (("decoder", "rope", 512), ("decoder", "alibi", 512), ("decoder", "learned", 64),
                                      ("t5", "relative", 512), ("bart", "sinusoidal", 512)):
        path = write(tmp_path / "ok.yaml", f"model: {{family: {family}, position: {position}}}\n" + data)
        sets = (f"data.seq_len={seq_len}", "data.encoder_seq_len=1024", "model.max_seq_len=64")
        assert load_config(path, sets).data.encoder_seq_len == 1024


def test_validate_directly():
    assert validate(Config()) == Config()
    bad = dataclasses.replace(Config(), train=dataclasses.replace(Config().train, steps=-3))
    with pytest.raises(ConfigError, match=r"^train.steps: must be > 0, got -3$"):
        validate(bad)


def test_cycle_in_base(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: [c.yaml, a.yaml]\n")
    write(tmp_path / "c.yaml", "train: {steps: 3}\n")
    msg = error(tmp_path / "a.yaml")
    assert "cycle in base files" in msg and "a.yaml -> " in msg
    # the same base reached twice without a cycle is fine
    write(tmp_path / "d.yaml", "base: [c.yaml, e.yaml]\n")
    write(tmp_path / "e.yaml", "base: c.yaml\n")
    assert load_config(tmp_path / "d.yaml").train.steps == 3


def test_missing_base_and_bad_yaml(tmp_path):
    path = write(tmp_path / "x.yaml", "train: {}\nbase: nope.yaml\n")
    assert error(path).startswith(f"{path}:2: base: cannot read config")
    path = write(tmp_path / "y.yaml", "train: {steps: 3\n")
    assert error(path).startswith(f"{path}:2: invalid YAML")
    path = write(tmp_path / "z.yaml", "train: {steps: 3}\ntrain: {seed: 1}\n")
    assert error(path) == f"{path}:2: train: duplicate key"
    assert error(write(tmp_path / "l.yaml", "- 1\n")).endswith("the top level must be a mapping")


def test_yaml_anchors_and_merge_keys(tmp_path):
    cfg = load_config(write(tmp_path / "x.yaml", """
        data:
          train:
            - &en_de {type: tsv, src_lang: en, tgt_lang: de, max_examples: 5}
            - {<<: *en_de, tgt_lang: fr}
    """))
    assert cfg.data.train[1] == dataclasses.replace(cfg.data.train[0], tgt_lang="fr")


def test_relative_data_paths_resolve_against_setting_file(tmp_path):
    write(tmp_path / "base/base.yaml", "data: {train: [{path: 'data/{src}-{tgt}.tsv'}]}\n")
    path = write(tmp_path / "exp/x.yaml", "base: ../base/base.yaml\ndata: {tokenizer: {path: spm.model}, index_dir: idx}\n")
    cfg = load_config(path, ["data.dev=[{path: dev.tsv}, {path: /abs/dev.tsv}]"])
    assert cfg.data.train[0].path == str(tmp_path / "base/data/{src}-{tgt}.tsv")
    assert cfg.data.tokenizer.path == str(tmp_path / "exp/spm.model")
    assert cfg.data.index_dir == str(tmp_path / "exp/idx")
    assert [s.path for s in cfg.data.dev] == ["dev.tsv", "/abs/dev.tsv"]  # --set paths are cwd-relative


def test_dump_load_round_trip(tmp_path):
    write(tmp_path / "configs/models/tiny.yaml", "d_model: 64\nn_heads: 4\n")
    path = write(tmp_path / "configs/x.yaml", """
        model: {preset: tiny, rope_scaling: {type: yarn, factor: 4}, norm_eps: 1e-5}
        data:
          train: [{src_lang: en, tgt_lang: no, directions: [en-de, en-fr]}]
          prompt_template: "Translate {src_name} -> {tgt_name}:\\n{src}\\n"
        train: {trainable: ['.*lora.*'], frozen: []}
    """)
    cfg = load_config(path)
    dumped = write(tmp_path / "run/config.yaml", dump_config(cfg))  # no configs/models next to it
    assert load_config(dumped) == cfg
    assert isinstance(cfg.data.train[0], SourceConfig) and cfg.data.train[0].tgt_lang == "no"


def test_config_diff(tmp_path):
    a = load_config(write(tmp_path / "a.yaml", "data: {train: [{src_lang: en}, {src_lang: de}]}\n"))
    b = load_config(write(tmp_path / "a.yaml", "data: {train: [{src_lang: en}, {src_lang: fr}]}\n"),
                    ["optimizer.lr=1e-3", "train.trainable=[x]"])
    assert config_diff(a, a) == []
    assert config_diff(a, b) == ["data.train[1].src_lang", "optimizer.lr", "train.trainable"]
    c = load_config(tmp_path / "a.yaml", ["data.train=[{src_lang: en}]"])
    assert config_diff(a, c) == ["data.train"]


def test_eval_decode_section_set_and_show(tmp_path, capsys):
    from jaxft.cli import main

    path = write(tmp_path / "x.yaml", "eval:\n  decode: {max_len: 48}\n")
    cfg = load_config(path, ["eval.decode.beam_size=5"])
    assert cfg.eval.decode == DecodeConfig(max_len=48, beam_size=5)
    assert cfg.eval.decode.strategy == "beam" and Config().eval.decode == DecodeConfig()  # eval defaults
    assert main(["config", "show", str(path), "--set", "eval.decode.beam_size=5"]) == 0
    out = capsys.readouterr().out
    assert "eval:\n" in out and "  decode:\n    strategy: beam\n    max_len: 48\n" in out
    assert error(write(tmp_path / "bad.yaml", "eval:\n  decode:\n    max_len: 0\n")) == (
        f"{tmp_path / 'bad.yaml'}:2: decode.max_len: must be >= 1, got 0")


def test_legacy_flat_eval_decode_keys(tmp_path, caplog):
    old = write(tmp_path / "run/config.yaml", """
        eval:
          every: 2
          strategy: greedy
          beam_size: 2
          length_penalty: 1.0
          max_len: 48
    """)
    with caplog.at_level(logging.WARNING, logger="jaxft.config.loader"):
        cfg = load_config(old)
    assert cfg.eval.every == 2
    assert cfg.eval.decode == DecodeConfig(strategy="greedy", beam_size=2, length_penalty=1.0, max_len=48)
    assert str(old) in caplog.text and "eval.decode.max_len" in caplog.text
    # each file is read in its own form: a new-form config over an old base
    top = write(tmp_path / "top.yaml", "base: run/config.yaml\neval: {decode: {beam_size: 3}}\n")
    assert load_config(top).eval.decode == DecodeConfig(strategy="greedy", beam_size=3, length_penalty=1.0,
                                                        max_len=48)
    assert load_config(top, ["eval.max_len=20"]).eval.decode.max_len == 20
    both = write(tmp_path / "both.yaml", "eval:\n  decode: {beam_size: 3}\n  max_len: 48\n")
    assert error(both) == f"{both}:3: eval.max_len: old flat key and eval.decode in one file; move it under eval.decode"


@pytest.mark.parametrize("name, mesh", [("dp", (-1, 1, 1)), ("fsdp", (1, -1, 1)), ("fsdp_tp", (1, -1, 2))])
def test_repo_mesh_overlays(name, mesh):
    cfg = load_config(REPO / "configs/mesh" / f"{name}.yaml")
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == mesh
