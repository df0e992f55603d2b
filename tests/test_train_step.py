"""Train-step invariants: accumulation == large batch, sharded == unsharded,
frozen parameters untouched and without optimizer state, loss terms, AOT."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax import nnx

from jaxft.config.schema import Config, DataConfig, MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
from jaxft.sharding import batch_sharding, make_mesh, use_mesh
from jaxft.train.aot import lower_train_step
from jaxft.train.optim import make_optimizer, make_schedule
from jaxft.train.state import init_train_state, make_init_fn, path_str
from jaxft.train.step import jit_train_step, make_train_step, token_losses

TINY = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, dtype="float32",
                   max_seq_len=64)
OPT = OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1)
# eps >> |grad| makes Adam's update ~ linear in the gradient, so comparisons of
# parameters compare gradients instead of amplifying float-order noise in
# near-zero gradients (eps=1e-8 turns a 1e-9 difference into a visible one).
LINEAR_OPT = OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1, eps=1.0)


def make_batch(rows=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, TINY.vocab_size, size=(rows, length + 1)).astype(np.int32)
    seg = np.ones((rows, length), np.int32)
    seg[:, length // 2:] = 2  # two packed examples per row
    seg[rows // 2:, -3:] = 0  # some padding
    pos = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)])[None].repeat(rows, 0)
    weights = (rng.random((rows, length)) > 0.3).astype(np.float32) * (seg > 0)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights,
            "segment_ids": seg, "positions": pos.astype(np.int32) * (seg > 0)}


def run_steps(train_cfg: TrainConfig, mesh_cfg: MeshConfig, batches, opt=OPT):
    mesh = make_mesh(mesh_cfg)
    tx = make_optimizer(opt, 10)
    init_fn, graphdef = make_init_fn(TINY, train_cfg, tx, seed=0)
    with use_mesh(mesh):
        state, shardings = init_train_state(init_fn, mesh)
        step = jit_train_step(make_train_step(graphdef, tx, train_cfg, make_schedule(opt, 10)), shardings,
                              batch_sharding(mesh))
        losses = []
        for b in batches:
            state, m = step(state, jax.device_put(b, batch_sharding(mesh)))
            losses.append((float(m["loss"]), float(m["grad_norm"])))
        return jax.device_get(state), losses


def test_gradient_accumulation_equals_large_batch():
    batches = [make_batch(rows=32, seed=s) for s in range(2)]
    big, loss_big = run_steps(TrainConfig(microbatches=1), MeshConfig(data=-1), batches, LINEAR_OPT)
    acc, loss_acc = run_steps(TrainConfig(microbatches=4), MeshConfig(data=-1), batches, LINEAR_OPT)
    np.testing.assert_allclose(loss_acc, loss_big, rtol=1e-5)  # loss and grad norm, both steps
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # the chunked loss's one-pass gradient (a custom VJP) inside the microbatch loop, on a
    # data x fsdp x tensor mesh: 3 chunks of 6 tokens
    chunked, loss_chunked = run_steps(TrainConfig(microbatches=4, loss_chunk=6, loss_chunk_mib=0),
                                      MeshConfig(data=2, fsdp=2, tensor=2), batches, LINEAR_OPT)
    np.testing.assert_allclose(loss_chunked, loss_big, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(chunked.params), jax.tree.leaves(big.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mesh", [MeshConfig(data=1, fsdp=-1), MeshConfig(data=2, fsdp=2, tensor=2)])
def test_sharded_train_step_equals_single_device(mesh):
    batches = [make_batch(seed=s) for s in range(2)]
    dp_state, dp_losses = run_steps(TrainConfig(), MeshConfig(data=-1), batches, LINEAR_OPT)
    sh_state, sh_losses = run_steps(TrainConfig(), mesh, batches, LINEAR_OPT)
    np.testing.assert_allclose(sh_losses, dp_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sh_state.params), jax.tree.leaves(dp_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_frozen_params_unchanged_and_without_optimizer_state():
    cfg = TrainConfig(frozen=(r"^embed/", r"norm"))
    tx = make_optimizer(OPT, 10)
    init_fn, _ = make_init_fn(TINY, cfg, tx, seed=0)
    mesh = make_mesh(MeshConfig(data=-1))
    with use_mesh(mesh):
        state0, _ = init_train_state(init_fn, mesh)
    trainable = {path_str(p) for p, _ in nnx.to_flat_state(state0.params)}
    frozen = {path_str(p) for p, _ in nnx.to_flat_state(state0.rest)}
    assert trainable and not any(p.startswith("embed/") or "norm" in p for p in trainable)
    assert any(p.startswith("embed/") for p in frozen) and any("norm" in p for p in frozen)
    n_opt = sum(x.size for x in jax.tree.leaves(state0.opt_state) if x.ndim > 0)
    n_trainable = sum(x.size for x in jax.tree.leaves(state0.params))
    assert n_opt == 2 * n_trainable  # Adam mu and nu for trainable params only
    state, _ = run_steps(cfg, MeshConfig(data=-1), [make_batch()])
    before, after = jax.device_get(state0.rest), state.rest
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)  # bitwise, with weight decay on
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(state0.params)),
                                                       jax.tree.leaves(state.params))]
    assert all(moved)


def test_no_trainable_params_is_an_error():
    with pytest.raises(ValueError, match="train.trainable"):
        make_init_fn(TINY, TrainConfig(trainable=("nomatch",)), make_optimizer(OPT, 10), seed=0)


def test_init_fn_traces_the_model_once_per_mesh_context(monkeypatch):
    """`make_init_fn` reads the graphdef from its own trace and keeps the abstract state per mesh
    context: lowering a step no longer builds the model three times (a 32-layer build is most of
    the scanned step's lowering); the graphdef and shapes are those of a separate abstract build."""
    import jaxft.train.state as state_mod
    from jaxft.peft.methods import method_for
    from jaxft.runs.model import split_train_model
    from jaxft.sharding import sharded_abstract

    builds = []

    def counted(*args, **kwargs):
        builds.append(kwargs.get("abstract", False))
        return split_train_model(*args, **kwargs)

    monkeypatch.setattr(state_mod, "split_train_model", counted)
    cfg = dataclasses.replace(TINY, scan_layers=True)
    init_fn, graphdef = make_init_fn(cfg, TrainConfig(), make_optimizer(OPT, 10), seed=0)
    assert len(builds) == 1
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1))
    abstract = init_fn.abstract  # no mesh set: the trace make_init_fn made
    assert len(builds) == 1
    with use_mesh(mesh):  # the variables' metadata differs under a mesh: one more trace, then kept
        inside, _ = sharded_abstract(init_fn, mesh)
        state, _ = init_train_state(init_fn, mesh)
    assert len(builds) == 3  # sharded_abstract's trace, and the jitted init's own
    reference, _, _ = split_train_model(cfg, method_for(None, TrainConfig(), cfg), 0, abstract=True)
    assert graphdef == reference
    shapes = lambda t: [(a.shape, a.dtype) for a in jax.tree.leaves(t)]  # noqa: E731
    assert shapes(abstract) == shapes(inside) == shapes(state)
    stacked = [a.shape[0] for p, a in jax.tree_util.tree_leaves_with_path(state.params) if "layers" in path_str(p)]
    assert stacked and set(stacked) == {cfg.n_layers}  # stored stacked


def test_token_losses_match_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 3))
    loss, zl = token_losses(jnp.asarray(logits), jnp.asarray(targets), label_smoothing=0.1, z_loss=1e-3)
    logz = np.log(np.exp(logits).sum(-1))
    logp = logits - logz[..., None]
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    smooth = -logp.mean(-1)
    expect = 0.9 * nll + 0.1 * smooth + 1e-3 * logz**2
    np.testing.assert_allclose(loss, expect, rtol=1e-5)
    np.testing.assert_allclose(zl, 1e-3 * logz**2, rtol=1e-5)


def test_schedules():
    cos = make_schedule(OptimizerConfig(lr=1.0, warmup_steps=10, schedule="cosine", end_lr_ratio=0.1), 110)
    assert float(cos(0)) == 0.0 and abs(float(cos(5)) - 0.5) < 1e-6 and abs(float(cos(10)) - 1.0) < 1e-6
    assert abs(float(cos(60)) - 0.55) < 1e-5 and abs(float(cos(110)) - 0.1) < 1e-6
    lin = make_schedule(OptimizerConfig(lr=2.0, schedule="linear", end_lr_ratio=0.0), 100)
    assert abs(float(lin(50)) - 1.0) < 1e-6
    rs = make_schedule(OptimizerConfig(lr=1.0, warmup_steps=100, schedule="rsqrt"), 1000)
    assert abs(float(rs(100)) - 1.0) < 1e-6 and abs(float(rs(400)) - 0.5) < 1e-6


def optax_schedule(cfg: OptimizerConfig, total: int):
    """The schedules as optax composes them (what `make_schedule` built before it took traced lengths)."""
    peak, warmup = cfg.lr, cfg.warmup_steps
    decay = max((cfg.decay_steps or total) - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, peak * cfg.end_lr_ratio, decay)
    elif cfg.schedule == "rsqrt":
        after = lambda c: peak * jnp.sqrt(max(warmup, 1) / (c + max(warmup, 1)))  # noqa: E731
    else:
        after = optax.constant_schedule(peak)
    return after if warmup <= 0 else optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


@pytest.mark.parametrize("kind", ["cosine", "linear", "rsqrt", "constant"])
def test_schedules_are_optax_s_with_lengths_as_inputs_too(kind):
    """`make_schedule` computes optax's schedules, with constant lengths and with traced ones (the
    run inputs), as the train step does (a jitted scalar count).  Not to the bit: XLA folds a
    division by a constant length into a product with its float32 reciprocal (and pi / length into
    one constant), which an input length cannot be; the learning rates differ at float32 rounding."""
    from jaxft.train.optim import schedule_lengths

    for warmup in (0, 30):
        cfg = OptimizerConfig(lr=3e-3, schedule=kind, warmup_steps=warmup, decay_steps=200, end_lr_ratio=0.1)
        lengths = [jnp.int32(n) for n in schedule_lengths(cfg, 250)]
        want = jax.jit(lambda c: jnp.asarray(optax_schedule(cfg, 250)(c), jnp.float32))
        got = jax.jit(lambda c: jnp.asarray(make_schedule(cfg, 250)(c), jnp.float32))
        traced = jax.jit(lambda c, w, d: jnp.asarray(make_schedule(cfg, 250, lengths=(w, d))(c), jnp.float32))
        for count in range(0, 260, 3):
            c = jnp.int32(count)
            np.testing.assert_allclose(float(got(c)), float(want(c)), rtol=1e-6)
            np.testing.assert_allclose(float(traced(c, *lengths)), float(want(c)), rtol=1e-6)


def test_adafactor_trains():
    opt = dataclasses.replace(OPT, name="adafactor", lr=1e-2)
    _, losses = run_steps(TrainConfig(), MeshConfig(data=-1), [make_batch()] * 4, opt=opt)
    assert losses[-1][0] < losses[0][0]


def test_train_step_lowers_from_abstract_inputs_alone(monkeypatch):
    import jaxft.train.state as state_mod

    builds = []
    monkeypatch.setattr(state_mod, "split_train_model",
                        lambda *a, _f=state_mod.split_train_model, **k: builds.append(1) or _f(*a, **k))
    cfg = Config(model=TINY, mesh=MeshConfig(data=2, fsdp=2, tensor=2), data=DataConfig(seq_len=32),
                 train=TrainConfig(global_batch=16, microbatches=2))
    lowered = lower_train_step(cfg)
    assert len(builds) == 1  # the model is traced once: the init under the mesh (`InitFn`)
    compiled = lowered.compile()
    assert compiled.memory_analysis() is not None
    flops = (compiled.cost_analysis() or {}).get("flops", 0)
    assert flops > 0


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_keep_if_takes_the_update_only_when_finite_in_both_forms(monkeypatch, platform):
    """The non-finite guard's two forms (a cond on the CPU, a select elsewhere) agree, under jit
    with the old state donated as in the train step."""
    from jaxft.models import kernels
    from jaxft.train.step import _keep_if

    monkeypatch.setattr(kernels, "platform", lambda: platform)
    step = jax.jit(lambda old, finite: _keep_if(finite, lambda _: jax.tree.map(lambda a: a * 2 + 1, old), old),
                   donate_argnums=(0,))
    old = {"w": jnp.arange(4.0), "mu": jnp.ones((2, 2))}
    kept = step(jax.tree.map(jnp.copy, old), jnp.array(True))
    dropped = step(jax.tree.map(jnp.copy, old), jnp.array(False))
    np.testing.assert_array_equal(np.asarray(kept["w"]), [1.0, 3.0, 5.0, 7.0])
    np.testing.assert_array_equal(np.asarray(kept["mu"]), np.full((2, 2), 3.0))
    for k in old:
        np.testing.assert_array_equal(np.asarray(dropped[k]), np.asarray(old[k]))
    text = step.lower(old, jnp.array(True)).as_text()
    assert ("stablehlo.case" in text) == (platform == "cpu")
