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
