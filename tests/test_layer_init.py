"""A stack's layers initialised by one scanned layer init (`jaxft.models.layer_init`): under
``jax.jit`` the parameters are the loop's, bit for bit, for every family and under a sharded
mesh with the optimizer state; the compiled program no longer grows with depth; eager builds
keep the loop."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.config.schema import LoraConfig, MeshConfig, OptimizerConfig, PeftConfig, TrainConfig
from jaxft.models import layer_init
from jaxft.peft import method_for
from jaxft.runs.model import build_train_model
from jaxft.sharding import make_mesh, use_mesh
from jaxft.train.optim import make_optimizer
from jaxft.train.state import init_train_state, make_init_fn

from test_decode import FAMILIES, preset


def _flat(state) -> dict:
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


def _jit_params(cfg, scan: bool, monkeypatch, peft=None) -> dict:
    monkeypatch.setattr(layer_init, "SCAN_INIT", scan)
    method = method_for(peft, TrainConfig(global_batch=8), cfg)
    return _flat(jax.jit(lambda: nnx.state(build_train_model(cfg, method, 3)))())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scanned_layer_init_draws_the_loops_parameters(family, monkeypatch):
    name, overrides = FAMILIES[family]
    cfg = preset(name, **overrides)
    loop, scanned = _jit_params(cfg, False, monkeypatch), _jit_params(cfg, True, monkeypatch)
    assert loop.keys() == scanned.keys()
    for path, value in loop.items():
        np.testing.assert_array_equal(scanned[path], value, err_msg=path)
    layers = sorted(p for p in loop if re.search(r"layers/[1-9]/.*kernel", p))  # drawn, not zeros / ones
    assert layers and not np.array_equal(loop[layers[0]], loop[layers[0].replace("layers/1/", "layers/0/", 1)])


def test_draws_after_the_layers_are_the_loops_too(monkeypatch):
    """LoRA's adapters are drawn from the same keys after the model: the scan leaves the count
    where the loop would."""
    cfg = preset("tiny-llama")
    peft = PeftConfig(method="lora", lora=LoraConfig(rank=4, init="gaussian"))
    loop, scanned = (_jit_params(cfg, scan, monkeypatch, peft) for scan in (False, True))
    lora = [p for p in loop if "lora" in p]
    assert lora and loop.keys() == scanned.keys()
    for path, value in loop.items():
        np.testing.assert_array_equal(scanned[path], value, err_msg=path)


def test_a_sharded_train_state_inits_alike(monkeypatch):
    cfg = preset("tiny-llama", n_layers=4)
    tx = make_optimizer(OptimizerConfig(lr=1e-3), 10)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    states = []
    for scan in (False, True):
        monkeypatch.setattr(layer_init, "SCAN_INIT", scan)
        init_fn, _ = make_init_fn(cfg, TrainConfig(global_batch=8), tx, seed=5)
        with use_mesh(mesh):
            state, shardings = init_train_state(init_fn, mesh)
        states.append((jax.tree.leaves(state), jax.tree.leaves(shardings)))
    (a, sa), (b, sb) = states
    assert sa == sb
    for x, y in zip(a, b):
        assert x.sharding == y.sharding
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_init_program_does_not_grow_with_depth(monkeypatch):
    method = method_for(None, TrainConfig(global_batch=8), preset("tiny-llama"))

    def ops(layers: int, scan: bool) -> int:
        monkeypatch.setattr(layer_init, "SCAN_INIT", scan)
        cfg = preset("tiny-llama", n_layers=layers)
        text = jax.jit(lambda: nnx.state(build_train_model(cfg, method, 0))).lower().as_text()
        return len(re.findall(r"call @", text))  # draws: calls of the outlined threefry hash, the initialisers

    loop_growth = ops(8, False) - ops(2, False)
    scan_growth = ops(8, True) - ops(2, True)
    assert loop_growth > 0 and scan_growth == 0, (loop_growth, scan_growth)


def test_eager_builds_keep_the_loop(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.lax, "scan", lambda *a, **kw: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    cfg = preset("tiny-llama")
    method = method_for(None, TrainConfig(global_batch=8), cfg)
    model = build_train_model(cfg, method, 3)  # eager: no trace, nothing to compile
    assert not calls and len(model.layers) == cfg.n_layers
    assert isinstance(jax.tree.leaves(nnx.state(model))[0], jnp.ndarray)
