"""Gemma and Gemma 2.

Gemma: GeGLU (tanh GELU), ``(1 + w)`` RMSNorm (HF stores ``w``, as we do),
``sqrt(d_model)`` embedding scale, usually tied.  Gemma 2 adds sandwich norms
(HF ``post_attention_layernorm`` is the *post*-attention norm and
``pre_feedforward_layernorm`` the MLP input norm), ``query_pre_attn_scalar``,
attention / final logit soft-capping and sliding-window attention on the layers
``layer_types`` marks ``sliding_attention`` (by default the even ones).
"""

from __future__ import annotations

import functools

from jaxft.config.schema import ModelConfig
from jaxft.interop.families import Family, register
from jaxft.interop.families.common import check_exportable, expect, llama_like_tensors, unsupported
from jaxft.interop.families.llama import no_sliding_window, rope_decoder_fields, rope_decoder_hf
from jaxft.models.attention import is_local_layer

_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")
_COMMON = dict(family="decoder", activation="geglu", norm="rmsnorm", norm_plus_one=True, position="rope",
               embed_scale=True, embed_norm=False, mlp_bias=False)


def _attention_bias(hf: dict) -> bool:
    return bool(hf.get("attention_bias", False))


def _no_bidirectional(hf: dict) -> None:
    if hf.get("use_bidirectional_attention"):
        raise unsupported("use_bidirectional_attention", hf["use_bidirectional_attention"],
                          "only causal attention is supported")


# --------------------------------------------------------------------------- Gemma


def gemma_to_model_config(hf: dict) -> ModelConfig:
    # HF maps the legacy hidden_act "gelu" of the official Gemma configs to the tanh approximation.
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in (*_GELU_TANH, "gelu"):
        raise unsupported("hidden_act", act, f"supported: {', '.join(_GELU_TANH)}")
    no_sliding_window(hf)
    _no_bidirectional(hf)
    bias = _attention_bias(hf)
    return ModelConfig(activation="geglu", norm_plus_one=True, embed_scale=True, qkv_bias=bias,
                       attn_out_bias=bias, **rope_decoder_fields(hf, tie_default=True))


def gemma_to_hf(cfg: ModelConfig) -> dict:
    check_exportable(cfg, "gemma", attn_out_bias=cfg.qkv_bias, attn_logit_softcap=None, final_logit_softcap=None,
                     post_norms=False, sliding_window=None, query_pre_attn_scalar=None, **_COMMON)
    return dict(hidden_act="gelu_pytorch_tanh", attention_bias=cfg.qkv_bias, **rope_decoder_hf(cfg))


def _gemma_claims(cfg: ModelConfig) -> bool:
    return cfg.family == "decoder" and cfg.norm_plus_one and cfg.embed_scale and cfg.activation == "geglu"


register(Family("gemma", "GemmaForCausalLM", gemma_to_model_config, gemma_to_hf, llama_like_tensors,
                _gemma_claims, priority=1))


# --------------------------------------------------------------------------- Gemma 2


def _window_pattern(layer_types: list[str], window: int) -> int:
    """The smallest ``p`` such that layer i is sliding iff (i + 1) % p != 0."""
    n = len(layer_types)
    for p in range(1, n + 2):
        if all((t == "sliding_attention") == is_local_layer(i, window, p) for i, t in enumerate(layer_types)):
            return p
    raise unsupported("layer_types", layer_types, "sliding layers must follow a 'every p-th layer is global' "
                      "pattern")


def gemma2_to_model_config(hf: dict) -> ModelConfig:
    expect(hf, "hidden_activation", _GELU_TANH, "gelu_pytorch_tanh")
    _no_bidirectional(hf)
    fields = rope_decoder_fields(hf, tie_default=True)
    n_layers = fields["n_layers"]
    layer_types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                            for i in range(n_layers)]
    if len(layer_types) != n_layers or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise unsupported("layer_types", layer_types, f"need {n_layers} of sliding_attention / full_attention")
    window = hf.get("sliding_window")
    if window is None or "sliding_attention" not in layer_types:
        window, pattern = None, 2
    else:
        window = int(window)
        pattern = _window_pattern(layer_types, window)
    bias = _attention_bias(hf)
    scalar = hf.get("query_pre_attn_scalar")
    return ModelConfig(
        activation="geglu", norm_plus_one=True, embed_scale=True, qkv_bias=bias, attn_out_bias=bias,
        post_norms=True, query_pre_attn_scalar=None if scalar is None else float(scalar),
        sliding_window=window, sliding_window_pattern=pattern,
        attn_logit_softcap=None if hf.get("attn_logit_softcapping") is None else float(hf["attn_logit_softcapping"]),
        final_logit_softcap=None if hf.get("final_logit_softcapping") is None else float(
            hf["final_logit_softcapping"]), **fields)


def gemma2_to_hf(cfg: ModelConfig) -> dict:
    check_exportable(cfg, "gemma2", attn_out_bias=cfg.qkv_bias, post_norms=True, **_COMMON)
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"model.d_model={cfg.d_model} must be a multiple of model.n_heads={cfg.n_heads} "
                         "for HF gemma2")
    window, pattern = cfg.sliding_window, cfg.sliding_window_pattern
    layer_types = ["sliding_attention" if is_local_layer(i, window, pattern) else "full_attention"
                   for i in range(cfg.n_layers)]
    return dict(
        hidden_activation="gelu_pytorch_tanh", attention_bias=cfg.qkv_bias,
        query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.dim_per_head),
        # every layer global: HF's Gemma 2 still needs an int window (null breaks its masks);
        # the longest sequence, which no layer uses since none is a sliding layer
        sliding_window=window if window is not None else cfg.max_seq_len, layer_types=layer_types,
        attn_logit_softcapping=cfg.attn_logit_softcap,
        final_logit_softcapping=cfg.final_logit_softcap, **rope_decoder_hf(cfg))


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x  # HF types the field as int


def _gemma2_claims(cfg: ModelConfig) -> bool:
    return _gemma_claims(cfg) and cfg.post_norms


register(Family("gemma2", "Gemma2ForCausalLM", gemma2_to_model_config, gemma2_to_hf,
                functools.partial(llama_like_tensors, gemma2=True), _gemma2_claims, priority=2))
