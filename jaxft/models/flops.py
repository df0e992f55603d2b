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
    if cfg.family == "bart":
        return bart_param_count(cfg)
    if cfg.family == "t5":
        return t5_param_count(cfg)
    if cfg.family != "decoder":
        raise ValueError(f"param_count: model.family {cfg.family!r} is not supported yet; known: decoder")
    D, H, G, K, F, V = (cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.mlp_dim,
                        cfg.vocab_size)
    layer = _layer_matmul_params(cfg) + (4 if cfg.post_norms else 2) * _norm_params(cfg)
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
    if cfg.family == "t5":
        return t5_train_flops_per_token(cfg, seq_len)
    if cfg.family == "bart":
        return bart_train_flops_per_token(cfg, seq_len)
    if cfg.family != "decoder":
        raise ValueError(f"train_flops_per_token: model.family {cfg.family!r} is not supported yet")
    matmul = cfg.n_layers * _layer_matmul_params(cfg) + cfg.d_model * cfg.vocab_size
    attention = 2 * cfg.n_layers * seq_len * cfg.n_heads * cfg.dim_per_head
    return 6.0 * matmul + 6.0 * attention


def bart_param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters ``Bart(cfg)`` creates (mBART / NLLB / M2M100).

    Multi-head attention (q, k, v, o) per encoder layer, twice (self + cross)
    per decoder layer; plain MLP; LayerNorms before each block and after each
    stack; learned position tables only for ``position: learned``.
    """
    D, H, K, F, V = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.mlp_dim, cfg.vocab_size
    norm = _norm_params(cfg)
    attn = 4 * D * H * K + (3 * H * K if cfg.qkv_bias else 0) + (D if cfg.attn_out_bias else 0)
    mlp = 2 * D * F + (F + D if cfg.mlp_bias else 0)
    n_dec = cfg.n_layers if cfg.n_decoder_layers is None else cfg.n_decoder_layers
    per_stack = norm + (norm if cfg.embed_norm else 0)  # final_norm (+ embed_norm)
    if cfg.position == "learned":
        per_stack += (cfg.max_seq_len + cfg.position_offset) * D
    total = V * D + 2 * per_stack
    total += cfg.n_layers * (attn + mlp + 2 * norm) + n_dec * (2 * attn + mlp + 3 * norm)
    if not cfg.tie_embeddings:
        total += D * V
    return total


def bart_train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """mBART / NLLB training FLOPs per decoder token, one encoder token alongside each.

    Same convention as ``t5_train_flops_per_token`` (source and target both
    ``seq_len``; the head counts even when tied; biases, norms and position
    embeddings excluded); the MLP is always plain (up, down).
    """
    D, H, K, F, V = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.mlp_dim, cfg.vocab_size
    n_enc = cfg.n_layers
    n_dec = cfg.n_layers if cfg.n_decoder_layers is None else cfg.n_decoder_layers
    attn, mlp = 4 * D * H * K, 2 * D * F
    matmul = n_enc * (attn + mlp) + n_dec * (2 * attn + mlp) + D * V
    attention = 2 * seq_len * H * K * (n_enc + 2 * n_dec)
    return 6.0 * matmul + 6.0 * attention


def t5_param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters ``T5(cfg)`` creates (T5 / mT5 / umT5).

    Shared embedding; q, k, v, o (no biases) once per encoder layer and twice
    (self + cross) per decoder layer; MLP without biases; RMS norms before each
    block and after each stack; relative-bias tables [buckets, heads]: one per
    stack, or one per self-attention layer (``relative_bias_per_layer``, umT5).
    """
    D, H, K, F, V = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.mlp_dim, cfg.vocab_size
    n_enc, n_dec = cfg.n_layers, cfg.n_decoder_layers or cfg.n_layers
    attn = 4 * D * H * K
    mlp = (3 if cfg.activation in _GATED else 2) * D * F
    norm = _norm_params(cfg)
    tables = n_enc + n_dec if cfg.relative_bias_per_layer else 2
    total = V * D + tables * cfg.relative_buckets * H + 2 * norm
    total += n_enc * (attn + mlp + 2 * norm) + n_dec * (2 * attn + mlp + 3 * norm)
    if not cfg.tie_embeddings:
        total += D * V
    return total


def t5_train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """T5 training FLOPs per decoder token, with one encoder token alongside each.

    Source and target both ``seq_len`` long (the loop multiplies by
    ``batch * seq_len``), so per position::

        6 * (N_enc + N_dec + d_model * vocab)
        + 6 * 2 * seq_len * n_heads * head_dim * (n_enc + 2 * n_dec)

    ``N_enc``: q, k, v, o and MLP weights of the encoder layers; ``N_dec``: the
    decoder's self-attention, cross-attention (its k/v run on encoder tokens:
    same count per position) and MLP weights; the head counts even when tied.
    Attention scores and mixing: encoder self, decoder self and decoder cross
    (keys = the ``seq_len`` encoder tokens); masks are not subtracted.
    """
    D, H, K, F, V = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.mlp_dim, cfg.vocab_size
    n_enc, n_dec = cfg.n_layers, cfg.n_decoder_layers or cfg.n_layers
    attn = 4 * D * H * K
    mlp = (3 if cfg.activation in _GATED else 2) * D * F
    matmul = n_enc * (attn + mlp) + n_dec * (2 * attn + mlp) + D * V
    attention = 2 * seq_len * H * K * (n_enc + 2 * n_dec)
    return 6.0 * matmul + 6.0 * attention
