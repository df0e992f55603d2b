"""`jaxft convert`, `init_params_from` and the importer's refusals."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxft.cli import main
from jaxft.config.loader import load_config
from jaxft.config.schema import MeshConfig, ModelConfig, TokenizerConfig
from jaxft.data.tokenizer import train_tokenizer
from jaxft.interop import hf_config_to_model_config, init_params_from, load_hf, model_config_to_hf_config, save_hf
from jaxft.sharding import make_mesh

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from test_interop_decoder import CASES, assert_close, batch, hf_logits, jaxft_logits, make_hf_model  # noqa: E402

TEXT = [f"{w} the quick brown fox {i} jumps over the lazy dog" for i, w in enumerate(["a", "b", "c"] * 30)]


@pytest.fixture
def llama_dir(tmp_path):
    arch, kwargs = CASES["llama_gqa_untied"]
    model = make_hf_model(arch, dict(kwargs, bos_token_id=2, eos_token_id=3, pad_token_id=0))
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    train_tokenizer(TEXT, tmp_path / "hf" / "tokenizer.model",
                    TokenizerConfig(train_vocab_size=60, byte_fallback=False))
    return tmp_path / "hf", model


def test_cli_round_trip(llama_dir, tmp_path, capsys):
    src, hf_model = llama_dir
    assert main(["convert", "hf-to-jaxft", str(src), str(tmp_path / "jx")]) == 0
    assert {"model.yaml", "params", "hf_config.json", "tokenizer"} <= {p.name for p in (tmp_path / "jx").iterdir()}
    cfg, _ = load_hf(src)
    assert load_config(tmp_path / "jx" / "model.yaml").model == cfg
    assert main(["config", "show", str(tmp_path / "jx" / "model.yaml")]) == 0
    assert "d_model: 32" in capsys.readouterr().out

    assert main(["convert", "jaxft-to-hf", str(tmp_path / "jx"), str(tmp_path / "out"),
                 "--max-shard-size", "20KB"]) == 0
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.model").is_file()
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 3, 0)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids, mask = batch()
    assert_close(hf_logits(reloaded, ids, mask), hf_logits(hf_model, ids, mask), mask)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (2, 3)


def test_init_params_from(llama_dir):
    src, hf_model = llama_dir
    cfg, _ = load_hf(src)
    cfg = dataclasses.replace(cfg, param_dtype="bfloat16", remat="full", max_seq_len=32, init_from=f"hf:{src}")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    state = init_params_from(cfg.init_from, cfg, mesh)
    leaves = jax.tree.leaves(state)
    assert all(x.dtype == np.dtype("bfloat16") and len(x.sharding.device_set) == 8 for x in leaves)
    with pytest.raises(ValueError, match=r"model\.d_model"):
        init_params_from(f"hf:{src}", dataclasses.replace(cfg, d_model=64), mesh)
    with pytest.raises(ValueError, match="hf:"):
        init_params_from(str(src), cfg, mesh)
    with pytest.raises(FileNotFoundError):
        init_params_from(f"hf:{src}/nope", cfg, None)


def test_headless_bloom_checkpoint(tmp_path):
    """Checkpoints saved from a bare BloomModel have no `transformer.` prefix."""
    arch, kwargs = CASES["bloom"]
    model = make_hf_model(arch, kwargs)
    model.transformer.save_pretrained(tmp_path, safe_serialization=True)
    cfg, state = load_hf(tmp_path)
    ids, mask = batch()
    assert_close(jaxft_logits(cfg, state, ids, mask), hf_logits(model, ids, mask), mask)


LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4)


@pytest.mark.parametrize("hf, match", [
    (dict(LLAMA, model_type="mistral"), "model_type='mistral'"),
    (dict(LLAMA, architectures=["LlamaForSequenceClassification"]), "architectures"),
    (dict(LLAMA, hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(LLAMA, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling.rope_type='dynamic'"),
    (dict(LLAMA, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4, "mscale": 0.7}),
     "rope_parameters.mscale"),
    (dict(LLAMA, partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(LLAMA, model_type="qwen2", use_sliding_window=True, sliding_window=16), "use_sliding_window"),
    (dict(LLAMA, model_type="gemma2", sliding_window=8, layer_types=["full_attention", "sliding_attention"]),
     "layer_types"),
    (dict(LLAMA, model_type="gemma2", hidden_activation="gelu"), "hidden_activation='gelu'"),
    (dict(LLAMA, model_type="bloom", n_layer=2, n_head=4, apply_residual_connection_post_layernorm=True),
     "apply_residual_connection_post_layernorm"),
    ({k: v for k, v in LLAMA.items() if k != "hidden_size"}, "hidden_size"),
])
def test_unsupported_configs_name_the_field(hf, match):
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("(", r"\(")):
        hf_config_to_model_config(hf)


def test_config_mapping():
    cfg = hf_config_to_model_config(dict(LLAMA, rope_theta=5e5, rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}, num_key_value_heads=1, head_dim=16))
    assert (cfg.rope_theta, cfg.rope_scaling.type, cfg.rope_scaling.factor, cfg.n_kv_heads, cfg.head_dim) == (
        5e5, "llama3", 8.0, 1, 16)
    cfg = hf_config_to_model_config(dict(LLAMA, model_type="gemma2", num_hidden_layers=4, sliding_window=8,
                                         layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                      "sliding_attention"]))
    assert (cfg.sliding_window, cfg.sliding_window_pattern, cfg.post_norms, cfg.tie_embeddings) == (8, 3, True, True)
    assert model_config_to_hf_config(cfg)["layer_types"] == ["sliding_attention", "sliding_attention",
                                                             "full_attention", "sliding_attention"]
    assert model_config_to_hf_config(dataclasses.replace(cfg, post_norms=False, sliding_window=None))[
        "model_type"] == "gemma"


def test_export_refuses_what_hf_cannot_express(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, mlp_dim=64, position="alibi")
    with pytest.raises(ValueError, match=r"model\.activation"):
        model_config_to_hf_config(cfg)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, mlp_dim=64, activation="relu")
    with pytest.raises(ValueError, match="no HF family"):
        save_hf(cfg, nnx.State({}), tmp_path)
