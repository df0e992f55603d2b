"""top_p_filter's bisection equals the sorted-cumsum definition of the nucleus."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.eval.sampling import NEG_INF, top_k_filter, top_p_filter


def nucleus_by_sorting(logits_BV, p):
    """The definition (HF's order): sort, mass strictly above each token < p, ties with the last kept."""
    x = np.asarray(logits_BV, np.float64)
    keep = np.zeros(x.shape, bool)
    for b, row in enumerate(x):
        order = np.argsort(-row, kind="stable")
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        above = np.cumsum(probs) - probs
        n_keep = max(int(np.sum(above < p)), 1)
        keep[b] = row >= row[order[n_keep - 1]]
    return keep


def kept(filtered):
    return np.asarray(filtered) > NEG_INF


@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])  # flat .. peaked
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_bisection_keeps_the_sorted_nucleus(scale, p):
    x = jax.random.normal(jax.random.key(int(scale * 10)), (6, 5000)) * scale
    got = jax.jit(top_p_filter, static_argnums=1)(x, p)
    np.testing.assert_array_equal(kept(got), nucleus_by_sorting(x, p))
    np.testing.assert_array_equal(np.asarray(got)[kept(got)], np.asarray(x)[kept(got)])  # kept logits unchanged


def test_ties_negative_logits_and_minus_inf():
    rng = np.random.default_rng(0)
    x = rng.integers(-6, 3, size=(8, 3000)).astype(np.float32)  # ties everywhere, both signs
    x[:, rng.random(3000) < 0.5] = -np.inf  # as after top-k / forced tokens
    x[0, :] = -np.inf
    x[0, 17] = 0.0  # a forced token: only it survives
    for p in (0.1, 0.4, 0.8, 0.95):
        np.testing.assert_array_equal(kept(top_p_filter(jnp.asarray(x), p)), nucleus_by_sorting(x, p))
    assert kept(top_p_filter(jnp.asarray(x), 0.9))[0].sum() == 1


def test_after_top_k_and_in_bfloat16():
    x = jax.random.normal(jax.random.key(5), (4, 4096)) * 4
    filtered = top_k_filter(x, 40)
    np.testing.assert_array_equal(kept(top_p_filter(filtered, 0.7)), nucleus_by_sorting(filtered, 0.7))
    xb = x.astype(jnp.bfloat16)
    got = top_p_filter(xb, 0.6)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(kept(got), nucleus_by_sorting(xb.astype(jnp.float32), 0.6))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sample_draws_what_jax_random_categorical_draws(dtype):
    """`sample` adds the same Gumbel noise as jax.random.categorical and takes the first maximum."""
    from jaxft.eval.sampling import sample

    logits = (jax.random.normal(jax.random.key(7), (16, 3000)) * 2).astype(dtype)
    logits = logits.at[:, ::3].set(NEG_INF)
    for seed in range(5):
        key = jax.random.key(seed)
        got = sample(key, logits, temperature=1.0, top_k=0, top_p=1.0)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.random.categorical(key, logits, axis=-1)))
        assert got.dtype == jnp.int32
    key = jax.random.key(9)
    got = sample(key, logits, temperature=0.7, top_k=50, top_p=0.8)
    want = jax.random.categorical(key, top_p_filter(top_k_filter(logits / 0.7, 50), 0.8), axis=-1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.asarray(got).std() > 0  # not one token for every row
