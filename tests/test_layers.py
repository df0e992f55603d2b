"""`layers.dense`: the contraction every Linear, LoRA factor and the tied head uses."""

from __future__ import annotations

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
