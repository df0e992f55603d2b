"""Every shipped config loads and validates; every model preset is consistent."""

from pathlib import Path

import pytest

from jaxft.config.loader import load_config
from jaxft.config.schema import ModelConfig
from jaxft.models.flops import param_count, train_flops_per_token

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted((CONFIGS / "experiments").glob("*.yaml"))
PRESETS = sorted(p.stem for p in (CONFIGS / "models").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.steps > 0 and cfg.data.train
    assert param_count(cfg.model) > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_model_presets_load_and_count(tmp_path, preset):
    cfg_path = tmp_path / "x.yaml"
    cfg_path.write_text(f"model:\n  preset: {preset}\n")
    model = load_config(cfg_path).model
    assert isinstance(model, ModelConfig) and model.preset == preset
    assert param_count(model) > 0 and train_flops_per_token(model, 128) > 6 * param_count(model) * 0.5


def test_real_presets_have_published_sizes(tmp_path):
    """Parameter counts of real presets against published sizes (rough: +-10%)."""
    published = {"llama-3-8b": 8.03e9, "llama-3-70b": 70.6e9, "qwen2-7b": 7.6e9, "gemma-7b": 8.5e9, "bloom-7b1": 7.07e9,
                 "mt5-base": 580e6, "mt5-xl": 3.7e9, "mbart-large-50": 611e6, "nllb-200-distilled-600M": 615e6,
                 "nllb-200-3.3B": 3.3e9}
    for name, size in published.items():
        p = tmp_path / f"{name}.yaml"
        p.write_text(f"model:\n  preset: {name}\n")
        assert abs(param_count(load_config(p).model) / size - 1) < 0.1, name


def test_hf_specs_are_not_rewritten_as_paths():
    cfg = load_config(CONFIGS / "experiments" / "ml50_mbart50.yaml")
    assert cfg.model.init_from == "hf:facebook/mbart-large-50"
    assert cfg.data.tokenizer.path == "hf:facebook/mbart-large-50"
    assert cfg.data.train[0].src_path.endswith("ml50/train/{src}-{tgt}.{src}")
    assert Path(cfg.data.train[0].src_path).is_absolute()
