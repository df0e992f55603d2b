"""`layers.dense` (the contraction every Linear, LoRA factor and the tied head uses), and what the
norms and the MLP keep for the backward pass."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models.layers import dense


@pytest.mark.parametrize("x_shape,w_shape,n_in", [
    ((2, 3, 8), (8, 4, 5), 1),      # q/k/v: [B, L, D] . [D, H, K]
    ((2, 3, 4, 5), (4, 5, 8), 2),   # o: [B, L, H, K] . [H, K, D]
    ((6, 8), (8, 7), 1),            # already 2-D
])
def test_dense_values_and_gradients_equal_dot_general(x_shape, w_shape, n_in):
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    nx = len(x_shape)
    ref = lambda x, w: jax.lax.dot_general(x, w, ((tuple(range(nx - n_in, nx)), tuple(range(n_in))), ((), ())))  # noqa: E731
    got = dense(x, w, n_in)
    assert got.shape == x_shape[:nx - n_in] + w_shape[n_in:]
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref(x, w)), rtol=1e-5, atol=1e-5)
    g_got = jax.grad(lambda x, w: jnp.sum(jnp.sin(dense(x, w, n_in))), argnums=(0, 1))(x, w)
    g_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(ref(x, w))), argnums=(0, 1))(x, w)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_dense_on_cpu_is_one_2d_matmul_forward_and_backward():
    """On the CPU every dot of a Linear's forward and backward is [M, K] . [K, N]: a dot that
    contracts several dims made XLA:CPU write transposed activation copies (the train-step
    profile in benchmarks/RESULTS.md)."""
    x, w = jnp.ones((2, 16, 8)), jnp.ones((8, 4, 6))
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(dense(x, w, 1) ** 2), argnums=(0, 1)))
    text = grad.lower(x, w).as_text()
    dots = re.findall(r"stablehlo\.dot_general.*?contracting_dims = \[([\d, ]*)\] x \[([\d, ]*)\]", text)
    assert len(dots) == 3  # forward, d/dx, d/dw
    assert all(len(lhs.split(",")) == 1 and len(rhs.split(",")) == 1 for lhs, rhs in dots)
    assert all(re.search(r"tensor<\d+x\d+xf32>, tensor<\d+x\d+xf32>\) -> tensor<\d+x\d+xf32>", line)
               for line in text.splitlines() if "stablehlo.dot_general" in line)


def _one_device():
    from jaxft.config.schema import MeshConfig
    from jaxft.sharding import make_mesh, use_mesh

    return use_mesh(make_mesh(MeshConfig(), jax.devices()[:1]))


def _residuals(fn, *args) -> list[jax.Array]:
    """The arrays `jax.vjp` keeps for the backward pass (its function's leaves), inputs excluded."""
    _, vjp_fn = jax.vjp(fn, *args)
    given = {id(a) for a in jax.tree.leaves(args)}
    return [r for r in jax.tree.leaves(vjp_fn) if id(r) not in given]


def test_the_head_s_float32_logits_of_bf16_states_have_a_bf16_backward():
    """The wide (float32) result keeps its values; the two backward products run on bf16 operands
    (autodiff ran them in float32: TF32 on a GPU, on [tokens, vocab] cotangents)."""
    kx, kw, kc = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 3, 16)).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (16, 40)).astype(jnp.bfloat16)
    ct = jax.random.normal(kc, (2, 3, 40))  # float32, as the loss hands it back
    dims = (((2,), (0,)), ((), ()))
    y = dense(x, w, 1, out_dtype=jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), np.asarray(
        jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)))
    _, vjp = jax.vjp(lambda x, w: dense(x, w, 1, out_dtype=jnp.float32), x, w)
    _, vjp_ref = jax.vjp(lambda x, w: jax.lax.dot_general(x, w, dims), x, w)  # bf16 throughout
    for got, ref in zip(vjp(ct), vjp_ref(ct.astype(jnp.bfloat16))):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(dense(x, w, 1, out_dtype=jnp.float32) ** 2),
                                    argnums=(0, 1)))(x, w)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) >= 3 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    # same-dtype results keep plain autodiff (float32 models are unchanged)
    xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda w: jnp.sum(dense(xf, w, 1) ** 2))(wf)),
                                  np.asarray(jax.grad(lambda w: jnp.sum(jax.lax.dot_general(xf, w, dims) ** 2))(wf)))


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_a_bf16_norm_keeps_its_input_alone_for_the_backward(norm):
    """No float32 [B, L, D] copies of the input (autodiff kept two); values and gradients as the
    plain formula's."""
    from flax import nnx

    from jaxft.models.layers import _layer_norm, _rms_norm, make_norm

    with _one_device():
        layer = make_norm(norm, 64, eps=1e-6, plus_one=False, param_dtype=jnp.float32, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (4, 8, 64)).astype(jnp.bfloat16)
    graphdef, state = nnx.split(layer)
    run = lambda state, x: nnx.merge(graphdef, state)(x).astype(jnp.float32)  # noqa: E731
    assert [r.shape for r in _residuals(run, state, x) if r.size >= x.size] == []  # x itself, nothing more
    plain = functools.partial(_rms_norm if norm == "rmsnorm" else _layer_norm, 1e-6, False, jnp.bfloat16)
    params = [state["scale"][...]] + ([state["bias"][...]] if norm == "layernorm" else [])
    assert len([r for r in _residuals(lambda x, *p: plain(x, *p).astype(jnp.float32), x, *params)
                if r.size >= x.size and r.dtype == jnp.float32]) >= 2  # what autodiff alone keeps
    loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x).astype(jnp.float32)))  # noqa: E731
    np.testing.assert_array_equal(np.asarray(run(state, x)), np.asarray(plain(x, *params).astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(jax.grad(loss(lambda x: run(state, x)))(x), np.float32),
                               np.asarray(jax.grad(loss(lambda x: plain(x, *params)))(x), np.float32), rtol=1e-2)


def test_a_swiglu_mlp_keeps_gate_and_up_alone():
    from flax import nnx

    from jaxft.models.layers import MLP

    with _one_device():
        mlp = MLP(32, 96, activation="swiglu", use_bias=False, init_std=0.1, param_dtype=jnp.float32,
                  dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 8, 32)).astype(jnp.bfloat16)
    graphdef, state = nnx.split(mlp)
    run = lambda state, x: nnx.merge(graphdef, state)(x).astype(jnp.float32)  # noqa: E731
    hidden = [r for r in _residuals(run, state, x) if r.size == 2 * 8 * 96]  # [B, L, F] or [B * L, F]
    assert len(hidden) == 2  # gate and up; act(gate) * up, which the down kernel's gradient reads, recomputed
    ref = jax.nn.silu(x @ state["gate"]["kernel"][...].astype(jnp.bfloat16)) * (
        x @ state["up"]["kernel"][...].astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(run(state, x)), np.asarray(
        (ref @ state["down"]["kernel"][...].astype(jnp.bfloat16)).astype(jnp.float32)))


def test_the_recomputed_hidden_sees_the_forward_s_dropout_mask():
    """With activation dropout, the backward's recomputed hidden must use the forward's mask: the
    gradient matches a central difference of the loss (a fresh mask would not)."""
    from flax import nnx

    from jaxft.models.dropout import dropout_rng
    from jaxft.models.layers import MLP

    with _one_device():
        mlp = MLP(8, 32, activation="swiglu", use_bias=True, init_std=0.5, param_dtype=jnp.float32,
                  dtype=jnp.float32, rngs=nnx.Rngs(0), activation_dropout=0.5)
    graphdef, state = nnx.split(mlp)
    x = jax.random.normal(jax.random.key(4), (2, 5, 8))

    def loss(x):
        with dropout_rng(jax.random.key(7)):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))

    v = jax.random.normal(jax.random.key(5), x.shape)
    eps = 1e-3
    numeric = (jax.jit(loss)(x + eps * v) - jax.jit(loss)(x - eps * v)) / (2 * eps)
    analytic = jnp.sum(jax.jit(jax.grad(loss))(x) * v)
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2)
    with dropout_rng(jax.random.key(7)):  # and dropout is active: not the eval output
        dropped = nnx.merge(graphdef, state)(x)
    assert not np.allclose(dropped, nnx.merge(graphdef, state)(x))


@pytest.mark.parametrize("lead", [(6,), (2, 3)])
def test_a_widened_dense_gives_its_float32_master_the_weight_gradient_straight_from_the_product(lead):
    # bf16 operands, float32 logits (a head): the weight gradient goes to the float32 parameter the
    # kernel was cast from, accumulated in float32 by the product (a chunked loss adds it to its float32
    # sum in the product's epilogue), not rounded to bf16 and widened again
    x = jax.random.normal(jax.random.key(0), (*lead, 16)).astype(jnp.bfloat16)
    master = jax.random.normal(jax.random.key(1), (16, 4, 8)) * 0.3

    def objective(x, master, with_master=True):
        y = dense(x, master.astype(jnp.bfloat16), 1, out_dtype=jnp.float32, master=master if with_master else None)
        return jnp.sum(jnp.sin(y))

    gx, gm = jax.grad(objective, (0, 1))(x, master)
    assert (gx.dtype, gm.dtype) == (jnp.bfloat16, jnp.float32)
    w = master.astype(jnp.bfloat16).astype(jnp.float32)
    y = jnp.einsum("...i,ijk->...jk", x.astype(jnp.float32), w)
    ct = jnp.cos(y).astype(jnp.bfloat16).astype(jnp.float32)  # the cotangent in the inputs' dtype
    np.testing.assert_allclose(gm, jnp.einsum("...i,...jk->ijk", x.astype(jnp.float32), ct), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx, np.float32), jnp.einsum("...jk,ijk->...i", ct, w), rtol=1e-2, atol=1e-2)
    # without a master the kernel itself gets it, in its dtype: the same gradient rounded to bf16
    _, g_bf16 = jax.grad(functools.partial(objective, with_master=False), (0, 1))(x, master)
    assert g_bf16.dtype == jnp.float32  # the cast's transpose widens it back ...
    np.testing.assert_array_equal(g_bf16, gm.astype(jnp.bfloat16).astype(jnp.float32))  # ... after rounding
