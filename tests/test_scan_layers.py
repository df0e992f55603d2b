"""``model.scan_layers``: one ``jax.lax.scan`` over the layers computes what the unrolled loop
computes (loss and every gradient, dropout on, each remat policy, every family, Gemma 2's
local / global layers: the unrolled path is the one checked against HF), in the sharded train
step with LoRA and end to end with LT-SFT and a restore,
with the same parameter paths; the scanned program holds one copy of the layer body."""

from __future__ import annotations

import dataclasses
import logging
import re

import yaml

import jax
import numpy as np
import pytest
from flax import nnx

from jaxft.config.loader import load_config
from jaxft.config.schema import LoraConfig, MeshConfig, PeftConfig, TrainConfig
from jaxft.models import build_model
from jaxft.models.registry import model_input_keys
from jaxft.train.step import make_loss_fn

from test_dropout import RATES, make_batch, one_step, preset
from trainutil import write_run_config

FAMILIES = {
    "llama": dict(name="tiny-llama", n_layers=3),
    "gemma2": dict(name="tiny-gemma", n_layers=4, sliding_window=4, post_norms=True, attn_logit_softcap=50.0,
                   final_logit_softcap=30.0),
    "t5": dict(name="tiny-t5", n_layers=3, n_decoder_layers=2),
    "umt5": dict(name="tiny-umt5", n_layers=3, n_decoder_layers=2),
    "mbart": dict(name="tiny-mbart", n_layers=3, n_decoder_layers=2),
}


def cfg_of(family: str, **overrides):
    kw = {**FAMILIES[family], **overrides}
    return preset(kw.pop("name"), **kw)


def loss_and_grads(cfg, batch, key=None):
    graphdef, params, rest = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    loss_fn = jax.jit(jax.grad(make_loss_fn(graphdef, TrainConfig(), model_input_keys(cfg)), has_aux=True))
    grads, aux = loss_fn(params, rest, batch, key)
    return float(aux["loss_sum"]), grads


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    paths_a = [p for p, _ in jax.tree_util.tree_flatten_with_path(grads_a)[0]]
    paths_b = [p for p, _ in jax.tree_util.tree_flatten_with_path(grads_b)[0]]
    assert paths_a == paths_b  # the same parameters under the same paths
    for g_a, g_b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(g_b, g_a, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("family,remat", [("gemma2", "full"), ("t5", "dots"), ("umt5", "none"),
                                          ("mbart", "full")])  # LLaMA: the sharded LoRA test
def test_scan_equals_the_unrolled_layers(family, remat):
    cfg = cfg_of(family, remat=remat, **RATES)
    batch = make_batch(cfg, rows=2, length=10)
    key = jax.random.key(7)
    unrolled = loss_and_grads(cfg, batch, key)
    scanned = loss_and_grads(dataclasses.replace(cfg, scan_layers=True), batch, key)
    assert_same(unrolled, scanned)  # dropout on: the same masks in both
    if family == "gemma2":
        assert abs(loss_and_grads(cfg, batch)[0] - unrolled[0]) > 1e-4  # ... and dropout did act


def _jaxpr(cfg, batch) -> str:
    graphdef, params, rest = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    loss_fn = jax.grad(make_loss_fn(graphdef, TrainConfig(), model_input_keys(cfg)), has_aux=True)
    return str(jax.make_jaxpr(loss_fn)(params, rest, batch))


def test_the_scanned_program_holds_one_layer_body():
    cfg = cfg_of("llama", n_layers=8)
    batch = make_batch(cfg, rows=2, length=8)
    unrolled, scanned = _jaxpr(cfg, batch), _jaxpr(dataclasses.replace(cfg, scan_layers=True), batch)
    dots = lambda text: len(re.findall(r"\bdot_general\[", text))  # noqa: E731
    assert "scan[" in scanned and "scan[" not in unrolled
    # 8 layers x 7 projections x (forward + 2 backward) in the loop; one layer's worth in the scan
    assert dots(unrolled) >= 8 * 7 * 3 and dots(scanned) <= dots(unrolled) / 4


MESH = MeshConfig(data=2, fsdp=2, tensor=2)


def test_sharded_lora_train_steps_match():
    """data x fsdp x tensor mesh, LoRA with dropout on every layer's q/k/v/o, full remat (which
    `nnx.remat` could not lift for LoRA-wrapped layers: both paths checkpoint a pure function)."""
    cfg = cfg_of("llama", dropout=0.1, remat="full")
    peft = PeftConfig(method="lora", lora=LoraConfig(rank=4, dropout=0.1))
    _, unrolled = one_step(cfg, MESH, peft=peft, steps=2)
    _, scanned = one_step(dataclasses.replace(cfg, scan_layers=True), MESH, peft=peft, steps=2)
    np.testing.assert_allclose(scanned, unrolled, rtol=2e-5)
    assert unrolled[1] < unrolled[0]  # it trained


def test_layers_of_different_structure_fall_back_to_the_loop(caplog):
    """LoRA on layer 1's q only: the layers cannot share one body; the stack runs unrolled
    (one warning) and computes the same numbers."""
    from jaxft.peft.lora import apply_lora

    cfg = cfg_of("llama")
    batch = make_batch(cfg, rows=2, length=8)
    lora = LoraConfig(rank=2, targets=(r"layers/1/attn/q/kernel$",))
    out = []
    for scan in (False, True):
        model = apply_lora(build_model(dataclasses.replace(cfg, scan_layers=scan), rngs=nnx.Rngs(0)), lora,
                           rngs=nnx.Rngs(1))
        with caplog.at_level(logging.WARNING, logger="jaxft.models.scan"):
            out.append(np.asarray(nnx.jit(lambda m, *a: m(*a))(model, *[batch[k] for k in model_input_keys(cfg)])))
    np.testing.assert_allclose(out[1], out[0], rtol=1e-6)
    assert any("differs in structure" in r.getMessage() for r in caplog.records)


def test_lt_sft_run_with_scan_resumes_and_matches_the_unrolled_run(tmp_path):
    """`jaxft train` end to end with LT-SFT (phase 1, mask, phase 2): the scanned run, stopped
    after its first checkpoint and resumed, logs the unrolled run's losses."""
    from jaxft.train.loop import train

    def config(name: str, scan: bool):
        path = write_run_config(tmp_path, steps=4, name=name)
        tree = yaml.safe_load(path.read_text())
        tree["model"]["scan_layers"] = scan
        tree["peft"] = {"method": "sparse", "sparse": {"phase1_steps": 2, "k": 500}}
        path.write_text(yaml.safe_dump(tree))
        return load_config(path)

    ref = train(config("unrolled", False), base_dir=tmp_path)
    cfg = config("scanned", True)
    assert train(cfg, base_dir=tmp_path, stop_after=2).step == 2
    resumed = train(cfg, base_dir=tmp_path)
    assert sorted(resumed.losses) == [3, 4] and sorted(ref.losses) == [1, 2, 3, 4]
    for step in (3, 4):  # phase 2 (masked), after a restore
        np.testing.assert_allclose(resumed.losses[step], ref.losses[step], rtol=2e-5)
