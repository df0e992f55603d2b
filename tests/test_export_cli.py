"""`jaxft export`: merged LoRA (HF, checked against transformers), the adapter alone (HF PEFT,
checked against `peft.PeftModel`), the LT-SFT sparse diff, and `--checkpoint N`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxft.cli import main
from jaxft.config.loader import load_config
from jaxft.peft.sparse import apply_diff, load_diff
from jaxft.runs.export import theta0_params
from jaxft.runs.model import restore_model
from jaxft.train.loop import train

from trainutil import write_run_config

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

IDS = (np.arange(16, dtype=np.int64).reshape(2, 8) * 37) % 500 + 3


def _run(tmp, hf_dir, name: str, peft_cfg: dict, steps: int = 4):
    path = write_run_config(tmp, steps=steps, name=name)
    raw = yaml.safe_load(path.read_text())
    raw["model"].update(init_from=f"hf:{hf_dir}", max_seq_len=128, norm_eps=1e-6)
    raw["peft"] = peft_cfg
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return train(load_config(path), base_dir=tmp).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rms_norm_eps=1e-6, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp / "hf", safe_serialization=True)
    lora = _run(tmp, tmp / "hf", "lora", {"method": "lora", "lora": {"rank": 2, "alpha": 4.0}})
    return tmp, lora


def jaxft_logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS, jnp.int32)))


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def test_merge_lora_hf_matches_transformers_and_adapter_matches_peft(runs, tmp_path):
    tmp, lora = runs
    want = jaxft_logits(restore_model(lora).model())
    merged = tmp_path / "merged"
    assert main(["export", str(lora), str(merged), "--format", "hf", "--merge-lora"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    got = torch_logits(hf)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    base_logits = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32))
    assert np.abs(got - base_logits).max() > 1e-4  # the trained adapter is in the merged export
    # the tokenizer travels with the model: the run's SentencePiece model, loadable by transformers
    assert (merged / "tokenizer.model").read_bytes() == (lora / "tokenizer.model").read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    assert tok.convert_ids_to_tokens(5) is not None

    adapter = tmp_path / "adapter"
    assert main(["export", str(lora), str(adapter), "--format", "hf", "--adapter"]) == 0
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp / "hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()
    np.testing.assert_allclose(torch_logits(with_adapter), got, rtol=1e-4, atol=1e-4)


def test_checkpoint_step_selects_that_step(runs, tmp_path, capsys):
    _, lora = runs
    out = tmp_path / "step2"
    assert main(["export", str(lora), str(out), "--checkpoint", "2"]) == 0
    from jaxft.peft.compose import _model_from, load_checkpoint

    got = jaxft_logits(_model_from(load_checkpoint(out)))
    np.testing.assert_allclose(got, jaxft_logits(restore_model(lora, 2).model()), rtol=1e-5, atol=1e-5)
    assert np.abs(got - jaxft_logits(restore_model(lora).model())).max() > 1e-5  # not step 4
    capsys.readouterr()
    assert main(["export", str(lora), str(tmp_path / "step3"), "--checkpoint", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 3" in err[0] and "steps: 2, 4" in err[0], err
    assert not (tmp_path / "step3").exists()
    with pytest.raises(SystemExit):
        main(["export", str(lora), str(tmp_path / "x"), "--checkpoint", "newest"])
    with pytest.raises(SystemExit):  # one or the other
        main(["export", str(lora), str(tmp_path / "x"), "--adapter", "--merge-lora"])


def test_adapter_of_sparse_run_is_its_diff_and_full_runs_refuse(runs, tmp_path, capsys):
    tmp, _ = runs
    sparse = _run(tmp, tmp / "hf", "sparse", {"method": "sparse", "sparse": {"phase1_steps": 2, "k": 0.01}})
    out = tmp_path / "diff"
    assert main(["export", str(sparse), str(out), "--adapter"]) == 0
    restored = restore_model(sparse)
    diff = load_diff(out)
    total = sum(int(x.size) for x in jax.tree.leaves(restored.params))
    assert 0 < diff.count <= round(0.01 * total)  # at most the K entries phase 2 trained
    rebuilt = apply_diff(theta0_params(restored.config), diff)
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(restored.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    capsys.readouterr()
    assert main(["export", str(sparse), str(tmp_path / "hfdiff"), "--adapter", "--format", "hf"]) == 2
    assert "no Hugging Face format" in capsys.readouterr().err
    full = tmp_path / "full"  # refused from the run's config alone, before any checkpoint is read
    full.mkdir()
    raw = yaml.safe_load((sparse / "config.yaml").read_text())
    raw["peft"]["method"] = "none"
    (full / "config.yaml").write_text(yaml.safe_dump(raw))
    assert main(["export", str(full), str(tmp_path / "fulladapter"), "--adapter"]) == 2
    assert "peft.method none" in capsys.readouterr().err
    assert not (tmp_path / "hfdiff").exists() and not (tmp_path / "fulladapter").exists()


def test_hf_export_carries_the_runs_chat_template(runs, tmp_path):
    """A run trained with `data.chat_template` (built-in or Jinja) exports it as the HF folder's
    chat template (chat_template.jinja and tokenizer_config.json), which jaxft and transformers
    read back; a run without one leaves the tokenizer's own."""
    import dataclasses

    from jaxft.data.chat import BUILTIN_TEMPLATES
    from jaxft.interop.hf_tokenizer import read_chat_template
    from jaxft.runs.export import _write, plain_params

    _, lora = runs
    restored = restore_model(lora)
    cfg, params = restored.config, plain_params(restored.model())
    from jaxft.runs.layout import RunDir

    tok = RunDir(lora).tokenizer  # the run's SentencePiece model: export writes a tokenizer_config.json
    assert tok.is_file()
    jinja = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    for setting, want in (("chatml", BUILTIN_TEMPLATES["chatml"]), (jinja, jinja)):
        out = tmp_path / f"hf-{len(want)}"
        out.mkdir()
        run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, chat_template=setting))
        _write(out, run_cfg, params, tok, "hf", None)
        assert (out / "chat_template.jinja").read_text() == want
        assert read_chat_template(out) == want
        assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == want
    plain = tmp_path / "plain"
    plain.mkdir()
    _write(plain, dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, chat_template=None)), params,
           tok, "hf", None)
    assert not (plain / "chat_template.jinja").exists()
