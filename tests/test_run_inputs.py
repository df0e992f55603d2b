"""The learning rate, the seed, the schedule's lengths, the weight decay and the loss's terms are
inputs of the compiled train step (`jaxft.train.run_inputs`): the step computes what the step with
them as constants computes, and runs of a study that differ only in them lower to one program (so
the compilation cache serves all but the first).  The schedules' lengths here are powers of two (2
and 8 steps; 1): XLA folds a division by a constant length into a product with its reciprocal, exact
only there, so with other lengths the constant step's learning rate differs in the last bit
(`tests/test_train_step.py` holds the schedules to optax's at float32 rounding)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxft.config.loader import load_config
from jaxft.config.schema import MeshConfig, OptimizerConfig, ParamGroup, TrainConfig
from jaxft.models.registry import model_input_keys
from jaxft.sharding import batch_sharding, make_mesh, use_mesh
from jaxft.train.aot import lower_train_step
from jaxft.train.optim import make_optimizer, make_schedule
from jaxft.train.run_inputs import RunInputs, WithRunInputs
from jaxft.train.state import init_train_state, make_init_fn
from jaxft.train.step import jit_train_step, make_train_step

from test_dropout import make_batch, small
from trainutil import write_run_config

MODEL = small("tiny-llama", dropout=0.1)  # with dropout, the seed is in the step
BF16 = small("tiny-llama", dropout=0.1, dtype="bfloat16", param_dtype="bfloat16")
ADAMW = OptimizerConfig(lr=1e-2, warmup_steps=2, schedule="cosine", weight_decay=0.1)
ADAFACTOR = OptimizerConfig(name="adafactor", lr=1e-2, warmup_steps=1, schedule="rsqrt", weight_decay=0.01,
                            groups=(ParamGroup(pattern="mlp", lr_scale=0.5, weight_decay=0.2),))
LOSS = dict(label_smoothing=0.1, z_loss=1e-3)
STEPS = 3


def train(opt: OptimizerConfig, seed: int, lr: float, *, as_inputs: bool, model=MODEL):
    """Params and metrics after STEPS steps with peak `lr` and `seed`: as the step's inputs, or as
    constants (a step built for exactly these values, as before run inputs existed)."""
    mesh, train_cfg = make_mesh(MeshConfig(data=-1), jax.devices()[:2]), TrainConfig(steps=10, seed=seed, **LOSS)
    constant_opt = dataclasses.replace(opt, lr=lr)
    tx = make_optimizer(constant_opt, 10)
    init_fn, graphdef = make_init_fn(model, train_cfg, tx, 0)
    keys = model_input_keys(model)
    with use_mesh(mesh):
        state, shardings = init_train_state(init_fn, mesh)
        batch = jax.device_put(make_batch(model), batch_sharding(mesh))
        if as_inputs:
            # built for other values: what the step computes must come from the values it is given
            other = TrainConfig(steps=40, seed=12345, label_smoothing=0.3, z_loss=0.5)
            inputs = RunInputs(dataclasses.replace(opt, lr=99.0, warmup_steps=7, weight_decay=0.9), other)
            step = jit_train_step(make_train_step(graphdef, None, other, None, keys, run_inputs=inputs),
                                  shardings, batch_sharding(mesh), run_inputs=True)
            step = WithRunInputs(step, RunInputs(constant_opt, train_cfg).put(mesh))
        else:
            step = jit_train_step(make_train_step(graphdef, tx, train_cfg, make_schedule(constant_opt, 10), keys),
                                  shardings, batch_sharding(mesh))
        metrics = []
        for _ in range(STEPS):
            state, m = step(state, batch)
            metrics.append({k: float(v) for k, v in m.items()})
        return jax.tree.map(np.asarray, state.params), metrics


@pytest.mark.parametrize("opt,model", [(ADAMW, MODEL), (ADAFACTOR, BF16)],
                         ids=["adamw-cosine", "adafactor-rsqrt-groups-bf16-params"])
def test_inputs_compute_what_constants_compute(opt, model):
    for seed, lr in ((0, 1e-2), (7, 3e-3))[0 if model is MODEL and opt is ADAMW else 1:]:
        const_params, const_metrics = train(opt, seed, lr, as_inputs=False, model=model)
        params, metrics = train(opt, seed, lr, as_inputs=True, model=model)
        assert metrics == const_metrics  # loss, lr, grad norm... to the bit
        jax.tree.map(np.testing.assert_array_equal, params, const_params)
    assert const_metrics[1]["lr"] > 0 and const_metrics[0]["loss"] != const_metrics[2]["loss"]
    other_params, other_metrics = train(opt, 7, 1e-2, as_inputs=True, model=model)  # another lr: another result
    assert other_metrics[1]["lr"] == pytest.approx(const_metrics[1]["lr"] * 1e-2 / 3e-3, rel=1e-6)
    assert not np.array_equal(jax.tree.leaves(other_params)[0], jax.tree.leaves(params)[0])


def test_a_seed_is_the_seed_jax_random_key_takes():
    """A negative or > 2**32 `train.seed` gives the dropout keys of the constant seed (mod 2**32)."""
    for seed in (-5, 2**32 + 3):
        value = RunInputs(ADAMW, TrainConfig(seed=seed)).values()["seed"]
        assert np.array_equal(jax.random.key_data(jax.random.key(seed)),
                              jax.jit(lambda s: jax.random.key_data(jax.random.key(s)))(value))


def study_config(tmp_path, name: str, **changes):
    return load_config(write_run_config(tmp_path, name=name, extra={"model.dropout": 0.1, **changes}))


def test_runs_differing_in_their_numbers_lower_to_one_program(tmp_path):
    on = {"train.label_smoothing": 0.1, "train.z_loss": 1e-3}  # the base has warmup and weight decay on
    base = lower_train_step(study_config(tmp_path, "a", **on)).as_text()
    swept = lower_train_step(study_config(tmp_path, "b", **{
        "optimizer.lr": 1e-4, "train.seed": 11, "optimizer.warmup_steps": 5, "train.steps": 50,
        "optimizer.weight_decay": 0.1, "train.label_smoothing": 0.2, "train.z_loss": 1e-4})).as_text()
    assert swept == base
    # what a value turns on stays in the program: label smoothing off, no warmup, another schedule
    for i, change in enumerate(({"train.label_smoothing": 0.0}, {"optimizer.warmup_steps": 0},
                                {"optimizer.schedule": "linear"})):
        other = lower_train_step(study_config(tmp_path, f"c{i}", **{**on, **change}))
        assert other.as_text() != base, change


def test_the_init_takes_its_seed_as_an_input_and_builds_what_the_constant_builds():
    mesh, firsts = make_mesh(MeshConfig(data=-1), jax.devices()[:2]), []
    for seed in (0, 3):
        init_fn, _ = make_init_fn(MODEL, TrainConfig(seed=seed), make_optimizer(ADAMW, 10), seed)
        with use_mesh(mesh):
            state, _ = init_train_state(init_fn, mesh)  # the seed an input of the compiled init
        constant = jax.jit(init_fn)()  # the seed a constant of the program, as before
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(constant.params), strict=True):
            np.testing.assert_array_equal(a, b)
        firsts.append(np.asarray(jax.tree.leaves(state.params)[0]))
    assert not np.array_equal(*firsts)


def test_a_lowered_step_runs_with_its_run_inputs():
    """`benchmarks/scan_compile.py` runs what `jaxft.train.aot` lowered: the step's last argument
    is the run's values (`LoweredStep.run_inputs`); a small scanned step, one call."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "scan_compile.py"
    out = subprocess.run([sys.executable, str(script), "--child", "--depth", "2", "--d-model", "64", "--batch", "2",
                          "--seq", "32", "--steps", "1", "--scan"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["step_s"] > 0
