"""T5 (v1.0 and v1.1), mT5 and umT5 (``family: t5``).

HF names (``T5ForConditionalGeneration``; mT5/umT5 the same)::

    shared.weight                                              -> embed/embedding
    {encoder,decoder}.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight
    {encoder,decoder}.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                      (T5/mT5: the stack's table; umT5: every block has one)
    {encoder,decoder}.block.{i}.layer.0.layer_norm.weight      -> attn_norm
    decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}.weight / layer.1.layer_norm
    ....layer.{1 enc, 2 dec}.DenseReluDense.{wi | wi_0, wi_1, wo}.weight / layer_norm
    {encoder,decoder}.final_layer_norm.weight
    lm_head.weight                                             (untied only)

Dropout: HF's one ``dropout_rate`` (used at every site) imports as all three of
``dropout``, ``attention_dropout`` and ``activation_dropout``; export writes
``dropout_rate`` = ``model.dropout``.

Head and output scaling.  T5 v1.0 ties the head to ``shared`` and scales the
decoder output by ``d_model ** -0.5``; v1.1/mT5/umT5 have a separate head and
no scaling.  transformers 5 always ties ``lm_head`` to ``shared`` unless the
checkpoint holds a *different* ``lm_head.weight``, and keeps only whether to
scale (``scale_decoder_outputs``, derived from ``tie_word_embeddings`` when
absent; MT5 models never scale).  So: scaled -> ``tie_embeddings: true``;
not scaled -> ``tie_embeddings: false`` with ``lm_head`` = ``lm_head.weight``,
or ``shared.weight`` when the checkpoint has none (a transformers 5
``save_pretrained``).  Export writes ``tie_word_embeddings`` and both tensors
when untied, which transformers 4 and 5 load as untied.
"""

from __future__ import annotations

import dataclasses

from jaxft.config.schema import ModelConfig
from jaxft.interop.families import Family, register
from jaxft.interop.families.common import Tensor, check_exportable, identity, linear, need, rate, unsupported

# feed_forward_proj -> our activation (HF's "gated-gelu" is the tanh GELU, "gelu_new").
_ACTIVATIONS = {"relu": "relu", "gated-gelu": "geglu", "gated-gelu_new": "geglu",
                "gated-gelu_pytorch_tanh": "geglu"}
# Copies of ``shared`` (tied in every transformers version) and a table HF never uses.
_IGNORABLE = (r"^(encoder|decoder)\.embed_tokens\.weight$",
              r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$")


def scales_decoder_outputs(hf: dict) -> bool:
    """Does transformers 5 scale the decoder output by d_model**-0.5 (tied T5 v1.0 head)?"""
    if hf.get("model_type") == "mt5":
        return False
    if hf.get("scale_decoder_outputs") is not None:
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def t5_to_model_config(hf: dict) -> ModelConfig:
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _ACTIVATIONS:
        raise unsupported("feed_forward_proj", proj, f"supported: {', '.join(sorted(_ACTIVATIONS))}")
    if hf.get("is_decoder") or hf.get("is_encoder_decoder") is False:
        raise unsupported("is_encoder_decoder", False, "only the full encoder-decoder model is supported")
    d_model, n_heads = int(need(hf, "d_model")), int(need(hf, "num_heads"))
    n_layers = int(need(hf, "num_layers"))
    per_layer = hf.get("model_type") == "umt5"
    return ModelConfig(
        family="t5", vocab_size=int(need(hf, "vocab_size")), d_model=d_model, n_layers=n_layers,
        n_decoder_layers=int(hf.get("num_decoder_layers") or n_layers), n_heads=n_heads,
        head_dim=int(need(hf, "d_kv")), mlp_dim=int(need(hf, "d_ff")), activation=_ACTIVATIONS[proj],
        norm="rmsnorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), position="relative",
        relative_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        relative_bias_per_layer=per_layer, tie_embeddings=scales_decoder_outputs(hf),
        max_seq_len=int(hf.get("n_positions") or 512), init_std=float(hf.get("initializer_factor", 1.0)),
        decoder_start_id=int(hf.get("decoder_start_token_id") or 0), param_dtype="float32",
        **dict.fromkeys(("dropout", "attention_dropout", "activation_dropout"), rate(hf, "dropout_rate", 0.1)))


def _hf_config(cfg: ModelConfig, model_type: str, per_layer: bool) -> dict:
    check_exportable(cfg, model_type, family="t5", norm="rmsnorm", norm_plus_one=False, position="relative",
                     activation=("relu", "geglu"), relative_bias_per_layer=per_layer,
                     n_kv_heads=(None, cfg.n_heads), qkv_bias=False, attn_out_bias=False, mlp_bias=False,
                     embed_scale=False, embed_norm=False)
    if model_type == "mt5" and cfg.tie_embeddings:
        raise ValueError("model.tie_embeddings=True cannot be exported as HF 'mt5' (transformers 5 never "
                         "scales MT5 decoder outputs); export as 't5'")
    out = dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.dim_per_head, d_ff=cfg.mlp_dim,
               num_layers=cfg.n_layers, num_decoder_layers=cfg.n_decoder_layers or cfg.n_layers,
               num_heads=cfg.n_heads, relative_attention_num_buckets=cfg.relative_buckets,
               relative_attention_max_distance=cfg.relative_max_distance, layer_norm_epsilon=cfg.norm_eps,
               feed_forward_proj="relu" if cfg.activation == "relu" else "gated-gelu",
               initializer_factor=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
               is_encoder_decoder=True, pad_token_id=0, eos_token_id=1,
               decoder_start_token_id=0 if cfg.decoder_start_id is None else cfg.decoder_start_id,
               dropout_rate=cfg.dropout)
    if model_type != "mt5":
        out["scale_decoder_outputs"] = cfg.tie_embeddings
    return out


def t5_tensors(cfg: ModelConfig) -> list[Tensor]:
    D, H, K, F = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.mlp_dim
    out = [identity("shared.weight", "embed/embedding")]

    def attn(hf: str, us: str) -> None:
        for n in ("q", "k", "v"):
            out.append(linear(f"{hf}.{n}.weight", f"{us}/{n}/kernel", (D,), (H, K)))
        out.append(linear(f"{hf}.o.weight", f"{us}/o/kernel", (H, K), (D,)))

    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers or cfg.n_layers)):
        for i in range(n_layers):
            hf, us = f"{stack}.block.{i}.layer", f"{stack}/layers/{i}"
            attn(f"{hf}.0.SelfAttention", f"{us}/attn")
            table = f"{hf}.0.SelfAttention.relative_attention_bias.weight"
            if cfg.relative_bias_per_layer:
                out.append(identity(table, f"{us}/attn/rel_bias/embedding"))
            elif i == 0:  # HF keeps the stack's shared table in block 0
                out.append(identity(table, f"{stack}/rel_bias/embedding"))
            out.append(identity(f"{hf}.0.layer_norm.weight", f"{us}/attn_norm/scale"))
            m = 1
            if stack == "decoder":
                attn(f"{hf}.1.EncDecAttention", f"{us}/cross")
                out.append(identity(f"{hf}.1.layer_norm.weight", f"{us}/cross_norm/scale"))
                m = 2
            ff = f"{hf}.{m}.DenseReluDense"
            if cfg.activation == "relu":
                out.append(linear(f"{ff}.wi.weight", f"{us}/mlp/up/kernel", (D,), (F,)))
            else:
                out.append(linear(f"{ff}.wi_0.weight", f"{us}/mlp/gate/kernel", (D,), (F,)))
                out.append(linear(f"{ff}.wi_1.weight", f"{us}/mlp/up/kernel", (D,), (F,)))
            out.append(linear(f"{ff}.wo.weight", f"{us}/mlp/down/kernel", (F,), (D,)))
            out.append(identity(f"{hf}.{m}.layer_norm.weight", f"{us}/mlp_norm/scale"))
        out.append(identity(f"{stack}.final_layer_norm.weight", f"{stack}/final_norm/scale"))
    if not cfg.tie_embeddings:
        head = linear("lm_head.weight", "lm_head/kernel", (D,), (cfg.vocab_size,))
        out.append(dataclasses.replace(head, fallback="shared.weight"))
    return out


def _family(model_type: str, architecture: str, per_layer: bool, claims, priority: int = 0,
            aliases: tuple[str, ...] = ()) -> Family:
    return Family(model_type, architecture, t5_to_model_config,
                  lambda cfg: _hf_config(cfg, model_type, per_layer), t5_tensors, claims, priority=priority,
                  other_architectures=aliases, ignorable=_IGNORABLE)


register(_family("t5", "T5ForConditionalGeneration", False,
                 lambda c: c.family == "t5" and not c.relative_bias_per_layer, aliases=("T5WithLMHeadModel",)))
register(_family("mt5", "MT5ForConditionalGeneration", False, lambda c: False, priority=-1,
                 aliases=("T5ForConditionalGeneration",)))
register(_family("umt5", "UMT5ForConditionalGeneration", True,
                 lambda c: c.family == "t5" and c.relative_bias_per_layer))
