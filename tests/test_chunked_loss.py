"""Chunked cross-entropy (`train.loss_chunk`): the same sums and gradients as the
full-logits loss for every model family, sharded over a tensor axis, and a much
smaller compiled step for a large vocabulary."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxft.config.schema import Config, DataConfig, MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
from jaxft.models import build_model
from jaxft.models.registry import model_input_keys
from jaxft.sharding import batch_sharding, make_mesh, use_mesh
from jaxft.train.aot import lower_train_step
from jaxft.train.losses import chunk_layout, chunk_within, picked, token_losses
from jaxft.train.optim import make_optimizer, make_schedule
from jaxft.train.state import make_init_fn, sharded_abstract
from jaxft.train.step import jit_eval_step, jit_train_step, make_eval_step, make_loss_fn, make_train_step

PRESETS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models"
LOSS = dict(label_smoothing=0.1, z_loss=1e-3)


def preset(name: str, **overrides) -> ModelConfig:
    cfg = ModelConfig(**yaml.safe_load((PRESETS / f"{name}.yaml").read_text())["model"])
    return dataclasses.replace(cfg, **overrides)


def make_batch(cfg: ModelConfig, rows: int, length: int, src_len: int = 11, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = lambda shape: rng.integers(1, cfg.vocab_size, size=shape).astype(np.int32)  # noqa: E731
    seg = np.ones((rows, length), np.int32)
    seg[:, length // 2:] = 2  # two packed examples per row
    seg[rows // 2:, -3:] = 0  # padding
    pos = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)])[None].repeat(rows, 0)
    batch = {"inputs": ids((rows, length)), "targets": ids((rows, length)), "segment_ids": seg,
             "positions": (pos * (seg > 0)).astype(np.int32),
             "weights": (rng.random((rows, length)) > 0.2).astype(np.float32) * (seg > 0)}
    batch.update(enc_inputs=ids((rows, src_len)), enc_segment_ids=np.ones((rows, src_len), np.int32),
                 enc_positions=np.arange(src_len, dtype=np.int32)[None].repeat(rows, 0))
    return batch


def assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def test_chunk_layout_balances_padding():
    assert chunk_layout(19, 5) == (4, 5) and chunk_layout(19, 64) == (1, 19)
    assert chunk_layout(1000, 512) == (2, 500) and chunk_layout(1024, 256) == (4, 256)


@pytest.mark.parametrize("name,overrides", [
    ("tiny-llama", {}),
    ("tiny-gemma", {"final_logit_softcap": 30.0}),  # tied head + final softcap
    ("tiny-t5", {}),  # tied head on d_model**-0.5-scaled outputs (mT5's untied head: as llama's)
    ("tiny-mbart", {}),
])
def test_chunked_loss_and_grads_equal_full_logits(name, overrides):
    cfg = preset(name, n_layers=1, n_decoder_layers=1, **overrides)
    graphdef, params, rest = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    keys = model_input_keys(cfg)
    batch = make_batch(cfg, rows=4, length=19)

    @jax.jit
    def run(params, rest, batch):  # 19 tokens: full logits; 4 chunks of 5 (1 padded); 1 chunk > L
        model = nnx.merge(graphdef, params, rest)
        inputs = [batch[k] for k in keys]
        grads = [jax.grad(make_loss_fn(graphdef, TrainConfig(loss_chunk=chunk, loss_chunk_mib=0, **LOSS), keys),
                               has_aux=True)(
            params, rest, batch) for chunk in (0, 5, 64)]
        return model(*inputs), model.logits(model.hidden(*inputs)), grads

    full, split, ((want_g, want), *chunked) = run(params, rest, batch)
    np.testing.assert_array_equal(split, full)  # __call__ == logits(hidden(...)) bitwise
    for got_g, got in chunked:
        assert set(got) == {"loss_sum", "z_loss_sum", "weight_sum"}
        assert_trees_close(got, want)
        assert_trees_close(got_g, want_g)
    assert float(want["z_loss_sum"]) > 0


def test_negative_loss_chunk_is_an_error():
    graphdef = nnx.graphdef(build_model(preset("tiny-llama"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="train.loss_chunk"):
        make_loss_fn(graphdef, TrainConfig(loss_chunk=-1))


TINY = ModelConfig(vocab_size=96, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, mlp_dim=64, dtype="float32",
                   max_seq_len=64)
LINEAR_OPT = OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="constant", eps=1.0)  # update ~ linear in grads


def run_step(chunk: int, mesh_cfg: MeshConfig, state0, batch: dict, mib: float = 0):
    """One eval and one train step from the host state ``state0`` on a ``mesh_cfg`` mesh."""
    train_cfg = TrainConfig(loss_chunk=chunk, loss_chunk_mib=mib, **LOSS)
    tx = make_optimizer(LINEAR_OPT, 10)
    init_fn, graphdef = make_init_fn(TINY, train_cfg, tx, seed=0)
    mesh = make_mesh(mesh_cfg)
    with use_mesh(mesh):
        _, shardings = sharded_abstract(init_fn, mesh)
        leaves = [jax.device_put(x, s) for x, s in
                  zip(jax.tree.leaves(state0), jax.tree.leaves(shardings), strict=True)]
        state, bsh = jax.tree.unflatten(jax.tree.structure(shardings), leaves), batch_sharding(mesh)
        batch = jax.device_put(batch, bsh)
        dev = jit_eval_step(make_eval_step(graphdef, train_cfg), shardings, bsh)(state, batch)
        step = jit_train_step(make_train_step(graphdef, tx, train_cfg, make_schedule(LINEAR_OPT, 10)), shardings, bsh)
        state, metrics = step(state, batch)
        return jax.device_get((state.params, metrics, dev))


def test_chunked_step_on_tensor_sharded_vocab_matches_full():
    batch = {k: v for k, v in make_batch(TINY, rows=8, length=24).items() if not k.startswith("enc_")}
    init_fn, _ = make_init_fn(TINY, TrainConfig(), make_optimizer(LINEAR_OPT, 10), seed=0)
    state0 = jax.device_get(jax.jit(init_fn)())
    want = run_step(0, MeshConfig(data=-1), state0, batch)
    got = run_step(7, MeshConfig(data=2, fsdp=2, tensor=2), state0, batch)  # vocab 96 / tensor=2; 4 chunks of 6
    assert_trees_close(got, want)
    # a chunk of 512 tokens cut by the logits budget (24 tokens: 9 kB > 2 kB): 2 rows x 48 vocab per device, 4 bytes: 384 B
    # per token; 2 kB -> 5-token chunks (5 chunks of 5)
    got = run_step(512, MeshConfig(data=2, fsdp=2, tensor=2), state0, batch, mib=2000 / 2 ** 20)
    assert_trees_close(got, want)


def test_the_logits_budget_chunks_only_what_does_not_fit():
    V = 250_112  # 1,000,448 B of float32 logits per token and row
    assert chunk_within(512, 0, batch=8, length=64, vocab=V) == 512  # no budget: loss_chunk alone
    assert chunk_within(512, 1024, batch=8, length=128, vocab=V) == 128  # 977 MiB fit: the whole sequence
    assert chunk_within(512, 1024, batch=8, length=1024, vocab=V) == 134  # 1 GiB / (8 x V x 4 B)
    assert chunk_within(64, 1024, batch=8, length=1024, vocab=V) == 64  # never longer than loss_chunk
    assert chunk_within(512, 1e-6, batch=8, length=1024, vocab=V) == 1
    with use_mesh(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):  # 2 rows, 125,056 entries per device
        assert chunk_within(512, 1024, batch=8, length=1024, vocab=V) == 1024  # 954 MiB per device
        assert chunk_within(512, 1024, batch=8, length=4096, vocab=V) == 512
    with use_mesh(make_mesh(MeshConfig(data=-1))):  # 1 row per device, the whole vocabulary
        assert chunk_within(512, 256, batch=8, length=1024, vocab=V) == 268


def test_chunked_loss_shrinks_compiled_step_memory():
    model = ModelConfig(vocab_size=32768, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=32,
                        dtype="float32", max_seq_len=256)

    def temp_bytes(chunk, mib=0.0):
        cfg = Config(model=model, mesh=MeshConfig(data=-1), data=DataConfig(seq_len=256),
                     train=TrainConfig(global_batch=8, loss_chunk=chunk, loss_chunk_mib=mib))
        return lower_train_step(cfg).compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(0), temp_bytes(32)  # one 256 x 32768 fp32 logits row per device: 32 MiB
    assert chunked < 0.5 * full, (full, chunked)
    # the default chunk (512) holds the whole row; a 4 MiB logits budget cuts it to 32 tokens
    assert temp_bytes(512) == full
    assert temp_bytes(512, mib=4.0) == chunked
    assert temp_bytes(512, mib=1024.0) == full  # the default budget: 32 MiB of logits are not chunked


def _vocab_dots(jaxpr, vocab: int) -> int:
    """dot_generals (in every sub-jaxpr: scans, remat) with a vocabulary-sized operand or result."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes = [v.aval.shape for v in eqn.invars + eqn.outvars]
            count += any(vocab in s for s in shapes)
        for v in eqn.params.values():
            for j in (v if isinstance(v, (list, tuple)) else (v,)):
                inner = getattr(j, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    count += _vocab_dots(inner, vocab)
                elif hasattr(j, "eqns"):
                    count += _vocab_dots(j, vocab)
    return count


@pytest.mark.parametrize("frozen_head", [False, True])
def test_the_chunked_gradient_builds_each_chunk_s_logits_once(frozen_head):
    """The chunked loss's gradient comes from one pass over the chunks: the head's product for the
    logits, the input gradient and (when the head trains) the weight gradient, as unchunked; a
    rematerialised backward pass would build every chunk's logits a second time."""
    cfg = preset("tiny-llama", n_layers=1, vocab_size=1000)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    trainable = (lambda path, v: isinstance(v, nnx.Param) and "lm_head" not in path) if frozen_head else nnx.Param
    graphdef, params, rest = nnx.split(model, trainable, ...)
    keys = model_input_keys(cfg)
    batch = {k: v for k, v in make_batch(cfg, rows=4, length=19).items() if not k.startswith("enc_")}

    def grads(chunk):
        return jax.grad(make_loss_fn(graphdef, TrainConfig(loss_chunk=chunk, loss_chunk_mib=0, **LOSS), keys),
                        has_aux=True)

    dots = {chunk: _vocab_dots(jax.make_jaxpr(grads(chunk))(params, rest, batch).jaxpr, 1000) for chunk in (0, 5)}
    assert dots[0] == (2 if frozen_head else 3)
    assert dots[5] == dots[0], dots
    want, got = grads(0)(params, rest, batch), grads(5)(params, rest, batch)
    assert_trees_close(got, want)


def test_a_gradient_of_the_other_sums_takes_the_plain_backward_pass():
    """Differentiating the z-loss sum (not only the loss) is still exact: the rematerialised pass."""
    from jaxft.train.losses import chunked_token_losses

    cfg = preset("tiny-llama", n_layers=1)
    graphdef, params, rest = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    batch = make_batch(cfg, rows=4, length=19)

    def objective(params, chunk):
        model = nnx.merge(graphdef, params, rest)
        h = model.hidden(batch["inputs"], batch["segment_ids"], batch["positions"])
        loss, z, w = chunked_token_losses(h, model.logits, batch["targets"], batch["weights"], chunk=chunk, **LOSS)
        return loss + 100.0 * z + w

    want = jax.grad(objective)(params, 19)
    got = jax.jit(jax.grad(objective), static_argnums=1)(params, 5)
    assert_trees_close(got, want, rtol=1e-4)


def test_casts_of_closed_over_arrays_are_hoisted_with_their_gradients():
    from jaxft.train.losses import _fused_sums, hoisted_casts

    x = jnp.arange(8, dtype=jnp.float32).reshape(2, 4).astype(jnp.bfloat16) / 8
    w, s, both, twice = (jnp.linspace(-1, 1, 12, dtype=jnp.float32).reshape(4, 3) * k for k in (1.0, 2.0, 3.0, 4.0))

    def fn(x, w, s, both, twice):  # cast once; used in float32; cast and used as is; cast twice
        return (jnp.sum(jnp.sin(x @ w.astype(jnp.bfloat16)).astype(jnp.float32)) + jnp.sum(x.astype(jnp.float32) * s[0, 0])
                + jnp.sum(jnp.cos(both.astype(jnp.bfloat16)).astype(jnp.float32) * both)
                + jnp.sum(x @ twice.astype(jnp.bfloat16)).astype(jnp.float32) + jnp.sum(twice.astype(jnp.bfloat16)),)

    consts = (w, s, both, twice)
    fn_h, casts = hoisted_casts(fn, (x,), consts)
    assert casts == [(0, jnp.bfloat16), (2, jnp.bfloat16), (3, jnp.bfloat16)]  # one copy of a twice-cast array
    cast_values = tuple(consts[i].astype(d) for i, d in casts)
    np.testing.assert_array_equal(fn_h(x, *consts, *cast_values)[0], fn(x, *consts)[0])
    n_casts = lambda f, *a: str(jax.make_jaxpr(f)(*a)).count("convert_element_type[new_dtype=bfloat16")  # noqa: E731
    assert n_casts(fn, x, *consts) - n_casts(fn_h, x, *consts, *cast_values) == 4
    # through the one-pass gradient: every const's gradient, the casts' included, as autodiff gives it
    got = jax.grad(lambda c: _fused_sums(fn, (x[None],), c)[0])(consts)  # one chunk
    want = jax.grad(lambda c: fn(x, *c)[0])(consts)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-2, atol=1e-2)  # bf16 products; float32 sums


@pytest.mark.parametrize("frozen_head", [False, True])
def test_a_bf16_models_chunk_loop_reads_its_head_cast_once(frozen_head, monkeypatch):
    """bf16 compute, float32 parameters, the head trained or frozen: the chunk loop's body casts no
    head weight (it is cast before the loop), and the loss and every gradient equal those of the
    cast inside the loop."""
    from jaxft.train import losses

    cfg = preset("tiny-llama", n_layers=1, vocab_size=1000, dtype="bfloat16")
    trainable = (lambda path, v: isinstance(v, nnx.Param) and "lm_head" not in path) if frozen_head else nnx.Param
    graphdef, params, rest = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)), trainable, ...)
    keys = model_input_keys(cfg)
    batch = {k: v for k, v in make_batch(cfg, rows=4, length=19).items() if not k.startswith("enc_")}
    grads = jax.grad(make_loss_fn(graphdef, TrainConfig(loss_chunk=5, loss_chunk_mib=0, **LOSS), keys), has_aux=True)

    head = (cfg.d_model, cfg.vocab_size)

    def eqns(jaxpr):  # every equation, nested ones included
        for eqn in jaxpr.eqns:
            yield eqn
            for v in eqn.params.values():
                for j in (v if isinstance(v, (list, tuple)) else (v,)):
                    inner = getattr(j, "jaxpr", j)
                    if hasattr(inner, "eqns"):
                        yield from eqns(inner)

    def head_casts_in_loops(jaxpr) -> int:
        return sum(e.primitive.name == "convert_element_type" and e.invars[0].aval.dtype == jnp.float32
                   and getattr(e.invars[0].aval, "shape", ()) == head
                   for scan in eqns(jaxpr) if scan.primitive.name == "scan"
                   for e in eqns(scan.params["jaxpr"].jaxpr))

    assert head_casts_in_loops(jax.make_jaxpr(grads)(params, rest, batch).jaxpr) == 0
    # the head's weight gradient leaves its product in float32 (`layers._widened_dot`'s master): nothing
    # in the loop widens a bf16 head gradient before adding it to the float32 sum (but zeros: the
    # hoisted cast's own gradient, which XLA folds away)
    def widened(jaxpr) -> int:
        loops = [scan.params["jaxpr"].jaxpr for scan in eqns(jaxpr) if scan.primitive.name == "scan"]
        zeros = {id(v) for body in loops for e in eqns(body) if e.primitive.name == "broadcast_in_dim"
                 and all(getattr(a, "val", None) == 0 for a in e.invars) for v in e.outvars}
        return sum(e.primitive.name == "convert_element_type" and e.invars[0].aval.dtype == jnp.bfloat16
                   and e.params["new_dtype"] == jnp.float32 and getattr(e.invars[0].aval, "shape", ()) == head
                   and id(e.invars[0]) not in zeros for body in loops for e in eqns(body))

    assert widened(jax.make_jaxpr(grads)(params, rest, batch).jaxpr) == 0
    got = jax.jit(grads)(params, rest, batch)
    try:  # jax caches the traces of the custom gradient's forward pass: cleared for each variant
        monkeypatch.setattr(losses, "hoisted_casts", lambda fn_c, args, consts: (fn_c, []))
        jax.clear_caches()
        assert head_casts_in_loops(jax.make_jaxpr(grads)(params, rest, batch).jaxpr) == 1  # inside, as before
        want = jax.jit(grads)(params, rest, batch)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_target_logit_s_gradient_is_placed_by_comparison_not_by_scatter(dtype):
    # a scatter-add into [B, L, V] zeros sat between the softmax's gradient and its cast: on a GPU a
    # 256k vocabulary's float32 gradient written and read once more per chunk
    logits = (jax.random.normal(jax.random.key(0), (3, 7, 50)) * 4).astype(dtype)
    targets = jax.random.randint(jax.random.key(1), (3, 7), 0, 50).at[0, :2].set(jnp.array([0, 49]))
    g = jax.random.normal(jax.random.key(2), (3, 7)).astype(dtype)
    gather = lambda x: jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]  # noqa: E731
    value, vjp = jax.vjp(lambda x: picked(x, targets), logits)
    ref_value, ref_vjp = jax.vjp(gather, logits)
    np.testing.assert_array_equal(np.asarray(value, np.float32), np.asarray(ref_value, np.float32))
    (grad,), (ref_grad,) = vjp(g), ref_vjp(g)
    assert grad.dtype == dtype
    np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(ref_grad, np.float32))
    loss = lambda x: token_losses(x, targets, 0.1, 1e-4)[0].sum()  # noqa: E731
    assert "scatter" not in str(jax.make_jaxpr(jax.grad(loss))(logits.astype(jnp.float32)))
    assert "scatter" in str(jax.make_jaxpr(jax.grad(lambda x: gather(x).sum()))(logits))  # what autodiff gives


def test_the_one_pass_log_sum_exp_equals_jax_s_and_is_the_gpu_s():
    from jaxft.train import losses

    x = jax.random.normal(jax.random.key(0), (3, 5, 300)) * 20
    x = x.at[1, 1, 7].set(-jnp.inf)  # a masked logit
    g = jax.random.normal(jax.random.key(1), (3, 5))
    (one, vjp_one), (two, vjp_two) = (jax.vjp(lambda x: losses.log_sum_exp(x, one_pass=p), x) for p in (True, False))
    np.testing.assert_allclose(one, two, rtol=1e-6)
    np.testing.assert_allclose(vjp_one(g)[0], vjp_two(g)[0], rtol=1e-5, atol=1e-7)
    assert "reduce_max" not in str(jax.make_jaxpr(lambda x: losses.log_sum_exp(x, one_pass=True))(x))  # one reduce
    assert float(losses.log_sum_exp(jnp.full((1, 4), -jnp.inf), one_pass=True)[0]) == -np.inf
    assert not losses._one_pass_here()  # the CPU keeps jax's two passes


def test_a_chunked_loss_with_the_one_pass_log_sum_exp_trains_as_with_two(monkeypatch):
    from jaxft.train import losses

    cfg = preset("tiny-llama", n_layers=1)
    graphdef, params, rest = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    batch = make_batch(cfg, rows=4, length=19)
    grads = jax.jit(jax.grad(make_loss_fn(graphdef, TrainConfig(loss_chunk=5, loss_chunk_mib=0, **LOSS),
                                          model_input_keys(cfg)), has_aux=True))
    want = grads(params, rest, batch)
    online = lambda: " reduce[" in str(jax.make_jaxpr(grads)(params, rest, batch))  # noqa: E731 - lax.reduce
    assert not online()
    monkeypatch.setattr(losses, "_one_pass_here", lambda: True)
    jax.clear_caches()  # the custom gradient's forward trace is cached
    try:
        grads = jax.jit(jax.grad(make_loss_fn(graphdef, TrainConfig(loss_chunk=5, loss_chunk_mib=0, **LOSS),
                                              model_input_keys(cfg)), has_aux=True))
        assert online()
        got = grads(params, rest, batch)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    assert_trees_close(got, want, rtol=1e-5)
