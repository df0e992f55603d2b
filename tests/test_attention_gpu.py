"""cuDNN flash attention (`model.attention_kernel: cudnn`, jaxft/models/kernels.py) on a GPU: it
equals XLA attention (forward and gradients, packed rows, grouped-query heads, causal or not),
a bf16 model with it equals the same model on XLA attention, and the compiled step really runs
cuDNN's fused attention.  Skipped where JAX has no GPU (CI); `benchmarks/gpu_check.sh` runs it
on a lent GPU with ``JAX_PLATFORMS=cuda``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import test_attention_kernels

from jaxft.config.schema import ModelConfig
from jaxft.models import kernels
from jaxft.models.attention import attend
from jaxft.models.masks import bidirectional_segments, causal_segments
from jaxft.models.registry import build_model

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN)")


def _qkv(**kw):
    return tuple(x.astype(jnp.bfloat16) for x in test_attention_kernels._qkv(L=256, H=8, **kw))


def _segments(B=2, L=256):
    return test_attention_kernels._segments(B, L)  # two packed examples in row 0, padding in row 1


def _rel(a, b, rows):
    a, b = np.asarray(a, np.float32)[rows], np.asarray(b, np.float32)[rows]
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("causal_flag", [True, False])
@pytest.mark.parametrize("make", [causal_segments, bidirectional_segments])
def test_cudnn_equals_xla_attention_with_packed_rows_and_gqa(make, causal_flag, monkeypatch):
    monkeypatch.setattr(kernels, "CUDNN_CAUSAL", causal_flag)
    q, k, v = _qkv()
    segments = _segments()
    mask = make(segments)
    real = np.asarray(segments) != 0  # padding rows' outputs are never read

    def loss(kernel, q, k, v):
        out = attend(q, k, v, mask_B1LS=mask, kernel=kernel)
        return jnp.sum(out.astype(jnp.float32) * jnp.where(segments != 0, 1.0, 0.0)[:, :, None, None]), out

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)
    (g_fast, out_fast), (g_ref, out_ref) = grad("cudnn", q, k, v), grad("xla", q, k, v)
    assert _rel(out_fast, out_ref, real) < 2e-2
    for a, b in zip(g_fast, g_ref):
        assert _rel(a, b, real) < 3e-2
    hlo = jax.jit(lambda q, k, v: attend(q, k, v, mask_B1LS=mask, kernel="cudnn")).lower(q, k, v).compile().as_text()
    assert "cudnn" in hlo.lower() and "fmha" in hlo.lower()  # the fused kernel, not an XLA fallback


def test_a_bf16_model_with_cudnn_equals_the_xla_model(monkeypatch):
    calls = []
    cudnn = kernels.cudnn_attention
    monkeypatch.setattr(kernels, "cudnn_attention", lambda *a, **kw: calls.append(1) or cudnn(*a, **kw))
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=512,
                      max_seq_len=256, dtype="bfloat16")
    r = np.random.default_rng(1)
    tokens = jnp.asarray(r.integers(3, 512, size=(2, 256)), jnp.int32)
    segments = _segments()
    positions = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (2, 256))

    def loss_and_grad(kernel):
        model = build_model(dataclasses.replace(cfg, attention_kernel=kernel), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens, positions, segments)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            return -jnp.sum(jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0] * (segments != 0))

        return jax.jit(jax.value_and_grad(loss))(params)

    (l_fast, g_fast) = loss_and_grad("cudnn")
    assert len(calls) == 2  # both layers took the kernel
    (l_ref, g_ref) = loss_and_grad("xla")
    assert abs(float(l_fast) - float(l_ref)) / abs(float(l_ref)) < 1e-2
    flat_fast, flat_ref = jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)
    worst = max(_rel(a, b, slice(None)) for a, b in zip(flat_fast, flat_ref))
    assert worst < 5e-2
