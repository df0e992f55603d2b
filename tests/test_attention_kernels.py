"""Fused attention kernels (`model.attention_kernel`, jaxft/models/kernels.py): the TPU splash
kernel equals XLA attention (run on the CPU by the Pallas interpreter: forward and gradients,
alone, under a data x fsdp x tensor mesh, and inside whole models); a TPU train step compiled
ahead of time runs it; every call a kernel cannot take falls back to XLA with one log line."""

from __future__ import annotations

import logging
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.config.loader import load_config
from jaxft.config.schema import MeshConfig, ModelConfig
from jaxft.models import kernels
from jaxft.models.attention import attend
from jaxft.models.masks import bidirectional_segments, causal_segments
from jaxft.models.registry import build_model
from jaxft.sharding import make_mesh, use_mesh


def _qkv(B=2, L=128, H=4, G=2, K=64, seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=s), jnp.float32) for s in ((B, L, H, K), (B, L, G, K), (B, L, G, K)))


def _segments(B=2, L=128):
    seg = np.ones((B, L), np.int32)
    seg[0, 50:] = 2  # two packed examples
    seg[1, 100:] = 0  # right padding
    return jnp.asarray(seg)


@pytest.mark.parametrize("make", [causal_segments, bidirectional_segments])
def test_splash_equals_xla_attention_with_packed_rows_and_gqa(make):
    q, k, v = _qkv()
    mask = make(_segments())
    scale = 64 ** -0.5
    out = kernels.splash_attention(q, k, v, mask, scale=scale, interpret=True)
    ref = attend(q, k, v, mask_B1LS=mask.dense, kernel="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    g_splash = jax.grad(loss(lambda q, k, v: kernels.splash_attention(q, k, v, mask, scale=scale, interpret=True)),
                        argnums=(0, 1, 2))(q, k, v)
    g_xla = jax.grad(loss(lambda q, k, v: attend(q, k, v, mask_B1LS=mask.dense, kernel="xla")),
                     argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_splash, g_xla):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)


def test_splash_under_a_mesh_runs_per_device_and_equals_xla():
    """Rows over data x fsdp, heads (and kv heads) over tensor, in a shard_map."""
    q, k, v = _qkv(B=4)
    seg = jnp.concatenate([_segments(), _segments()], axis=0)
    mask = causal_segments(seg)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with use_mesh(mesh):
        out = jax.jit(lambda q, k, v, m: kernels.splash_attention(q, k, v, m, scale=0.125, interpret=True))(
            q, k, v, mask)
        hlo = jax.jit(lambda q, k, v, m: kernels.splash_attention(q, k, v, m, scale=0.125, interpret=True)).lower(
            q, k, v, mask).as_text()
    ref = attend(q, k, v, mask_B1LS=mask.dense, kernel="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
    assert "shard_map" in hlo or "manual" in hlo.lower()


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mbart"])
def test_a_model_with_the_splash_kernel_equals_the_xla_model(preset, monkeypatch):
    """Decoder-only (causal, packed) and BART (bidirectional encoder, causal decoder; the
    cross-attention falls back): logits and every gradient equal the XLA model's."""
    monkeypatch.setattr(kernels, "INTERPRET_ON_CPU", True)
    calls = []
    splash = kernels.splash_attention
    monkeypatch.setattr(kernels, "splash_attention", lambda *a, **kw: calls.append(1) or splash(*a, **kw))
    base = dict(vocab_size=256, d_model=128, n_heads=4, mlp_dim=256, n_layers=2, dtype="float32", max_seq_len=128)
    cfg = load_config_model(preset, base)
    seg = _segments()
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 256, size=seg.shape), jnp.int32)

    def run(kernel):
        import dataclasses
        model = build_model(dataclasses.replace(cfg, attention_kernel=kernel), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        def loss(p):
            m = nnx.merge(graphdef, p)
            logits = m(ids, None, seg, ids, None, seg) if cfg.family == "bart" else m(ids, None, seg)
            return jnp.sum(jnp.where(seg[..., None] > 0, jax.nn.log_softmax(logits), 0.0)), logits
        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return logits, grads

    logits_s, grads_s = run("splash")
    assert len(calls) == (4 if cfg.family == "bart" else 2)  # every self-attention; not BART's cross-attention
    logits_x, grads_x = run("xla")
    np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits_x), atol=1e-4)
    for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)


def load_config_model(preset: str, overrides: dict) -> ModelConfig:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(f"run_dir: run\nmodel: {{preset: {preset}}}\n")
        cfg = load_config(path, [f"model.{k}={v}" for k, v in overrides.items()])
    return cfg.model


TINY = textwrap.dedent("""\
    run_dir: run
    model: {preset: tiny-llama, vocab_size: 2048, d_model: 256, n_layers: 2, n_heads: 4, n_kv_heads: 2,
            mlp_dim: 384, max_seq_len: 256}
    data: {seq_len: 256}
    train: {global_batch: 8, steps: 10}
    mesh: {data: 2, fsdp: 1, tensor: 2}
""")


def test_a_tpu_train_step_compiled_ahead_of_time_runs_the_splash_kernel(tmp_path):
    """`auto` on (abstract) TPU devices: each layer's forward, dq and dkv kernels are Mosaic
    custom calls of the compiled step (`xla` takes none: the choice test)."""
    pytest.importorskip("libtpu")
    from jaxft.train.aot import lower_step_parts
    from jaxft.train.chips import abstract_devices, parse_topology

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    devices = abstract_devices(parse_topology("v5e-4"))
    hlo = lower_step_parts(load_config(path), devices).lowered.compile().as_text()
    assert hlo.count("tpu_custom_call") == 3 * 2


@pytest.mark.parametrize("remat,kernels_per_layer", [("dots", 4), ("dots_attention", 3)])
def test_remat_dots_attention_keeps_the_splash_forward(tmp_path, remat, kernels_per_layer):
    """`model.remat: dots` runs each layer's splash forward again in the backward pass (its custom
    VJP's residuals are the kernel's outputs, not products); `dots_attention` saves them."""
    pytest.importorskip("libtpu")
    from jaxft.train.aot import lower_step_parts
    from jaxft.train.chips import abstract_devices, parse_topology

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    devices = abstract_devices(parse_topology("v5e-4"))
    hlo = lower_step_parts(load_config(path, [f"model.remat={remat}"]), devices).lowered.compile().as_text()
    assert hlo.count("tpu_custom_call") == kernels_per_layer * 2


def test_kernel_choice_falls_back_to_xla_with_one_log_line_per_reason(caplog, monkeypatch):
    monkeypatch.setattr(kernels, "_warned", set())
    q, k, _ = _qkv()
    mask = causal_segments(_segments())
    choose = lambda kernel, **kw: kernels.choose(kernel, q, k, kw.pop("mask", mask), **{  # noqa: E731
        "has_bias": False, "logit_softcap": None, "dropout": False, **kw})
    with caplog.at_level(logging.INFO, logger="jaxft.models.kernels"):
        assert choose("auto") == "xla"  # the CPU has no fused kernel
        assert choose("cudnn") == "xla" and choose("cudnn") == "xla"
        assert choose("splash") == "xla"  # needs a TPU
    assert sum("cudnn kernel not used (needs a GPU, running on cpu)" in r.message for r in caplog.records) == 1
    monkeypatch.setattr(kernels, "INTERPRET_ON_CPU", True)
    assert choose("splash") == "splash"
    assert choose("splash", mask=mask.dense) == "xla"  # a dense mask: no segment ids
    assert choose("splash", has_bias=True) == "xla"  # ALiBi / T5 relative bias
    assert choose("splash", dropout=True) == "xla"
    q_short, k_short, _ = _qkv(L=96)
    assert kernels.choose("splash", q_short, k_short, causal_segments(_segments(L=96)), has_bias=False,
                          logit_softcap=None, dropout=False) == "xla"
    with pytest.raises(ValueError, match="model.attention_kernel: unknown 'flash'"):
        choose("flash")


def test_auto_takes_the_platforms_kernel_and_skips_splash_for_small_heads(monkeypatch):
    monkeypatch.setattr(kernels, "_warned", set())
    mask = causal_segments(_segments())
    kw = dict(has_bias=False, logit_softcap=None, dropout=False)
    for where, want in (("tpu", "splash"), ("gpu", "xla"), ("cpu", "xla")):  # gpu: fp32 -> no cuDNN
        monkeypatch.setattr(kernels, "platform", lambda where=where: where)
        q, k, _ = _qkv(K=64)
        assert kernels.choose("auto", q, k, mask, **kw) == want
    q_bf16, k_bf16 = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    monkeypatch.setattr(kernels, "platform", lambda: "gpu")
    assert kernels.choose("auto", q_bf16, k_bf16, mask, **kw) == "cudnn"  # the gpu, in bfloat16
    monkeypatch.setattr(kernels, "platform", lambda: "tpu")
    q32, k32, _ = _qkv(K=32)
    assert kernels.choose("auto", q32, k32, mask, **kw) == "xla"  # 32-wide heads: padded to 128 lanes
    assert kernels.choose("splash", q32, k32, mask, **kw) == "splash"  # asked for: taken
