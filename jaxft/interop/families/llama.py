"""LLaMA (1/2/3, incl. llama3 / linear / yarn RoPE scaling) and Qwen2.

HF and jaxft both use the rotate-half RoPE layout (the two halves of head_dim
pair up), so q/k weights need no permutation.  HF ``attention_dropout`` is
``model.attention_dropout``; HF has no field for the other two rates (export drops them:
they change training, not the exported model).
"""

from __future__ import annotations

from jaxft.config.schema import ModelConfig
from jaxft.interop.families import Family, register
from jaxft.interop.families.common import (check_exportable, expect, head_dim_of, llama_like_tensors, need, rate,
                                           rope_from_hf, rope_to_hf, unsupported)


def rope_decoder_fields(hf: dict, *, tie_default: bool) -> dict:
    """ModelConfig fields shared by the LLaMA-style families (LLaMA, Qwen2, Gemma, Gemma 2)."""
    d_model, n_heads = int(need(hf, "hidden_size")), int(need(hf, "num_attention_heads"))
    theta, scaling = rope_from_hf(hf)
    return dict(
        family="decoder", vocab_size=int(need(hf, "vocab_size")), d_model=d_model,
        n_layers=int(need(hf, "num_hidden_layers")), n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), head_dim=head_dim_of(hf, d_model, n_heads),
        mlp_dim=int(need(hf, "intermediate_size")), norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        position="rope", rope_theta=theta, rope_scaling=scaling,
        max_seq_len=int(hf.get("max_position_embeddings") or 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", tie_default)), param_dtype="float32",
        attention_dropout=rate(hf, "attention_dropout", 0.0))


def rope_decoder_hf(cfg: ModelConfig) -> dict:
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_per_head, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.attention_dropout, **rope_to_hf(cfg))


def no_sliding_window(hf: dict) -> None:
    if hf.get("use_sliding_window"):
        raise unsupported("use_sliding_window", hf["use_sliding_window"], "sliding-window attention is only "
                          "supported for gemma2")
    types = hf.get("layer_types")
    if types and any(t != "full_attention" for t in types):
        raise unsupported("layer_types", types, "only full_attention layers are supported here")


_PLAIN = dict(family="decoder", norm="rmsnorm", norm_plus_one=False, position="rope", embed_scale=False,
              embed_norm=False, attn_logit_softcap=None, final_logit_softcap=None, post_norms=False,
              sliding_window=None, query_pre_attn_scalar=None)


# --------------------------------------------------------------------------- LLaMA


def llama_to_model_config(hf: dict) -> ModelConfig:
    expect(hf, "hidden_act", ("silu",), "silu")
    no_sliding_window(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(activation="swiglu", qkv_bias=attention_bias, attn_out_bias=attention_bias,
                       mlp_bias=bool(hf.get("mlp_bias", False)), **rope_decoder_fields(hf, tie_default=False))


def llama_to_hf(cfg: ModelConfig) -> dict:
    check_exportable(cfg, "llama", activation="swiglu", attn_out_bias=cfg.qkv_bias, **_PLAIN)
    return dict(hidden_act="silu", attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, **rope_decoder_hf(cfg))


def _llama_claims(cfg: ModelConfig) -> bool:
    return (cfg.family == "decoder" and cfg.position == "rope" and cfg.norm == "rmsnorm"
            and cfg.activation == "swiglu" and not cfg.norm_plus_one and cfg.qkv_bias == cfg.attn_out_bias)


register(Family("llama", "LlamaForCausalLM", llama_to_model_config, llama_to_hf, llama_like_tensors,
                _llama_claims))


# --------------------------------------------------------------------------- Qwen2


def qwen2_to_model_config(hf: dict) -> ModelConfig:
    expect(hf, "hidden_act", ("silu",), "silu")
    no_sliding_window(hf)
    return ModelConfig(activation="swiglu", qkv_bias=True, **rope_decoder_fields(hf, tie_default=False))


def qwen2_to_hf(cfg: ModelConfig) -> dict:
    check_exportable(cfg, "qwen2", activation="swiglu", qkv_bias=True, attn_out_bias=False, mlp_bias=False,
                     **_PLAIN)
    return dict(hidden_act="silu", use_sliding_window=False, sliding_window=None, **rope_decoder_hf(cfg))


def _qwen2_claims(cfg: ModelConfig) -> bool:
    return (cfg.family == "decoder" and cfg.position == "rope" and cfg.activation == "swiglu"
            and not cfg.norm_plus_one and cfg.qkv_bias and not cfg.attn_out_bias)


register(Family("qwen2", "Qwen2ForCausalLM", qwen2_to_model_config, qwen2_to_hf, llama_like_tensors,
                _qwen2_claims, priority=1))
