"""HF PEFT export of LoRA adapters on encoder-decoders (T5 v1.1, mBART), checked numerically.

A tiny random HF model is saved with ``save_pretrained`` and imported with ``load_hf``;
LoRA with the default targets (self-attention q/k/v/o of both stacks and the decoder's
cross-attention) gets random non-zero B factors, and some modules_to_save (the embedding among
them) are perturbed; ``save_adapter`` writes the PEFT folder, ``peft.PeftModel.from_pretrained``
loads it on the HF model, and transformers' logits must equal ours on a right-padded batch (at
non-pad decoder positions).  mBART adds rsLoRA, a rank_pattern / alpha_pattern on
cross-attention and a tied embedding.
"""

import dataclasses
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.config.schema import LoraConfig
from jaxft.models.registry import build_model
from jaxft.peft.lora import adapters, apply_lora, save_adapter

from test_interop_encdec import _pad_and_start, assert_close, batch, hf_logits, make_hf_model
from test_lora_options import perturb
from test_peft_lora import randomize_b

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# case -> (LoRA config, perturbed saved tensors, HF modules_to_save, decoder layer-0 prefix,
#          self- / cross-attention module names, HF q, k, v, o names)
CASES = {
    # jaxft unties the head (lm_head = shared); HF keeps lm_head tied to shared, and embeds with
    # encoder.embed_tokens / decoder.embed_tokens (their weight tied to shared's)
    "t5_v1_1_saved_by_tf5": (
        LoraConfig(rank=4, alpha=8.0, modules_to_save=("^embed/", "decoder/layers/0/cross_norm")),
        ["embed/embedding", "decoder/layers/0/cross_norm/scale"],
        ["decoder.block.0.layer.1.layer_norm", "decoder.embed_tokens", "encoder.embed_tokens", "shared"],
        "decoder.block.0.layer", ("0.SelfAttention", "1.EncDecAttention"), ("q", "k", "v", "o")),
    "mbart": (  # tied embedding: shared, both embed_tokens and lm_head
        LoraConfig(rank=4, alpha=8.0, rslora=True, rank_pattern={r"cross/(q|v)": 2},
                   alpha_pattern={r"decoder/layers/1/cross/o": 3.0}, modules_to_save=("^embed/",)),
        ["embed/embedding"],
        ["lm_head", "model.decoder.embed_tokens", "model.encoder.embed_tokens", "model.shared"],
        "model.decoder.layers", ("0.self_attn", "0.encoder_attn"), ("q_proj", "k_proj", "v_proj", "out_proj")),
}


def _jaxft_logits(model, enc, enc_mask, dec, dec_mask) -> np.ndarray:
    args = [jnp.asarray(x, jnp.int32) for x in (enc, enc_mask, dec, dec_mask)]
    return np.asarray(nnx.jit(lambda m, e, em, d, dm: m(e, None, em, d, None, dm))(model, *args))


@pytest.mark.parametrize("case", list(CASES))
def test_peft_export_matches_transformers(case, tmp_path):
    lcfg, perturbed, hf_saved, dec0, (self_attn, cross), short = CASES[case]
    hf_model = make_hf_model(case)
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    from jaxft.interop import load_hf

    cfg, state = load_hf(tmp_path / "hf")
    cfg = dataclasses.replace(cfg, dtype="float32")
    model = build_model(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, state)
    apply_lora(model, lcfg, rngs=nnx.Rngs(1))
    paths = {p for p, _, _, _ in adapters(model)}
    assert len(paths) == 4 * (cfg.n_layers + 2 * cfg.n_decoder_layers) and "decoder/layers/0/cross/q" in paths
    randomize_b(model, std=0.3)
    perturb(model, perturbed)

    start, pad = _pad_and_start(hf_model)
    enc, enc_mask, dec, dec_mask = batch(start, pad)
    ours = _jaxft_logits(model, enc, enc_mask, dec, dec_mask)
    out = save_adapter(tmp_path / "adapter", model, lcfg, cfg)
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["peft"], meta.get("peft_skipped")
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and sorted(config["target_modules"]) == sorted(short)
    assert config["use_rslora"] is lcfg.rslora and config["modules_to_save"] == hf_saved

    base = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(base, out / "peft").eval()
    theirs = hf_logits(peft_model, enc, enc_mask, dec, dec_mask)
    diff = assert_close(ours, theirs, dec_mask)
    real = dec_mask.astype(bool)
    tol = 1e-4 * max(1.0, float(np.abs(theirs[real]).max()))

    def module(name):
        return peft_model.base_model.model.get_submodule(name)

    with peft_model.disable_adapter():
        effect = float(np.abs(theirs - hf_logits(peft_model, enc, enc_mask, dec, dec_mask))[real].max())
    with torch.no_grad():  # the cross-attention adapters alone matter too
        cross_b = [m.lora_B["default"].weight for n, m in peft_model.named_modules()
                   if n.split(".")[-1] in short and cross.split(".")[-1] in n]
        assert len(cross_b) == 4 * cfg.n_decoder_layers
        kept = [b.clone() for b in cross_b]
        for b in cross_b:
            b.zero_()
        cross_effect = float(np.abs(theirs - hf_logits(peft_model, enc, enc_mask, dec, dec_mask))[real].max())
        for b, k in zip(cross_b, kept):
            b.copy_(k)
    print(f"{case}: max|diff| {diff:.2e} (tol {tol:.2e}); adapter effect {effect:.2f}, cross-attention "
          f"adapters alone {cross_effect:.2f}")
    assert effect > 100 * tol and cross_effect > 100 * tol

    if lcfg.rslora:  # rank_pattern on cross-attention q/v: rank 2, scale alpha / sqrt(2)
        q, k = module(f"{dec0}.{cross}.q_proj"), module(f"{dec0}.{cross}.k_proj")
        assert (q.r["default"], k.r["default"], module(f"{dec0}.{self_attn}.q_proj").r["default"]) == (2, 4, 4)
        assert q.scaling["default"] == pytest.approx(8 / math.sqrt(2))
        assert k.scaling["default"] == pytest.approx(8 / 2)
        assert module(f"{dec0}.{cross}.out_proj").scaling["default"] == pytest.approx(8 / 2)
        assert module(f"{dec0}.1.encoder_attn.out_proj").scaling["default"] == pytest.approx(3 / 2)
