"""LoRA options: default targets with cross-attention, rsLoRA, per-target ranks / alphas,
modules_to_save (trained, checkpointed without the base, saved, loaded, composed, exported
to HF PEFT), BLOOM's fused query_key_value in the PEFT export, and `jaxft params`."""

import dataclasses
import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxft.config.schema import LoraConfig, ModelConfig, PeftConfig, TrainConfig
from jaxft.interop.hf import path_str
from jaxft.models.registry import build_model
from jaxft.peft.lora import adapters, apply_lora, load_adapter, read_saved, save_adapter
from jaxft.peft.methods import method_for

from test_peft_lora import TINY, ids, randomize_b
from trainutil import write_run_config

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "models"


def preset(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((PRESETS / f"{name}.yaml").read_text())["model"])


def adapted(cfg: ModelConfig, lcfg: LoraConfig = LoraConfig()) -> set[str]:
    model = nnx.eval_shape(lambda: apply_lora(build_model(cfg, rngs=nnx.Rngs(0)), lcfg, rngs=nnx.Rngs(1)))
    return {p for p, _, _, _ in adapters(model)}


@pytest.mark.parametrize("name,stacks", [("tiny-t5", 2), ("tiny-mbart", 2), ("tiny-llama", 1)])
def test_default_targets_cover_self_and_cross_attention(name, stacks):
    cfg = preset(name)
    want = set()
    for i in range(cfg.n_layers):
        for m in "qkvo":
            if stacks == 1:
                want.add(f"layers/{i}/attn/{m}")
                continue
            want |= {f"encoder/layers/{i}/attn/{m}", f"decoder/layers/{i}/attn/{m}", f"decoder/layers/{i}/cross/{m}"}
    assert adapted(cfg) == want


def flat_params(model) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_rslora_patterns_modules_to_save_save_and_load(tmp_path):
    lcfg = LoraConfig(rank=4, alpha=8.0, rslora=True, targets=(r"attn/(q|o)/kernel$", r"mlp/up/kernel$"),
                      rank_pattern={"layers/0/attn/q": 2, "mlp/": 6}, alpha_pattern={"attn/o": 3.0},
                      modules_to_save=("final_norm", r"layers/1/attn_norm"))
    model = apply_lora(build_model(TINY, rngs=nnx.Rngs(0)), lcfg, rngs=nnx.Rngs(1))
    got = {p: (ad.rank, ad.scale) for p, _, _, ad in adapters(model)}
    assert got["layers/0/attn/q"] == (2, pytest.approx(8 / math.sqrt(2)))
    assert got["layers/1/attn/q"] == (4, pytest.approx(8 / 2))
    assert got["layers/0/mlp/up"] == (6, pytest.approx(8 / math.sqrt(6)))
    assert got["layers/1/attn/o"] == (4, pytest.approx(3 / 2))
    # what trains: the adapter and exactly the modules_to_save tensors
    method = method_for(PeftConfig(method="lora", lora=lcfg), TrainConfig(), TINY)
    _, trainable, _ = nnx.split(model, method.trainable_filter(), ...)
    full = sorted(p for p in (path_str(q) for q, _ in nnx.to_flat_state(trainable)) if "/lora/" not in p)
    assert full == ["final_norm/scale", "layers/1/attn_norm/scale"]
    randomize_b(model, std=0.2)
    model.final_norm.scale.set_value(model.final_norm.scale.get_value() * 1.5 + 0.1)
    x = ids()
    want = np.asarray(model(x))
    out = save_adapter(tmp_path / "a", model, lcfg, TINY)
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["rslora"] and meta["saved"] == full and meta["scale"] is None
    assert meta["rank_pattern"] == {"layers/0/attn/q": 2, "mlp/": 6}
    np.testing.assert_array_equal(read_saved(out)["final_norm/scale"], np.asarray(model.final_norm.scale.get_value()))
    fresh = build_model(TINY, rngs=nnx.Rngs(0))
    load_adapter(fresh, out)  # per-Linear scales and the saved tensors come back
    np.testing.assert_allclose(np.asarray(fresh(x)), want, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be applied with scale"):
        load_adapter(build_model(TINY, rngs=nnx.Rngs(0)), out, scale=0.5)
    # loaded adapters go in before model.init_from, which would overwrite what they replace
    with pytest.raises(ValueError, match="peft.lora.load: .*peft.compose"):
        method_for(PeftConfig(method="lora", lora=LoraConfig(name="t", load=(str(out),))), TrainConfig(),
                   dataclasses.replace(TINY, init_from="hf:x")).transform_model(build_model(TINY, rngs=nnx.Rngs(0)),
                                                                                nnx.Rngs(0))


@pytest.mark.parametrize("bad,key", [
    (dict(rank_pattern={"attn": 0}), "peft.lora.rank_pattern"),
    (dict(alpha_pattern={"(": 2.0}), "peft.lora.alpha_pattern"),
    (dict(modules_to_save=("nothing_here",)), "peft.lora.modules_to_save"),
    (dict(modules_to_save=("attn/q/kernel",)), "peft.lora.modules_to_save: .* also a LoRA target"),
])
def test_bad_options_name_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        apply_lora(build_model(TINY, rngs=nnx.Rngs(0)), LoraConfig(**bad), rngs=nnx.Rngs(1))


# --------------------------------------------------------------------------- HF PEFT numerics


def hf_model(tmp_path: Path, arch: str, **cfg):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from jaxft.interop import load_hf

    torch.manual_seed(0)
    cls = getattr(transformers, arch)
    cls._from_config(cls.config_class(**cfg), attn_implementation="eager").eval().save_pretrained(tmp_path / "hf")
    cfg, params = load_hf(tmp_path / "hf")
    cfg = dataclasses.replace(cfg, dtype="float32")
    model = build_model(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, params)
    return cfg, model


def peft_logits(tmp_path: Path, peft_dir: Path, x: np.ndarray) -> tuple[np.ndarray, object]:
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base, peft_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(x)).logits.float().numpy(), model


def perturb(model, paths, seed=0):
    rng = np.random.default_rng(seed)
    variables = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for p in paths:
        v = variables[p].get_value()
        variables[p].set_value(v + jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype))


def close(ours, theirs):
    assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, float(np.abs(theirs).max()))


def test_peft_export_rslora_patterns_modules_to_save_llama(tmp_path):
    cfg, model = hf_model(tmp_path, "LlamaForCausalLM", vocab_size=96, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                          initializer_range=0.1, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    lcfg = LoraConfig(rank=4, alpha=8.0, rslora=True, targets=(r"attn/(q|k|v|o)/kernel$", r"mlp/down/kernel$"),
                      rank_pattern={"layers/1/attn/q": 2, "mlp/": 6}, alpha_pattern={"attn/v": 5.0},
                      modules_to_save=("^embed/", "^lm_head/", "layers/0/attn_norm"))
    apply_lora(model, lcfg, rngs=nnx.Rngs(1))
    randomize_b(model, std=0.2)
    perturb(model, ["embed/embedding", "lm_head/kernel", "layers/0/attn_norm/scale"])
    x = np.random.default_rng(0).integers(3, 96, (2, 12))
    ours = np.asarray(model(jnp.asarray(x, jnp.int32)))
    out = save_adapter(tmp_path / "adapter", model, lcfg, cfg)
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["rank_pattern"] == {"model.layers.0.mlp.down_proj": 6, "model.layers.1.mlp.down_proj": 6,
                                      "model.layers.1.self_attn.q_proj": 2}
    assert config["alpha_pattern"] == {f"model.layers.{i}.self_attn.v_proj": 5.0 for i in range(2)}
    assert config["modules_to_save"] == ["lm_head", "model.embed_tokens", "model.layers.0.input_layernorm"]
    theirs, peft_model = peft_logits(tmp_path, out / "peft", x)
    close(ours, theirs)
    layer1 = peft_model.base_model.model.model.layers[1]
    assert layer1.self_attn.q_proj.r["default"] == 2
    assert layer1.self_attn.q_proj.scaling["default"] == pytest.approx(8 / math.sqrt(2))
    assert layer1.self_attn.v_proj.scaling["default"] == pytest.approx(5 / 2)


def test_peft_export_bloom_fused_qkv_and_tied_embedding(tmp_path):
    cfg, model = hf_model(tmp_path, "BloomForCausalLM", vocab_size=96, hidden_size=32, n_layer=2, n_head=4,
                          initializer_range=0.1)
    assert cfg.tie_embeddings
    lcfg = LoraConfig(rank=4, alpha=8.0, rank_pattern={"attn/q": 2}, modules_to_save=("^embed/", "final_norm"))
    apply_lora(model, lcfg, rngs=nnx.Rngs(1))  # default targets: q, k, v (fused in HF) and o
    randomize_b(model, std=0.3)
    perturb(model, ["embed/embedding", "final_norm/scale", "final_norm/bias"])
    x = np.random.default_rng(0).integers(3, 96, (2, 12))
    ours = np.asarray(model(jnp.asarray(x, jnp.int32)))
    out = save_adapter(tmp_path / "adapter", model, lcfg, cfg)
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["peft"], meta.get("peft_skipped")
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["dense", "query_key_value"]
    assert config["rank_pattern"] == {f"transformer.h.{i}.self_attention.query_key_value": 10 for i in range(2)}
    assert config["modules_to_save"] == ["lm_head", "transformer.ln_f", "transformer.word_embeddings"]
    theirs, peft_model = peft_logits(tmp_path, out / "peft", x)
    close(ours, theirs)
    import torch

    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=torch.tensor(x)).logits.float().numpy()
    assert np.abs(theirs - plain).max() > 1e-2  # the adapter and the saved tensors matter


# --------------------------------------------------------------------------- training, checkpoints, compose, CLI


def test_modules_to_save_trains_without_base_checkpoint_and_composes(tmp_path, capsys):
    from jaxft.cli import main
    from jaxft.config.loader import load_config
    from jaxft.interop import convert
    from jaxft.peft.compose import compose_checkpoint
    from jaxft.runs.model import restore_model
    from jaxft.train.loop import train

    path = write_run_config(tmp_path, steps=4, name="run")
    raw = yaml.safe_load(path.read_text())
    raw["peft"] = {"method": "lora", "save_base": False,
                   "lora": {"rank": 2, "alpha": 4.0, "rslora": True, "rank_pattern": {"layers/1/attn/v": 3},
                            "modules_to_save": ["^final_norm/"]}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(path)
    assert cfg.peft.lora.rank_pattern == {"layers/1/attn/v": 3}
    assert train(cfg, base_dir=tmp_path, stop_after=2).step == 2
    assert train(cfg, base_dir=tmp_path).step == 4  # resumes: the checkpoint holds adapters + final_norm only
    tree = (Path(cfg.run_dir) / "checkpoints" / "4" / "params" / "_METADATA").read_text()
    assert '"final_norm"' in tree and '"kernel"' not in tree and not (Path(cfg.run_dir) / "checkpoints/4/rest").exists()
    restored = restore_model(Path(cfg.run_dir))
    adapter = Path(cfg.run_dir) / "adapter"
    saved = read_saved(adapter)
    assert np.abs(saved["final_norm/scale"] - 1.0).max() > 0  # trained (init: ones)
    np.testing.assert_array_equal(saved["final_norm/scale"], np.asarray(restored.params["final_norm"]["scale"].get_value()))
    # jaxft compose: theta0 (a jaxft folder) + the adapter == the run's model
    base = build_model(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    (tmp_path / "base").mkdir()
    convert.save_params(tmp_path / "base" / convert.PARAMS, nnx.state(base, nnx.Param))
    convert.write_model_yaml(tmp_path / "base" / convert.MODEL_YAML, cfg.model)
    compose_checkpoint(tmp_path / "base", [str(adapter)], tmp_path / "composed")
    composed = build_model(cfg.model, rngs=nnx.Rngs(0))
    nnx.update(composed, convert.restore_params(tmp_path / "composed" / convert.PARAMS, cfg.model))
    x = ids(vocab=cfg.model.vocab_size)
    np.testing.assert_allclose(np.asarray(composed(x)), np.asarray(restored.model()(x)), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(composed.final_norm.scale.get_value()), saved["final_norm/scale"])

    # `jaxft params`: a config (what LoRA adapts / saves, what trains), a run dir, a jaxft folder
    assert main(["params", str(path), "--match", "layers/1/attn/v"]) == 0
    out = capsys.readouterr().out
    assert "layers/1/attn/v/kernel" in out and "lora r=3" in out and "layers/1/attn/v/lora/default/a" in out
    assert main(["params", str(path), "--trainable", "--match", "norm"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:-1]] == ["final_norm/scale"] and "modules_to_save" in out[1]
    assert main(["params", str(cfg.run_dir), "--set", "x=1"]) == 2
    assert main(["params", str(tmp_path / "base"), "--match", "^embed/"]) == 0
    out = capsys.readouterr().out
    assert f"embed/embedding  [{cfg.model.vocab_size}, 32]  float32" in out
    assert f"1 of {len(flat_params(base))} tensors, {cfg.model.vocab_size * 32:,} of" in out
    assert main(["params", str(tmp_path / "base"), "--trainable"]) == 2
