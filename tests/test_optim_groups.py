"""Optimizer parameter groups (lr_scale, weight-decay override) and the L1 pull
towards the starting point used by sparse fine-tuning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxft.config.schema import ModelConfig, OptimizerConfig, ParamGroup
from jaxft.models.registry import build_model
from jaxft.peft.sparse import flat_with_paths
from jaxft.train.optim import group_of, make_optimizer

BASE = dict(lr=0.1, warmup_steps=0, schedule="constant", clip_norm=None)


def toy_params():
    rng = np.random.default_rng(0)
    return {"enc": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
            "head": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}}


def run(tx, params, loss, steps=5):
    state = tx.init(params)
    for _ in range(steps):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def loss_fn(p):
    return sum(jnp.sum(jnp.square(x - 1.0)) for x in jax.tree.leaves(p))


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_lr_scale_zero_freezes_a_group_while_others_move(name):
    cfg = OptimizerConfig(name=name, weight_decay=0.1, groups=(ParamGroup(pattern=r"^head/", lr_scale=0.0),),
                          **BASE)
    p0 = toy_params()
    p = run(make_optimizer(cfg, 10), p0, loss_fn)
    np.testing.assert_array_equal(p["head"]["kernel"], p0["head"]["kernel"])  # decay included
    assert not np.allclose(p["enc"]["kernel"], p0["enc"]["kernel"])


def test_groups_without_match_equal_plain_adamw():
    plain = OptimizerConfig(weight_decay=0.1, **BASE)
    grouped = OptimizerConfig(weight_decay=0.1, groups=(ParamGroup(pattern="nomatch", lr_scale=3.0),), **BASE)
    a = run(make_optimizer(plain, 10), toy_params(), loss_fn)
    b = run(make_optimizer(grouped, 10), toy_params(), loss_fn)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_lr_scale_and_weight_decay_override():
    """Zero gradients: the AdamW update is only the decay -lr * lr_scale * wd * p, on matrices."""
    cfg = OptimizerConfig(weight_decay=0.1, groups=(
        ParamGroup(pattern=r"^enc/", weight_decay=0.5),
        ParamGroup(pattern=r"kernel$", lr_scale=2.0),  # enc/kernel matched the first group already
    ), **BASE)
    p0 = toy_params()
    p = run(make_optimizer(cfg, 10), p0, lambda p: 0.0 * loss_fn(p), steps=1)
    np.testing.assert_allclose(p["enc"]["kernel"], p0["enc"]["kernel"] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(p["enc"]["bias"], p0["enc"]["bias"])  # never decay vectors
    np.testing.assert_allclose(p["head"]["kernel"], p0["head"]["kernel"] * (1 - 0.1 * 2.0 * 0.1), rtol=1e-6)


def test_groups_match_nnx_paths():
    model = build_model(ModelConfig(vocab_size=32, d_model=8, n_layers=2, n_heads=2, mlp_dim=16, dtype="float32"),
                        rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    paths, _, _ = flat_with_paths(params)
    assert "layers/0/attn/q/kernel" in paths
    cfg = OptimizerConfig(groups=(ParamGroup(pattern=r"^layers/0/", lr_scale=0.0),), **BASE)
    tx = make_optimizer(cfg, 10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, u in zip(paths, flat_with_paths(updates)[1]):
        assert (np.abs(np.asarray(u)).max() == 0) == path.startswith("layers/0/"), path
    assert group_of("layers/0/mlp/up/kernel", cfg.groups) is cfg.groups[0]
    assert group_of("layers/1/mlp/up/kernel", cfg.groups) is None


def test_invalid_group_pattern_names_the_key():
    with pytest.raises(ValueError, match=r"optimizer.groups\[0\].pattern"):
        make_optimizer(OptimizerConfig(groups=(ParamGroup(pattern="("),), **BASE), 10)


def test_l1_pull_towards_the_starting_point():
    """Toy quadratic with its optimum at 1: the L1 pull keeps params nearer theta0
    (and, strong enough, exactly at theta0: the subgradient balances the pull)."""
    p0 = {"w": jnp.zeros((6,), jnp.float32)}
    target = jnp.asarray([1.0, 0.5, 0.2, -0.2, -0.5, -1.0])

    def loss(p):
        return 0.5 * jnp.sum(jnp.square(p["w"] - target))

    cfg = OptimizerConfig(name="adamw", **{**BASE, "lr": 0.01})
    free = run(make_optimizer(cfg, 300), p0, loss, steps=300)["w"]
    pulled = run(make_optimizer(cfg, 300, l1=0.3), p0, loss, steps=300)["w"]
    assert np.all(np.abs(pulled) < np.abs(free))
    # optimum of 0.5 (w - t)^2 + 0.3 |w|: soft-thresholding t by 0.3
    np.testing.assert_allclose(pulled, np.sign(target) * np.maximum(np.abs(target) - 0.3, 0), atol=0.03)
    np.testing.assert_allclose(free, target, atol=0.03)
    tx = make_optimizer(cfg, 10, l1=0.3)
    state = tx.init(p0)
    assert state[0].anchor["w"] is not p0["w"]  # a copy, never aliasing (donated) params


def test_l1_anchor_is_sharded_like_params_and_trains_on_a_mesh():
    from jaxft.config.schema import MeshConfig, PeftConfig, TrainConfig
    from jaxft.sharding import batch_sharding, make_mesh, use_mesh
    from jaxft.train.optim import make_schedule
    from jaxft.train.state import init_train_state, make_init_fn
    from jaxft.train.step import jit_train_step, make_train_step
    from test_train_step import TINY, make_batch

    opt = OptimizerConfig(weight_decay=0.1, groups=(ParamGroup(pattern="^embed/", lr_scale=0.0),), **BASE)
    tx = make_optimizer(opt, 10, l1=0.01)
    init_fn, graphdef = make_init_fn(TINY, TrainConfig(), tx, seed=0, peft_cfg=PeftConfig(method="sparse"))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with use_mesh(mesh):
        state, shardings = init_train_state(init_fn, mesh)
        anchor = state.opt_state[0].anchor
        for (_, a), (_, p) in zip(nnx.to_flat_state(anchor), nnx.to_flat_state(state.params)):
            assert a.get_value().sharding == p.get_value().sharding
        theta0 = jax.device_get(state.params)
        step = jit_train_step(make_train_step(graphdef, tx, TrainConfig(), make_schedule(opt, 10)), shardings,
                              batch_sharding(mesh))
        for s in range(2):
            state, _ = step(state, jax.device_put(make_batch(seed=s), batch_sharding(mesh)))
        np.testing.assert_array_equal(state.params["embed"]["embedding"].get_value(),
                                      theta0["embed"]["embedding"].get_value())
        assert not np.array_equal(state.params["lm_head"]["kernel"].get_value(),
                                  theta0["lm_head"]["kernel"].get_value())
        np.testing.assert_array_equal(jax.device_get(state.opt_state[0].anchor["lm_head"]["kernel"].get_value()),
                                      theta0["lm_head"]["kernel"].get_value())


def test_adafactor_uses_adafactor_decay_rate_not_b2():
    """Default config: Adafactor's second-moment decay exponent is 0.8 (T5 / optax), not b2=0.999.
    (Step 1 is the same for any exponent (beta2_1 = 0), so compare three steps.)"""
    cfg = OptimizerConfig(name="adafactor", **BASE)
    assert cfg.adafactor_decay_rate == 0.8 and cfg.b2 == 0.999
    ours = run(make_optimizer(cfg, 10), toy_params(), loss_fn, steps=3)
    expected = run(optax.adafactor(0.1, decay_rate=0.8, clipping_threshold=None), toy_params(), loss_fn, steps=3)
    with_b2 = run(optax.adafactor(0.1, decay_rate=0.999, clipping_threshold=None), toy_params(), loss_fn, steps=3)
    for x, y, z in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), jax.tree.leaves(with_b2)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
        assert not np.allclose(x, z, rtol=1e-6, atol=1e-7)
    other = run(make_optimizer(OptimizerConfig(name="adafactor", adafactor_decay_rate=0.999, **BASE), 10),
                toy_params(), loss_fn, steps=3)
    for x, z in zip(jax.tree.leaves(other), jax.tree.leaves(with_b2)):
        np.testing.assert_allclose(x, z, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "groups"])
def test_a_traced_weight_decay_computes_what_the_constant_computes(name, grouped):
    """`RateInput` (the run's weight decay as a step input, `jaxft.train.run_inputs`): the same
    updates to the bit as the Python float, on float32 and bf16 leaves and on stacked layers with
    a group of their own for one layer (per-layer rates)."""
    from jaxft.train.optim import RateInput

    rng = np.random.default_rng(1)
    params = {"layers": {"stacked": {"mlp": {"kernel": jnp.asarray(rng.normal(size=(3, 4, 2)), jnp.float32)}}},
              "head": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.bfloat16)}}
    groups = (ParamGroup(pattern=r"layers/1/", weight_decay=0.3),) if grouped else ()
    cfg = OptimizerConfig(name=name, weight_decay=0.1, groups=groups, **BASE)

    def steps(p, wd):  # the parameters an argument: XLA folds no step of either program
        tx = make_optimizer(cfg, 10, weight_decay=None if wd is None else RateInput(wd))
        state = tx.init(p)
        for _ in range(3):
            updates, state = tx.update(jax.grad(loss_fn)(p), state, p)
            p = optax.apply_updates(p, updates)
        return p

    constant, traced = jax.jit(lambda p: steps(p, None))(params), jax.jit(steps)(params, jnp.float32(0.1))
    jax.tree.map(np.testing.assert_array_equal, traced, constant)
    assert traced["head"]["kernel"].dtype == jnp.bfloat16
    other = jax.jit(steps)(params, jnp.float32(0.2))  # the value is read: another rate, other parameters
    assert not np.array_equal(other["head"]["kernel"], constant["head"]["kernel"])
