"""Hugging Face interop: checkpoints (config.json + safetensors) and tokenizers in and out.

    cfg, params = load_hf("path/or/org-name", mesh=mesh)      # -> (ModelConfig, nnx.State)
    save_hf(cfg, params, "out_dir", tokenizer_path="tok.model")

Families (``jaxft.interop.families``): llama, qwen2, gemma, gemma2, bloom (decoder-only);
t5, mt5, umt5, mbart (mBART-50), m2m_100 (M2M100 / NLLB-200) (encoder-decoder).
"""

from jaxft.interop.hf import (hf_config_to_model_config, init_params_from, load_hf, load_hf_params,
                              model_config_to_hf_config, save_hf)
from jaxft.interop.hf_tokenizer import HFJsonTokenizer, load_hf_tokenizer

__all__ = ["HFJsonTokenizer", "hf_config_to_model_config", "init_params_from", "load_hf", "load_hf_params",
           "load_hf_tokenizer", "model_config_to_hf_config", "save_hf"]
