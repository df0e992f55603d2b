"""`model.init_from: hf:<dir>` starts training from a Hugging Face checkpoint."""

import jax
import numpy as np
import pytest

from jaxft.config.loader import load_config
from jaxft.interop.hf import init_params_from
from jaxft.train.loop import train
from trainutil import read_jsonl

from trainutil import save_tiny_hf_llama, write_run_config

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def test_training_starts_from_hf_weights(tmp_path):
    hf_dir = save_tiny_hf_llama(tmp_path / "hf")
    path = write_run_config(tmp_path, steps=2, extra={"train.frozen": ["^embed/"]})
    text = path.read_text().replace("preset: tiny-llama", f"preset: tiny-llama\n  init_from: hf:{hf_dir}")
    text = text.replace("max_seq_len: 2048", "max_seq_len: 128")
    path.write_text(text)
    cfg = load_config(path, ["model.max_seq_len=128", "model.norm_eps=1e-6"])
    result = train(cfg, base_dir=tmp_path)
    # The frozen embedding table is still exactly the HF one after training.
    from jaxft.runs.checkpoint import Checkpointer
    ckpt = Checkpointer(result.run_dir / "checkpoints", cfg.checkpoint, read_only=True)
    import orbax.checkpoint as ocp
    restored = ckpt.manager.restore(2, args=ocp.args.Composite(rest=ocp.args.StandardRestore()))["rest"]
    ckpt.close()
    emb = np.asarray(restored["embed"]["embedding"]["value"])
    hf_emb = transformers.LlamaForCausalLM.from_pretrained(hf_dir).model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(emb, hf_emb)
    loaded = init_params_from(cfg.model.init_from, cfg.model, None)
    q = np.asarray(jax.device_get(loaded["layers"][0]["attn"]["q"]["kernel"][...]))
    assert q.shape == (32, 4, 8)
    dev0 = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if r["kind"] == "dev"][0]["dev_loss"]
    assert all(abs(v - np.log(512)) < 0.5 for v in dev0.values())  # a random-init HF model is ~uniform
    # dropout rates are training settings, not architecture: any rate starts from the checkpoint
    import dataclasses

    rates = dataclasses.replace(cfg.model, dropout=0.3, attention_dropout=0.2, activation_dropout=0.1)
    assert init_params_from(cfg.model.init_from, rates, None)["layers"][0]["attn"]["q"]["kernel"][...].shape == q.shape
