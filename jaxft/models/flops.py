"""Analytic parameter counts and training FLOPs per token (for MFU).

``train_flops_per_token(cfg, seq_len)`` follows the PaLM appendix-B convention::

    6 * N_matmul  +  6 * 2 * n_layers * seq_len * n_heads * head_dim

- ``N_matmul``: weights that take part in a matmul per token: q, k, v, o,
  the MLP (gate,) up, down in every layer, and the output head
  (``d_model * vocab``, counted even when tied to the embedding, since the
  matmul still runs).  The embedding lookup, norms and biases are excluded.
  Forward = 2 FLOPs per weight per token, backward = 4, hence 6.
- attention: per layer and token, ``q @ k^T`` and ``probs @ v`` each cost
  ``2 * seq_len * n_heads * head_dim`` forward; times 3 for forward+backward.
  The causal mask is not subtracted (the usual convention for MFU).
"""

from __future__ import annotations

from jaxft.config.schema import ModelConfig

_GATED = ("swiglu", "geglu")


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" else 1)


def _layer_matmul_params(cfg: ModelConfig) -> int:
    D, H, G, K, F = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.mlp_dim
    attn = D * H * K + 2 * D * G * K + H * K * D
    mlp = (3 if cfg.activation in _GATED else 2) * D * F
    return attn + mlp


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters ``build_model(cfg)`` creates."""
    if cfg.family != "decoder":
        raise ValueError(f"param_count: model.family {cfg.family!r} is not supported yet; known: decoder")
    D, H, G, K, F, V = (cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.mlp_dim,
                        cfg.vocab_size)
    layer = _layer_matmul_params(cfg) + 2 * _norm_params(cfg)
    if cfg.qkv_bias:
        layer += H * K + 2 * G * K
    if cfg.attn_out_bias:
        layer += D
    if cfg.mlp_bias:
        layer += (2 if cfg.activation in _GATED else 1) * F + D
    total = V * D + cfg.n_layers * layer + _norm_params(cfg)
    if cfg.embed_norm:
        total += _norm_params(cfg)
    if not cfg.tie_embeddings:
        total += D * V
    return total


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at sequence length ``seq_len``."""
    if cfg.family != "decoder":
        raise ValueError(f"train_flops_per_token: model.family {cfg.family!r} is not supported yet")
    matmul = cfg.n_layers * _layer_matmul_params(cfg) + cfg.d_model * cfg.vocab_size
    attention = 2 * cfg.n_layers * seq_len * cfg.n_heads * cfg.dim_per_head
    return 6.0 * matmul + 6.0 * attention
