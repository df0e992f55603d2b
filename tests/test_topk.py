"""jaxft.models.topk.top_k: the block-maxima top-k equals jax.lax.top_k, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models.topk import BLOCK, top_k


def _same_as_lax(x, k):
    got_v, got_i = jax.jit(top_k, static_argnums=1)(x, k)
    want_v, want_i = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    assert got_i.dtype == jnp.int32


def _top_k_input_widths(x, k):
    jaxpr = jax.make_jaxpr(top_k, static_argnums=1)(x, k)
    return [e.invars[0].aval.shape[-1] for e in jaxpr.eqns if e.primitive.name == "top_k"]


@pytest.mark.parametrize("shape,k", [((3, 5, 4096), 8), ((2, 32768), 8), ((4, 8192), 1), ((2, 65536), 50)])
def test_random_values_take_the_blocks_and_match_lax(shape, k):
    x = jax.random.normal(jax.random.key(k), shape)
    _same_as_lax(x, k)
    # the full axis never reaches a top_k: only the block maxima and the kept blocks do
    assert _top_k_input_widths(x, k) == [shape[-1] // BLOCK, k * BLOCK]


def test_ties_go_to_the_lowest_index_as_lax():
    """Few distinct values (ties everywhere) and a few larger ones in later blocks, so the best
    blocks come out of the block ranking out of order."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(6, 16384)).astype(np.float32)
    for row in range(6):
        at = rng.choice(np.arange(BLOCK * 20, 16384), size=3, replace=False)
        x[row, at] = [10.0, 10.0, 11.0]
    _same_as_lax(jnp.asarray(x), 8)
    _same_as_lax(jnp.asarray(x), 2)


def test_minus_inf_rows_and_a_ragged_axis():
    """Beam search's candidates: beams not yet alive are all -inf; an axis that is not a multiple
    of the block is padded with -inf after its end, which must never be chosen over a real -inf."""
    rng = np.random.default_rng(1)
    n = 4 * 1000 + 37
    x = rng.normal(size=(5, n)).astype(np.float32)
    x[0, :] = -np.inf
    x[1, 3:] = -np.inf  # 3 finite entries, k = 8: five -inf ones, the lowest indices
    x[2, 1000:] = -np.inf
    got_v, got_i = top_k(jnp.asarray(x), 8)
    assert int(got_i.max()) < n
    _same_as_lax(jnp.asarray(x), 8)


def test_short_axes_and_integers_take_lax_directly():
    x = jax.random.normal(jax.random.key(0), (2, (4 * 8 - 1) * BLOCK))  # 31 blocks for k = 8
    assert _top_k_input_widths(x, 8) == [x.shape[-1]]
    _same_as_lax(x, 8)
    ints = jnp.arange(40000, dtype=jnp.int32).reshape(1, -1) % 977
    assert _top_k_input_widths(ints, 4) == [40000]


def test_other_platforms_keep_their_native_top_k(monkeypatch):
    from jaxft.models import topk

    for n, where in ((32768 + BLOCK, "tpu"), (32768 + 2 * BLOCK, "gpu")):  # shapes no other test traced
        monkeypatch.setattr(topk, "platform", lambda where=where: where)
        assert _top_k_input_widths(jax.random.normal(jax.random.key(0), (2, n)), 8) == [n]


def test_bfloat16_and_gradients_of_the_values():
    x = jax.random.normal(jax.random.key(3), (2, 8192)).astype(jnp.bfloat16)
    _same_as_lax(x, 4)
    x32 = x.astype(jnp.float32)
    g = jax.grad(lambda v: jnp.sum(top_k(v, 4)[0] * jnp.arange(1.0, 5.0)))(x32)
    want = jax.grad(lambda v: jnp.sum(jax.lax.top_k(v, 4)[0] * jnp.arange(1.0, 5.0)))(x32)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(want))


def test_the_vocabulary_selection_compiles_for_a_tpu_ahead_of_time():
    """Top-p's bisection (int32 keys from a bitcast) and the Gumbel draw, at a 250k vocabulary,
    lowered and compiled for a TPU's compile-only device (no TPU needed); the block top-k too,
    which the TPU does not take at run time (its own TopK), but a CPU host compiling for it does."""
    pytest.importorskip("libtpu")
    from jax.sharding import SingleDeviceSharding

    from jaxft.eval.sampling import sample, top_p_filter
    from jaxft.train.chips import abstract_devices, parse_topology

    on_tpu = SingleDeviceSharding(abstract_devices(parse_topology("v5e-4"))[0])
    cand = jax.ShapeDtypeStruct((8, 4 * 250112), jnp.float32, sharding=on_tpu)
    logits = jax.ShapeDtypeStruct((8, 250112), jnp.bfloat16, sharding=on_tpu)
    cases = ((lambda x: top_k(x, 8), cand, [((8, 8), jnp.float32), ((8, 8), jnp.int32)]),
             (lambda x: top_p_filter(x, 0.9), logits, [((8, 250112), jnp.bfloat16)]),
             (lambda x: sample(jax.random.key(0), x, temperature=0.7, top_k=50, top_p=0.9), logits,
              [((8,), jnp.int32)]))
    for fn, arg, want in cases:
        compiled = jax.jit(fn).lower(arg).compile()
        assert ":T(" in compiled.as_text()  # the TPU's tiled layouts: a TPU program
        assert [(o.shape, o.dtype) for o in jax.tree.leaves(compiled.out_info)] == want
