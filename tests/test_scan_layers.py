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
from jaxft.config.schema import LoraConfig, MeshConfig, OptimizerConfig, PeftConfig, TrainConfig
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


def test_recomputed_regions_drop_their_cse_barrier_inside_the_scan_only():
    # The barrier keeps XLA from fusing a residual's dynamic_slice out of the scan's stacked buffer
    # into its reader (a copy per residual per layer on a GPU); unrolled, it keeps XLA's CSE from
    # merging the backward's recomputation with the forward (the memory the regions exist to save).
    cfg = cfg_of("llama", n_layers=2)
    batch = make_batch(cfg, rows=2, length=8)
    unrolled, scanned = _jaxpr(cfg, batch), _jaxpr(dataclasses.replace(cfg, scan_layers=True), batch)
    barriers = lambda text: re.findall(r"prevent_cse=(\w+)", text)  # noqa: E731
    assert barriers(unrolled) == ["True"] * 7  # 2 layers x (2 norms, the MLP's activation) + the final norm
    assert sorted(barriers(scanned)) == ["False"] * 3 + ["True"]  # one scanned layer body; the final norm
    assert_same(loss_and_grads(cfg, batch), loss_and_grads(dataclasses.replace(cfg, scan_layers=True), batch))


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
    # what leaves the run is per layer: the restored model and the sparse diff match the unrolled run's
    from jaxft.peft.sparse import load_diff
    from jaxft.runs.model import restore_model

    a, b = restore_model(tmp_path / "unrolled"), restore_model(tmp_path / "scanned")
    assert [p for p, _ in nnx.to_flat_state(b.params)] == [p for p, _ in nnx.to_flat_state(a.params)]
    for x, y in zip(jax.tree.leaves(b.params), jax.tree.leaves(a.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    da, db = load_diff(tmp_path / "unrolled" / "sparse_diff"), load_diff(tmp_path / "scanned" / "sparse_diff")
    assert sorted(db.tensors) == sorted(da.tensors) and any("layers/1/" in p for p in da.tensors)
    chosen = [(set(t.indices.tolist()), set(db.tensors[p].indices.tolist())) for p, t in da.tensors.items()
              if t.indices is not None]
    assert sum(len(x & y) for x, y in chosen) >= 0.98 * sum(len(x) for x, _ in chosen)  # the same entries chosen


# --------------------------------------------------------------------------- stacked storage


def _train(cfg, opt: OptimizerConfig, steps: int, mesh_cfg: MeshConfig = MeshConfig(data=-1)):
    """(initial state, state after ``steps`` AdamW steps) on one batch; stacked storage iff ``cfg.scan_layers``."""
    from jaxft.sharding import batch_sharding, make_mesh, use_mesh
    from jaxft.train.optim import make_optimizer, make_schedule
    from jaxft.train.state import init_train_state, make_init_fn
    from jaxft.train.step import jit_train_step, make_train_step

    mesh, tx = make_mesh(mesh_cfg), make_optimizer(opt, 10)
    init_fn, graphdef = make_init_fn(cfg, TrainConfig(), tx, 0)
    with use_mesh(mesh):
        state, shardings = init_train_state(init_fn, mesh)
        first = jax.tree.map(np.asarray, state.params)
        step = jit_train_step(make_train_step(graphdef, tx, TrainConfig(), make_schedule(opt, 10),
                                              model_input_keys(cfg)), shardings, batch_sharding(mesh))
        batch = jax.device_put(make_batch(cfg, rows=8, length=8), batch_sharding(mesh))
        for _ in range(steps):
            state, _ = step(state, batch)
        return first, state


def test_the_stacked_train_state_trains_as_the_per_layer_one():
    """With ``scan_layers`` the state holds one [layers, ...] array per parameter kind; AdamW with
    weight decay (matrices only: a stacked norm is still a vector per layer) and a parameter group
    that matches layer 1 alone (its own lr scale and decay) moves every entry as per-layer storage
    does, on a data x fsdp x tensor mesh."""
    from jaxft.config.schema import ParamGroup
    from jaxft.models.scan import STACKED, unstack_layers

    cfg = cfg_of("llama")
    opt = OptimizerConfig(lr=1e-2, schedule="constant", weight_decay=0.1, eps=1e-3,  # eps: see below
                          groups=(ParamGroup(pattern=r"layers/1/", lr_scale=0.5, weight_decay=0.3),))
    first_u, unrolled = _train(cfg, opt, 3, MESH)
    first_s, stacked = _train(dataclasses.replace(cfg, scan_layers=True), opt, 3, MESH)
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(stacked.params)]
    assert any(f"layers/{STACKED}/attn/q/kernel" == p for p in paths) and not any("layers/0/" in p for p in paths)
    q = stacked.params["layers"][STACKED]["attn"]["q"]["kernel"]
    assert q.shape[0] == cfg.n_layers and q.sharding.spec[0] is None  # layer axis replicated
    for a, b in zip(jax.tree.leaves(unstack_layers(first_s)), jax.tree.leaves(first_u), strict=True):
        np.testing.assert_array_equal(a, b)  # the same initial values
    for a, b in zip(jax.tree.leaves(unstack_layers(stacked.params)), jax.tree.leaves(unrolled.params), strict=True):
        # Adam's eps=1e-3: near-zero gradients (summed in another order) do not become full-size steps
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    moved = lambda i: np.abs(np.asarray(unrolled.params["layers"][i]["attn"]["q"]["kernel"])  # noqa: E731
                             - np.asarray(first_u["layers"][i]["attn"]["q"]["kernel"])).mean()
    assert 0.3 < moved(1) / moved(0) < 0.7  # the group did act on layer 1 only


@pytest.mark.parametrize("family", ["t5", "mbart"])
def test_stacked_encoder_and_decoder_stacks_train_as_per_layer_ones(family):
    """Two stacks (encoder 3, decoder 2 layers, cross attention between them) stored stacked."""
    from jaxft.models.scan import unstack_layers

    cfg = cfg_of(family)
    opt = OptimizerConfig(lr=1e-2, schedule="constant", weight_decay=0.1, eps=1e-3)
    _, unrolled = _train(cfg, opt, 2)
    _, stacked = _train(dataclasses.replace(cfg, scan_layers=True), opt, 2)
    assert {p[:3] for p, _ in nnx.to_flat_state(stacked.params) if "stacked" in p} == \
        {("encoder", "layers", "stacked"), ("decoder", "layers", "stacked")}
    for a, b in zip(jax.tree.leaves(unstack_layers(stacked.params)), jax.tree.leaves(unrolled.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def _compiled_lines(cfg) -> int:
    from jaxft.config.schema import Config, DataConfig
    from jaxft.train.aot import lower_step_parts

    run = Config(model=cfg, data=DataConfig(seq_len=16), train=TrainConfig(global_batch=8, steps=10),
                 mesh=MeshConfig(data=-1))
    return len(lower_step_parts(run).lowered.compile().as_text().splitlines())


def test_the_stacked_step_compiles_to_one_program_whatever_the_depth():
    """Stacked storage: no per-layer stacking, unstacking or optimizer update is left, so the compiled
    train step (forward, backward and AdamW) does not grow with depth; the unrolled one does."""
    shallow, deep = cfg_of("llama", n_layers=2), cfg_of("llama", n_layers=6)
    unrolled = [_compiled_lines(c) for c in (shallow, deep)]
    scanned = [_compiled_lines(dataclasses.replace(c, scan_layers=True)) for c in (shallow, deep)]
    assert unrolled[1] > 2 * unrolled[0]
    assert scanned[1] < 1.05 * scanned[0]


def test_adafactor_keeps_per_layer_storage():
    """Adafactor's factored moments and parameter scale are per tensor: stacked, they would span all
    layers, so an Adafactor run scans with per-layer storage (stacked inside the step)."""
    from jaxft.config.schema import Config
    from jaxft.runs.model import stores_stacked

    run = lambda name, scan: Config(model=cfg_of("llama", scan_layers=scan), optimizer=OptimizerConfig(name=name))  # noqa: E731
    assert stores_stacked(run("adamw", True))
    assert not stores_stacked(run("adafactor", True)) and not stores_stacked(run("adamw", False))


def test_lora_run_with_scan_exports_the_unrolled_run_s_adapter(tmp_path):
    """`jaxft train` with LoRA and stacked storage (adapters trained, base frozen, both stacked):
    the adapter written at the end has per-layer paths and the unrolled run's factors."""
    from jaxft.peft.lora import read_adapter
    from jaxft.train.loop import train

    def config(name: str, scan: bool):
        path = write_run_config(tmp_path, steps=3, name=name)
        tree = yaml.safe_load(path.read_text())
        tree["model"]["scan_layers"] = scan
        tree["peft"] = {"method": "lora", "lora": {"rank": 4}}
        path.write_text(yaml.safe_dump(tree))
        return load_config(path)

    ref = train(config("unrolled", False), base_dir=tmp_path)
    got = train(config("scanned", True), base_dir=tmp_path)
    np.testing.assert_allclose([got.losses[s] for s in (1, 2, 3)], [ref.losses[s] for s in (1, 2, 3)], rtol=2e-5)
    (_, a), (_, b) = read_adapter(tmp_path / "unrolled" / "adapter"), read_adapter(tmp_path / "scanned" / "adapter")
    assert sorted(b) == sorted(a) and any("layers/1/" in p for p in a)
    for p, (fa, fb) in a.items():
        np.testing.assert_allclose(b[p][0], fa, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b[p][1], fb, rtol=1e-4, atol=1e-6)


def test_a_scanned_run_resumes_from_checkpoints_written_layer_by_layer(tmp_path, monkeypatch):
    """Checkpoints of `scan_layers` runs written before stacked storage (each layer's parameters and
    AdamW moments under ``layers/{i}/``) restore into the stacked train state: the resumed run logs
    the losses of a run that was stacked all along, its next checkpoint is stacked, and
    `restore_model` reads both layouts."""
    import jaxft.train.setup as setup_module
    from jaxft.runs.model import restore_model
    from jaxft.train.loop import train

    def config(name: str):
        path = write_run_config(tmp_path, steps=4, name=name)
        tree = yaml.safe_load(path.read_text())
        tree["model"]["scan_layers"] = True
        tree["train"]["dev_batches"] = 0
        path.write_text(yaml.safe_dump(tree))
        return load_config(path)

    ref = train(config("stacked"), base_dir=tmp_path)
    cfg = config("old")
    with monkeypatch.context() as m:  # the train state as jaxft stored it before stacked storage
        m.setattr(setup_module, "stores_stacked", lambda cfg: False)
        assert train(cfg, base_dir=tmp_path, stop_after=2).step == 2
    layout = lambda step: (tmp_path / "old" / "checkpoints" / str(step) / "params" / "_METADATA").read_text()  # noqa: E731
    assert "stacked" not in layout(2) and "layers" in layout(2)
    resumed = train(cfg, base_dir=tmp_path)
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):  # the moments came back too: AdamW's step 3 depends on them
        np.testing.assert_allclose(resumed.losses[step], ref.losses[step], rtol=2e-5)
    assert "stacked" in layout(4)
    a, b = restore_model(tmp_path / "stacked", 2), restore_model(tmp_path / "old", 2)  # read-only, per-layer on disk
    assert [p for p, _ in nnx.to_flat_state(b.params)] == [p for p, _ in nnx.to_flat_state(a.params)]
    for x, y in zip(jax.tree.leaves(b.params), jax.tree.leaves(a.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_unstack_owned_frees_each_stack_once_sliced():
    """What `restore_model` unstacks with: the per-layer values of `unstack_layers`, and no stacked
    array left alive (a second copy of an 8B model's parameters is what it avoids)."""
    from jaxft.models.scan import STACKED, stack_layers, unstack_layers, unstack_owned

    model = build_model(preset("tiny-llama"), rngs=nnx.Rngs(0))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    stacked_params = stack_layers(params, rest)[0]
    want = jax.tree.map(np.asarray, unstack_layers(stacked_params))
    arrays = [x for x in jax.tree.leaves(stacked_params["layers"][STACKED])]
    got = unstack_owned(stacked_params)
    assert all(x.is_deleted() for x in arrays) and len(arrays) > 3
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
