"""BLOOM: ALiBi, LayerNorm (also right after the embedding), biases everywhere,
4x tanh-GELU MLP, usually tied embeddings.

The fused ``query_key_value`` weight is ``[heads, 3, head_dim]`` along its output
dimension (q, k, v interleaved per head), split here into our q / k / v.
Checkpoints saved from a bare ``BloomModel`` lack the ``transformer.`` prefix.
``hidden_dropout`` / ``attention_dropout`` are ``model.dropout`` / ``attention_dropout``.
"""

from __future__ import annotations

import numpy as np

from jaxft.config.schema import ModelConfig
from jaxft.interop.families import Family, register
from jaxft.interop.families.common import Tensor, check_exportable, identity, linear, need, rate, unsupported


def bloom_to_model_config(hf: dict) -> ModelConfig:
    if hf.get("apply_residual_connection_post_layernorm"):
        raise unsupported("apply_residual_connection_post_layernorm", True, "only pre-norm residuals are supported")
    d_model = int(need(hf, "hidden_size", "n_embed"))
    n_heads = int(need(hf, "n_head", "num_attention_heads"))
    if d_model % n_heads:
        raise unsupported("n_head", n_heads, f"must divide hidden_size={d_model}")
    return ModelConfig(
        family="decoder", vocab_size=int(need(hf, "vocab_size")), d_model=d_model,
        n_layers=int(need(hf, "n_layer", "num_hidden_layers")), n_heads=n_heads, mlp_dim=4 * d_model,
        activation="gelu", norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), position="alibi",
        embed_norm=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), max_seq_len=int(hf.get("seq_length") or 2048),
        param_dtype="float32", dropout=rate(hf, "hidden_dropout", 0.0),
        attention_dropout=rate(hf, "attention_dropout", 0.0))


def bloom_to_hf(cfg: ModelConfig) -> dict:
    check_exportable(cfg, "bloom", family="decoder", activation="gelu", norm="layernorm", norm_plus_one=False,
                     position="alibi", embed_scale=False, embed_norm=True, qkv_bias=True, attn_out_bias=True,
                     mlp_bias=True, mlp_dim=4 * cfg.d_model, n_kv_heads=(None, cfg.n_heads),
                     head_dim=(None, cfg.d_model // cfg.n_heads), attn_logit_softcap=None, final_logit_softcap=None,
                     post_norms=False, sliding_window=None, query_pre_attn_scalar=None)
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                layer_norm_epsilon=cfg.norm_eps, apply_residual_connection_post_layernorm=False,
                tie_word_embeddings=cfg.tie_embeddings, seq_length=cfg.max_seq_len, hidden_dropout=cfg.dropout,
                attention_dropout=cfg.attention_dropout)


def _fused_qkv(hf: str, us: str, D: int, H: int, K: int) -> list[Tensor]:
    def split_w(w: np.ndarray) -> tuple[np.ndarray, ...]:
        w_HTKD = w.reshape(H, 3, K, D)
        return tuple(np.ascontiguousarray(w_HTKD[:, j].transpose(2, 0, 1)) for j in range(3))  # [D, H, K]

    def join_w(q, k, v) -> np.ndarray:
        return np.stack([x.transpose(1, 2, 0) for x in (q, k, v)], axis=1).reshape(3 * H * K, D)

    def split_b(b: np.ndarray) -> tuple[np.ndarray, ...]:
        b_HTK = b.reshape(H, 3, K)
        return tuple(np.ascontiguousarray(b_HTK[:, j]) for j in range(3))

    def join_b(q, k, v) -> np.ndarray:
        return np.stack([q, k, v], axis=1).reshape(-1)

    names = ("q", "k", "v")
    return [Tensor(f"{hf}weight", tuple(f"{us}{n}/kernel" for n in names), split_w, join_w),
            Tensor(f"{hf}bias", tuple(f"{us}{n}/bias" for n in names), split_b, join_b)]


def bloom_tensors(cfg: ModelConfig) -> list[Tensor]:
    D, H, F = cfg.d_model, cfg.n_heads, cfg.mlp_dim
    K = D // H
    p = "transformer."

    def norm(hf: str, us: str) -> list[Tensor]:
        return [identity(f"{hf}.weight", f"{us}/scale"), identity(f"{hf}.bias", f"{us}/bias")]

    out = [identity(f"{p}word_embeddings.weight", "embed/embedding"),
           *norm(f"{p}word_embeddings_layernorm", "embed_norm")]
    for i in range(cfg.n_layers):
        hf, us = f"{p}h.{i}.", f"layers/{i}/"
        out += norm(f"{hf}input_layernorm", f"{us}attn_norm")
        out += _fused_qkv(f"{hf}self_attention.query_key_value.", f"{us}attn/", D, H, K)
        out.append(linear(f"{hf}self_attention.dense.weight", f"{us}attn/o/kernel", (H, K), (D,)))
        out.append(identity(f"{hf}self_attention.dense.bias", f"{us}attn/o/bias"))
        out += norm(f"{hf}post_attention_layernorm", f"{us}mlp_norm")
        out.append(linear(f"{hf}mlp.dense_h_to_4h.weight", f"{us}mlp/up/kernel", (D,), (F,)))
        out.append(identity(f"{hf}mlp.dense_h_to_4h.bias", f"{us}mlp/up/bias"))
        out.append(linear(f"{hf}mlp.dense_4h_to_h.weight", f"{us}mlp/down/kernel", (F,), (D,)))
        out.append(identity(f"{hf}mlp.dense_4h_to_h.bias", f"{us}mlp/down/bias"))
    out += norm(f"{p}ln_f", "final_norm")
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", "lm_head/kernel", (D,), (cfg.vocab_size,)))
    return out


def _bloom_claims(cfg: ModelConfig) -> bool:
    return cfg.family == "decoder" and cfg.position == "alibi"


register(Family("bloom", "BloomForCausalLM", bloom_to_model_config, bloom_to_hf, bloom_tensors, _bloom_claims,
                priority=1, base_prefixes=("transformer.",)))
