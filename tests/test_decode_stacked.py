"""Decoding and scoring a model whose layers are stored stacked (`model.scan_layers`'s train state):
one scan over the stored arrays with a stacked KV cache, the same outputs as the per-layer model,
a program that does not grow with depth, and evaluation during training without unstacking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxft.config.schema import MeshConfig
from jaxft.eval.decode import DecodeConfig, _generate
from jaxft.eval.types import SplitModel, split_model
from jaxft.models.scan import has_stacks, merged, stack_layers
from jaxft.sharding import make_mesh, use_mesh

from test_decode import FAMILIES, batch, model_for, run


def stacked(model) -> SplitModel:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    out = SplitModel(graphdef, stack_layers(params, rest))
    assert has_stacks(out.states[0])
    return out


STRATEGIES = {
    "greedy": DecodeConfig(strategy="greedy", max_len=6, eos_id=1),
    "beam": DecodeConfig(strategy="beam", beam_size=2, n_best=2, max_len=6, eos_id=1),
    "sample": DecodeConfig(strategy="sample", n_best=2, max_len=6, eos_id=1, temperature=0.8),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stacked_layers_decode_as_the_per_layer_model(family):
    name, overrides = FAMILIES[family]
    cfg, model = model_for(name, **overrides)
    ids, lengths = batch(cfg, lengths=(7, 3, 5, 1))
    split = stacked(model)
    # sampling repeats the cache's rows, beam search gathers them: both on the stacked cache
    for strategy in ("greedy", "beam") if family not in ("llama-gqa", "mbart-learned") else STRATEGIES:
        want = run(model, cfg, STRATEGIES[strategy], ids, lengths)
        got = run(split, cfg, STRATEGIES[strategy], ids, lengths)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)


def _decode_jaxpr(name: str, n_layers: int, stack: bool) -> str:
    overrides = dict(n_layers=n_layers, n_decoder_layers=n_layers) if name == "tiny-mbart" else dict(n_layers=n_layers)
    cfg, model = model_for(name, **overrides)
    ids, _ = batch(cfg)
    graphdef, states = split_model(stacked(model) if stack else model)
    config = DecodeConfig(strategy="beam", beam_size=2, max_len=6, eos_id=1, decoder_start_id=cfg.decoder_start_id)

    def fn(states, ids):
        with merged(graphdef, *states) as m:
            enc = name == "tiny-mbart"
            return _generate(m, None if enc else ids, None, ids if enc else None, None,
                             jnp.zeros((ids.shape[0], 0), jnp.int32), jax.random.key(0), config=config)

    return str(jax.make_jaxpr(fn)(states, ids))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mbart"])
def test_the_stacked_decode_program_does_not_grow_with_depth(name):
    shallow, deep = _decode_jaxpr(name, 2, True), _decode_jaxpr(name, 5, True)
    assert "scan[" in deep and len(deep.splitlines()) == len(shallow.splitlines())
    assert deep.count("dot_general") == shallow.count("dot_general")
    unrolled = _decode_jaxpr(name, 5, False)  # the per-layer model unrolls: more products with depth
    assert unrolled.count("dot_general") > _decode_jaxpr(name, 2, False).count("dot_general")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_sharded_stacked_decoding_matches_unsharded(name):
    cfg, model = model_for(name)
    ids, lengths = batch(cfg, lengths=(7, 3, 5, 1))
    want = run(model, cfg, STRATEGIES["beam"], ids, lengths)
    split = stacked(model)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with use_mesh(mesh):
        states = tuple(jax.device_put(s, nnx.get_named_sharding(s, mesh)) for s in split.states)
        got = run(SplitModel(split.graphdef, states), cfg, STRATEGIES["beam"], ids, lengths)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)


def test_evaluation_during_a_scanned_run_scores_as_the_per_layer_model(tmp_path, monkeypatch):
    """`jaxft train` with `model.scan_layers` and `eval.every`: the hook hands the stacked train state
    to the evaluation as is, and its BLEU / chrF / answer-choice accuracies are those of the
    restored per-layer model."""
    import json

    import jaxft.eval.translate as translate
    from jaxft.config.loader import load_config
    from jaxft.data.tokenizer import Tokenizer
    from jaxft.eval.during_training import train_and_evaluate
    from jaxft.runs.model import restore_model
    from trainutil import read_jsonl, write_run_config

    records = [{"premise": f"The {w} is red.", "question": "effect", "choice1": "It is seen.", "choice2": "It sings.",
                "label": i % 2} for i, w in enumerate(["car", "house", "ball", "apple"])]
    (tmp_path / "copa_en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = write_run_config(tmp_path, steps=2, name="run")
    tree = yaml.safe_load(path.read_text())
    tree["model"]["scan_layers"] = True
    tree["data"]["dev"].append({"type": "jsonl", "path": str(tmp_path / "copa_en.jsonl"), "task": "multiple_choice",
                                "choice_format": "xcopa", "src_lang": "eng_Latn"})
    tree["eval"] = {"every": 2, "max_examples": 4, "decode": {"max_len": 8}}
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    cfg = load_config(path)

    seen = []
    original = translate.evaluate

    def spy(translator, *args, **kwargs):
        seen.append(isinstance(translator.model, SplitModel) and has_stacks(translator.model.states[0]))
        return original(translator, *args, **kwargs)

    monkeypatch.setattr(translate, "evaluate", spy)
    train_and_evaluate(cfg, base_dir=tmp_path)
    assert seen == [True]
    row = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"][-1]

    restored = restore_model(tmp_path / "run")
    tokenizer = Tokenizer.load(tmp_path / "run" / "tokenizer.model")
    report = original(translate.Translator(restored.model(), tokenizer, cfg.model, cfg.data), cfg, base_dir=tmp_path)
    want = report.averages()
    assert row["choices"]["copa_en"]["examples"] == 4 and set(row["scores"]) == set(report.scores)
    for key in ("bleu", "chrf", "chrfpp", "acc", "acc_norm"):
        assert row["average"][key] == pytest.approx(want[key], abs=1e-6), key
    assert want["chrf"] > 0


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_a_stacked_lora_model_decodes_as_the_per_layer_one(name):
    """A LoRA run's train state: trainable factors and frozen kernels stacked in two states."""
    from jaxft.config.schema import LoraConfig
    from jaxft.models import build_model
    from jaxft.peft.lora import LoRAParam, apply_lora

    cfg, _ = model_for(name)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LoraConfig(rank=4, targets=(r"(attn|self_attn|cross)/(q|v)/kernel$", r"mlp/\w+/kernel$")),
               rngs=nnx.Rngs(1))
    graphdef, factors, rest = nnx.split(model, LoRAParam, ...)
    rng = np.random.default_rng(0)  # non-zero B factors: the adapters change the outputs
    factors = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), factors)
    nnx.update(model, factors)
    ids, lengths = batch(cfg, lengths=(7, 3, 5, 1))
    want = run(model, cfg, STRATEGIES["beam"], ids, lengths)
    split = SplitModel(graphdef, stack_layers(factors, rest))
    assert has_stacks(split.states[0]) and has_stacks(split.states[1])
    got = run(split, cfg, STRATEGIES["beam"], ids, lengths)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)
    base = run(build_model(cfg, rngs=nnx.Rngs(0)), cfg, STRATEGIES["beam"], ids, lengths)
    assert not np.allclose(base.scores, want.scores)  # the adapters took part
