"""Attention building blocks: ALiBi slopes, RoPE frequencies (vs HF), the explicit path."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.config.schema import RopeScalingConfig
from jaxft.models.attention import (alibi_bias, alibi_slopes, apply_rope, attend,
                                    causal_segment_mask, rope_inv_freq)


def test_alibi_slopes_power_of_two_and_not():
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    # 6 heads: the 4-head set, then every other slope of the 8-head set
    np.testing.assert_allclose(alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
    assert alibi_slopes(12).shape == (12,)


def test_alibi_bias_is_relative():
    pos_BL = jnp.array([[0, 1, 2, 0, 1]])
    bias = np.asarray(alibi_bias(pos_BL, pos_BL, 2))
    assert bias[0, 0, 2, 0] == np.float32(-2 * alibi_slopes(2)[0])  # key 0 seen from query 2
    assert bias[0, 1, 4, 3] == np.float32(-alibi_slopes(2)[1])  # packed: positions restart


def test_mask_never_empties_a_row():
    seg_BL = jnp.array([[1, 1, 2, 0, 0], [0, 0, 0, 0, 0]])
    mask = np.asarray(causal_segment_mask(seg_BL))[:, 0]
    assert mask.shape == (2, 5, 5) and np.all(mask.any(-1))
    assert not mask[0, 2, :2].any() and not mask[0, 3, :3].any()


def _qkv(H=4, G=2, K=8, L=6, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (2, L, H, K)), jax.random.normal(ks[1], (2, L, G, K)),
            jax.random.normal(ks[2], (2, L, G, K)))


@pytest.mark.parametrize("with_bias", [False, True])
def test_explicit_path_matches_dot_product_attention(with_bias):
    """The head-major path (the CPU's, and everyone's for soft-capping / dropout) against
    `jax.nn.dot_product_attention`: outputs and all three gradients, GQA, packed rows."""
    q, k, v = _qkv()
    seg_BL = jnp.array([[1, 1, 1, 2, 2, 0], [1] * 6])
    mask = causal_segment_mask(seg_BL)
    pos_BL = jnp.array([[0, 1, 2, 0, 1, 0], list(range(6))])
    bias = alibi_bias(pos_BL, pos_BL, 4) if with_bias else None
    weights = jax.random.normal(jax.random.key(3), q.shape)

    def loss(fn):
        return jax.value_and_grad(lambda *qkv: jnp.sum(fn(*qkv) * weights), argnums=(0, 1, 2))(q, k, v)

    want = loss(lambda *qkv: jax.nn.dot_product_attention(*qkv, bias=bias, mask=mask, implementation="xla"))
    for softcap in (None, 1e6):  # tanh(x/c)*c ~ x
        got = loss(lambda *qkv: attend(*qkv, mask_B1LS=mask, bias_BHLS=bias, logit_softcap=softcap))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


def test_rope_is_relative():
    q, k, _ = _qkv(H=2, G=2)
    inv_freq, _ = rope_inv_freq(8, 10000.0, None)
    pos = jnp.arange(6)[None].repeat(2, 0)
    s0 = jnp.einsum("blhk,bshk->bhls", apply_rope(q, pos, inv_freq), apply_rope(k, pos, inv_freq))
    s7 = jnp.einsum("blhk,bshk->bhls", apply_rope(q, pos + 7, inv_freq), apply_rope(k, pos + 7, inv_freq))
    np.testing.assert_allclose(np.asarray(s0), np.asarray(s7), atol=1e-4)


def test_llama3_scaling_bands():
    scaling = RopeScalingConfig(type="llama3", factor=8.0, original_max_position=8192)
    base, _ = rope_inv_freq(128, 500000.0, None)
    got, factor = rope_inv_freq(128, 500000.0, scaling)
    wavelen = 2 * math.pi / base
    assert factor == 1.0
    np.testing.assert_allclose(got[wavelen < 8192 / 4], base[wavelen < 8192 / 4])
    np.testing.assert_allclose(got[wavelen > 8192], base[wavelen > 8192] / 8)
    mid = (wavelen >= 8192 / 4) & (wavelen <= 8192)
    assert np.all((got[mid] <= base[mid]) & (got[mid] >= base[mid] / 8))


@pytest.mark.parametrize("scaling", [
    RopeScalingConfig(type="linear", factor=4.0),
    RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position=8192),
    RopeScalingConfig(type="yarn", factor=4.0, original_max_position=32768),
], ids=["linear", "llama3", "yarn"])
def test_rope_scaling_matches_transformers(scaling):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": scaling.type, "rope_theta": 1e6, "factor": scaling.factor}
    if scaling.type == "llama3":
        params.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                      original_max_position_embeddings=scaling.original_max_position)
    if scaling.type == "yarn":
        params.update(beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow,
                      original_max_position_embeddings=scaling.original_max_position)
    hf_cfg = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=128,
                                      max_position_embeddings=131072, rope_parameters=params)
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[scaling.type](hf_cfg, "cpu")
    got, factor = rope_inv_freq(128, 1e6, scaling)
    np.testing.assert_allclose(got, hf_inv_freq.numpy(), rtol=1e-5)
    assert factor == pytest.approx(hf_factor)


# --------------------------------------------------------------------------- RoPE tables once per forward


def _tiny_llama(n_layers: int, d_model: int):
    import dataclasses
    import pathlib

    import yaml
    from flax import nnx

    from jaxft.config.schema import ModelConfig
    from jaxft.models import build_model

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-llama.yaml"
    cfg = dataclasses.replace(ModelConfig(**yaml.safe_load(path.read_text())["model"]), n_layers=n_layers,
                              d_model=d_model)
    return cfg, build_model(cfg, rngs=nnx.Rngs(0))


def _sin_ops(compiled_text: str) -> int:
    return compiled_text.count(" sine(")


@pytest.mark.parametrize("L", [1, 6])
def test_rope_tables_are_the_direct_cos_sin(L):
    """The tables (through the CPU's identity gather) are exactly cos / sin of position x frequency,
    and rotating with them is apply_rope."""
    from jaxft.models.attention import rope_tables, rotate

    inv_freq, factor = rope_inv_freq(8, 10000.0, None)
    pos_BL = jnp.asarray(np.random.default_rng(0).integers(0, 5000, (3, L)), jnp.int32)
    cos, sin = jax.jit(lambda p: rope_tables(p, inv_freq, 0.5))(pos_BL)
    angles = np.asarray(pos_BL, np.float32)[..., None] * np.asarray(inv_freq, np.float32)
    ref_cos, ref_sin = jax.jit(lambda a: (jnp.cos(a) * 0.5, jnp.sin(a) * 0.5))(angles)
    np.testing.assert_array_equal(np.asarray(cos), np.asarray(ref_cos))
    np.testing.assert_array_equal(np.asarray(sin), np.asarray(ref_sin))
    x = jax.random.normal(jax.random.key(1), (3, L, 2, 8))
    np.testing.assert_array_equal(np.asarray(rotate(x, (cos, sin))), np.asarray(apply_rope(x, pos_BL, inv_freq, 0.5)))


def test_a_decoder_computes_rope_sin_cos_once_per_forward_and_step():
    """XLA:CPU fused each layer's sin / cos into its q and k rotations (4 layers: 8 sine ops in the
    forward, 16 with the backward); the model's tables are computed once and read by every layer."""
    from flax import nnx

    cfg, model = _tiny_llama(n_layers=4, d_model=72)  # a shape no other test compiles
    graphdef, state = nnx.split(model)
    ids = jnp.ones((2, 9), jnp.int32)

    def loss(state):
        return nnx.merge(graphdef, state)(ids).sum()

    assert _sin_ops(jax.jit(loss).lower(state).compile().as_text()) == 1
    assert _sin_ops(jax.jit(jax.grad(loss)).lower(state).compile().as_text()) == 1

    def step(state, positions_BL, cache):  # one decode step: L = 1
        return nnx.merge(graphdef, state).decode_step(ids[:, :1], positions_BL, cache)

    cache = model.init_cache(2, 12)
    assert _sin_ops(jax.jit(step).lower(state, jnp.full((2, 1), 3, jnp.int32), cache).compile().as_text()) == 1


def test_rope_tables_on_other_platforms_are_computed_directly(monkeypatch):
    from jaxft.models import kernels
    from jaxft.models.attention import rope_tables

    inv_freq, _ = rope_inv_freq(8, 10000.0, None)
    pos_BL = jnp.zeros((2, 5), jnp.int32)
    for where, gathers in (("cpu", True), ("tpu", False), ("gpu", False)):
        monkeypatch.setattr(kernels, "platform", lambda where=where: where)
        jaxpr = str(jax.make_jaxpr(lambda p: rope_tables(p, inv_freq))(pos_BL))
        assert ("gather" in jaxpr) == gathers, where


def test_materialized_values_are_computed_once_on_the_cpu():
    """An expensive value read by several consumers (broadcast into each): XLA:CPU evaluates it in
    every consumer's fusion unless `materialized` reads it through the identity gather."""
    from jaxft.models.kernels import materialized

    def program(once):
        def f(x_BL, ys):
            table = jnp.sin(x_BL * 3.0) * jnp.cos(x_BL)
            table = materialized(table) if once else table
            return [jnp.tanh(y * table[:, :, None, None]) @ jnp.ones((5, 5)) for y in ys]
        ys = [jnp.full((4, 11, 3, 5), float(i)) for i in range(6)]  # shapes no other test compiles
        return jax.jit(f).lower(jnp.ones((4, 11)), ys).compile().as_text()

    assert _sin_ops(program(once=False)) == 6
    assert _sin_ops(program(once=True)) == 1
    x = jax.random.normal(jax.random.key(0), (3, 7))
    mask = x > 0.1
    np.testing.assert_array_equal(np.asarray(jax.jit(materialized)(x)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(jax.jit(materialized)(mask)), np.asarray(mask))


def test_the_explicit_attention_keeps_its_exponentials_alone_for_the_backward():
    """The mask enters as an additive bias and the row maximum is taken of gradient-free logits, so
    the backward keeps the exponentials (and the probabilities the PV product reads), not the masked
    logits nor the mask broadcast over every query head; values equal the `where` formulation."""
    from jaxft.models.attention import _attend_head_major

    B, L, H, G, K = 2, 6, 4, 2, 8
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, L, H, K))
    k, v = jax.random.normal(kk, (B, L, G, K)), jax.random.normal(kv, (B, L, G, K))
    mask = jnp.tril(jnp.ones((L, L), bool))[None, None].repeat(B, 0).at[1, :, :, 4:].set(False)
    run = lambda q, k, v: _attend_head_major(q, k, v, mask, None, None, 0.3, 0.0)  # noqa: E731
    _, vjp_fn = jax.vjp(run, q, k, v)
    scores = [r for r in jax.tree.leaves(vjp_fn) if r.size == B * H * L * L]
    assert [r.dtype for r in scores if r.dtype == jnp.bool_] == [] and len(scores) <= 2

    def reference(q, k, v):  # the masked softmax written with `where`
        R = H // G
        logits = jnp.einsum("blgrk,bsgk->bgrls", q.reshape(B, L, G, R, K), k) * 0.3
        probs = jax.nn.softmax(jnp.where(mask[:, :, None], logits, -1e30), axis=-1)
        return jnp.einsum("bgrls,bsgk->blgrk", probs, v).reshape(B, L, H, K)

    np.testing.assert_allclose(np.asarray(run(q, k, v)), np.asarray(reference(q, k, v)), rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    for got, want in zip(jax.grad(loss(run), argnums=(0, 1, 2))(q, k, v),
                         jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
