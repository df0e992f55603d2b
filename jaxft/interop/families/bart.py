"""mBART / mBART-50 (``model_type: mbart``) and M2M100 / NLLB-200 (``m2m_100``): ``family: bart``.

HF names (``MBartForConditionalGeneration``, ``M2M100ForConditionalGeneration``)::

    model.shared.weight                                       -> embed/embedding
    model.{encoder,decoder}.embed_positions.weight            -> pos_embed (mBART: learned, offset 2)
    model.{encoder,decoder}.layernorm_embedding.{weight,bias} -> embed_norm (mBART only)
    model.{encoder,decoder}.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
    model.{encoder,decoder}.layers.{i}.self_attn_layer_norm  -> attn_norm
    model.decoder.layers.{i}.encoder_attn.* / encoder_attn_layer_norm -> cross / cross_norm
    model.{encoder,decoder}.layers.{i}.fc1, fc2, final_layer_norm -> mlp/up, mlp/down, mlp_norm
    model.{encoder,decoder}.layer_norm.{weight,bias}          -> final_norm
    lm_head.weight                                            (untied only)
    final_logits_bias                                         (mBART buffer: must be zeros)

M2M100's sinusoidal table is not a parameter (positions ``padding_idx + 1 +
index``: ``position_offset`` = pad_token_id + 1).  HF hard-codes LayerNorm eps
1e-5.  The encoder and decoder must share heads and FFN width.
"""

from __future__ import annotations

import numpy as np

from jaxft.config.schema import ModelConfig
from jaxft.interop.families import Family, register
from jaxft.interop.families.common import (Tensor, check_exportable, identity, linear, need, rate, reshaped,
                                           unsupported)

_ACTIVATIONS = {"gelu": "gelu_exact", "relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
_TO_HF_ACT = {"gelu_exact": "gelu", "relu": "relu", "gelu": "gelu_new"}
_IGNORABLE = (r"^(model\.)?(encoder|decoder)\.embed_tokens\.weight$",
              r"^(model\.)?(encoder|decoder)\.embed_positions\.weights?$")
# Fields of BART-style configs (fairseq heritage) that transformers' mBART/M2M100 ignore but that
# describe a different network than the one transformers (and jaxft) compute: refuse them.
_MUST_BE = {"normalize_before": True, "add_final_layer_norm": True, "add_bias_logits": False,
            "static_position_embeddings": False, "normalize_embedding": True}


def _same(hf: dict, enc: str, dec: str) -> int:
    a, b = int(need(hf, enc)), int(hf.get(dec) or need(hf, enc))
    if a != b:
        raise unsupported(dec, b, f"must equal {enc}={a} (jaxft's bart shares it between the stacks)")
    return a


def bart_to_model_config(hf: dict) -> ModelConfig:
    mbart = hf.get("model_type") == "mbart"
    for field, want in _MUST_BE.items():
        if field in hf and hf[field] is not None and bool(hf[field]) != want:
            raise unsupported(field, hf[field], f"only {want} is supported (pre-LN mBART/NLLB as released)")
    act = hf.get("activation_function", "gelu" if mbart else "relu")
    if act not in _ACTIVATIONS:
        raise unsupported("activation_function", act, f"supported: {', '.join(_ACTIVATIONS)}")
    d_model = int(need(hf, "d_model"))
    n_heads = _same(hf, "encoder_attention_heads", "decoder_attention_heads")
    if d_model % n_heads:
        raise unsupported("encoder_attention_heads", n_heads, f"must divide d_model={d_model}")
    pad = int(hf.get("pad_token_id", 1) if hf.get("pad_token_id") is not None else 1)
    return ModelConfig(
        family="bart", vocab_size=int(need(hf, "vocab_size")), d_model=d_model,
        n_layers=int(need(hf, "encoder_layers")), n_decoder_layers=int(need(hf, "decoder_layers")),
        n_heads=n_heads, mlp_dim=_same(hf, "encoder_ffn_dim", "decoder_ffn_dim"), activation=_ACTIVATIONS[act],
        norm="layernorm", norm_eps=1e-5, position="learned" if mbart else "sinusoidal",
        position_offset=2 if mbart else pad + 1, embed_scale=bool(hf.get("scale_embedding", False)),
        embed_norm=mbart, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True) is not False,
        max_seq_len=int(hf.get("max_position_embeddings") or 1024),
        init_std=float(hf.get("init_std", 0.02)),
        decoder_start_id=int(hf.get("decoder_start_token_id") if hf.get("decoder_start_token_id") is not None
                             else 2), param_dtype="float32",
        dropout=rate(hf, "dropout", 0.1), attention_dropout=rate(hf, "attention_dropout", 0.0 if mbart else 0.1),
        activation_dropout=rate(hf, "activation_dropout", 0.0))  # absent: transformers' class defaults


def _hf_config(cfg: ModelConfig, model_type: str) -> dict:
    mbart = model_type == "mbart"
    check_exportable(cfg, model_type, family="bart", norm="layernorm", norm_plus_one=False, norm_eps=1e-5,
                     position="learned" if mbart else "sinusoidal", embed_norm=mbart, qkv_bias=True,
                     attn_out_bias=True, mlp_bias=True, activation=tuple(_TO_HF_ACT),
                     n_kv_heads=(None, cfg.n_heads), head_dim=(None, cfg.d_model // cfg.n_heads))
    if mbart and cfg.position_offset != 2:
        raise ValueError(f"model.position_offset={cfg.position_offset} cannot be exported as HF 'mbart' (needs 2)")
    if not mbart and cfg.position_offset < 1:
        raise ValueError(f"model.position_offset={cfg.position_offset} cannot be exported as HF 'm2m_100' "
                         "(it is pad_token_id + 1)")
    out = dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, encoder_layers=cfg.n_layers,
               decoder_layers=cfg.n_decoder_layers or cfg.n_layers, encoder_attention_heads=cfg.n_heads,
               decoder_attention_heads=cfg.n_heads, encoder_ffn_dim=cfg.mlp_dim, decoder_ffn_dim=cfg.mlp_dim,
               activation_function=_TO_HF_ACT[cfg.activation], max_position_embeddings=cfg.max_seq_len,
               scale_embedding=cfg.embed_scale, tie_word_embeddings=cfg.tie_embeddings, init_std=cfg.init_std,
               is_encoder_decoder=True, bos_token_id=0, pad_token_id=1 if mbart else cfg.position_offset - 1,
               eos_token_id=2, decoder_start_token_id=2 if cfg.decoder_start_id is None else cfg.decoder_start_id,
               dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
               activation_dropout=cfg.activation_dropout)
    if mbart:
        out.update(normalize_before=True, add_final_layer_norm=True)
    return out


def _zero_logits_bias(vocab: int) -> Tensor:
    def check(b: np.ndarray) -> tuple:
        if np.any(b != 0):
            raise ValueError(f"final_logits_bias is not all zeros (max |x| = {float(np.abs(b).max()):.3g}): "
                             "jaxft's bart has no logits bias, so this checkpoint cannot be imported exactly")
        return ()

    return Tensor("final_logits_bias", (), check, lambda: np.zeros((1, vocab), np.float32), optional=True)


def bart_tensors(cfg: ModelConfig) -> list[Tensor]:
    D, H, F = cfg.d_model, cfg.n_heads, cfg.mlp_dim
    K = D // H
    out = [identity("model.shared.weight", "embed/embedding")]

    def norm(hf: str, us: str) -> None:
        out.extend([identity(f"{hf}.weight", f"{us}/scale"), identity(f"{hf}.bias", f"{us}/bias")])

    def attn(hf: str, us: str) -> None:
        for n in ("q", "k", "v"):
            out.append(linear(f"{hf}.{n}_proj.weight", f"{us}/{n}/kernel", (D,), (H, K)))
            out.append(reshaped(f"{hf}.{n}_proj.bias", f"{us}/{n}/bias", (H, K)))
        out.append(linear(f"{hf}.out_proj.weight", f"{us}/o/kernel", (H, K), (D,)))
        out.append(identity(f"{hf}.out_proj.bias", f"{us}/o/bias"))

    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers or cfg.n_layers)):
        s = f"model.{stack}"
        if cfg.position == "learned":
            out.append(identity(f"{s}.embed_positions.weight", f"{stack}/pos_embed/embedding"))
        if cfg.embed_norm:
            norm(f"{s}.layernorm_embedding", f"{stack}/embed_norm")
        for i in range(n_layers):
            hf, us = f"{s}.layers.{i}", f"{stack}/layers/{i}"
            attn(f"{hf}.self_attn", f"{us}/attn")
            norm(f"{hf}.self_attn_layer_norm", f"{us}/attn_norm")
            if stack == "decoder":
                attn(f"{hf}.encoder_attn", f"{us}/cross")
                norm(f"{hf}.encoder_attn_layer_norm", f"{us}/cross_norm")
            out.append(linear(f"{hf}.fc1.weight", f"{us}/mlp/up/kernel", (D,), (F,)))
            out.append(identity(f"{hf}.fc1.bias", f"{us}/mlp/up/bias"))
            out.append(linear(f"{hf}.fc2.weight", f"{us}/mlp/down/kernel", (F,), (D,)))
            out.append(identity(f"{hf}.fc2.bias", f"{us}/mlp/down/bias"))
            norm(f"{hf}.final_layer_norm", f"{us}/mlp_norm")
        norm(f"{s}.layer_norm", f"{stack}/final_norm")
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", "lm_head/kernel", (D,), (cfg.vocab_size,)))
    if cfg.position == "learned":
        out.append(_zero_logits_bias(cfg.vocab_size))
    return out


def _family(model_type: str, architecture: str, position: str) -> Family:
    return Family(model_type, architecture, bart_to_model_config, lambda cfg: _hf_config(cfg, model_type),
                  bart_tensors, lambda c: c.family == "bart" and c.position == position, ignorable=_IGNORABLE)


register(_family("mbart", "MBartForConditionalGeneration", "learned"))
register(_family("m2m_100", "M2M100ForConditionalGeneration", "sinusoidal"))
