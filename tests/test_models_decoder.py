"""Decoder-only models: invariants (causality, packing, sharding, remat, jit) and shapes."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxft.config.schema import MeshConfig, ModelConfig, RopeScalingConfig
from jaxft.models import build_model, param_count, train_flops_per_token
from jaxft.models.layers import REMAT_POLICIES
from jaxft.sharding import batch_sharding, make_mesh, use_mesh

PRESETS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models"
TINY = ["tiny-llama", "tiny-qwen2", "tiny-gemma", "tiny-bloom"]


def preset(name: str, **overrides) -> ModelConfig:
    data = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())["model"]
    if isinstance(data.get("rope_scaling"), dict):
        data["rope_scaling"] = RopeScalingConfig(**data["rope_scaling"])
    return dataclasses.replace(ModelConfig(**data), **overrides)


def params_of(model) -> dict[str, jax.Array]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, k)): v[...] for k, v in flat}


def tokens(cfg: ModelConfig, shape, seed=0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, jnp.int32)


@nnx.jit
def forward(model, *args):
    return model(*args)


_MODELS: dict = {}


def model_for(name: str, **overrides):
    key = (name, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        _MODELS[key] = build_model(preset(name, **overrides), rngs=nnx.Rngs(0))
    return _MODELS[key]


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=8), MeshConfig(data=1, fsdp=8),
                                      MeshConfig(data=2, fsdp=2, tensor=2)], ids=["dp8", "fsdp8", "d2f2t2"])
def test_sharded_forward_matches_unsharded(mesh_cfg):
    cfg = preset("tiny-llama")
    model = model_for("tiny-llama")
    x_BL = tokens(cfg, (8, 16))
    want = forward(model, x_BL)
    graphdef, state = nnx.split(model)
    mesh = make_mesh(mesh_cfg)
    with use_mesh(mesh):
        shardings = nnx.get_named_sharding(state, mesh)
        sharded = nnx.merge(graphdef, jax.device_put(state, shardings))
        got = jax.jit(lambda m, x: m(x))(sharded, jax.device_put(x_BL, batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-bloom"])
def test_sharded_forward_other_families(name):
    model, cfg = model_for(name), preset(name)
    x_BL = tokens(cfg, (4, 12))
    seg_BL = jnp.array([[1] * 5 + [2] * 7, [1] * 12, [1] * 9 + [0] * 3, [0] * 12], jnp.int32)
    pos_BL = jnp.array([list(range(5)) + list(range(7))] + [list(range(12))] * 3, jnp.int32)
    want = forward(model, x_BL, pos_BL, seg_BL)
    graphdef, state = nnx.split(model)
    # MQA (tiny-gemma: 1 kv head) cannot split kv heads over tensor: shard it by fsdp only.
    mesh_cfg = MeshConfig(data=2, fsdp=4) if name == "tiny-gemma" else MeshConfig(data=1, fsdp=2, tensor=2)
    mesh = make_mesh(mesh_cfg, jax.devices()[:8 if name == "tiny-gemma" else 4])
    with use_mesh(mesh):
        sharded = nnx.merge(graphdef, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
        got = jax.jit(lambda m, *a: m(*a))(sharded, x_BL, pos_BL, seg_BL)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_sharded_init_under_mesh():
    cfg = preset("tiny-qwen2")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with use_mesh(mesh):
        abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
        specs = {"/".join(map(str, k)): v.get_value() for k, v in
                 nnx.to_flat_state(nnx.get_partition_spec(nnx.state(abstract, nnx.Param)))}
        state = jax.jit(lambda: nnx.state(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param))()
    assert specs["embed/embedding"] == P("tensor", "fsdp")
    assert specs["layers/0/attn/q/kernel"] == P("fsdp", "tensor", None)
    assert specs["layers/0/attn/k/kernel"] == P("fsdp", "tensor", None)
    assert specs["layers/0/attn/q/bias"] == P("tensor", None)
    assert specs["layers/0/attn/o/kernel"] == P("tensor", None, "fsdp")
    assert specs["layers/0/mlp/gate/kernel"] == P("fsdp", "tensor")
    assert specs["layers/0/mlp/down/kernel"] == P("tensor", "fsdp")
    assert specs["lm_head/kernel"] == P("fsdp", "tensor")
    assert specs["final_norm/scale"] == P(None)
    got = {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(state)}
    for path, spec in specs.items():
        assert got[path].sharding.is_equivalent_to(NamedSharding(mesh, spec), got[path].ndim), path
    # sharded init under jit == eager unsharded init (same rngs)
    for path, value in params_of(model_for("tiny-qwen2")).items():
        np.testing.assert_allclose(np.asarray(got[path]), np.asarray(value), rtol=1e-6, err_msg=path)


# --------------------------------------------------------------------------- causality and packing


def _grads_per_query(model, x_BL, pos_BL=None, seg_BL=None):
    """g[t] = d <r, logits[:, t]> / d embeddings (all positions): [L, B, L, D]."""
    emb_BLD = model.embed_tokens(x_BL)
    logits, vjp = jax.vjp(lambda e: model.decode(e, pos_BL, seg_BL), emb_BLD)
    r = jax.random.normal(jax.random.key(1), logits.shape)

    def one(t):
        return vjp(jnp.zeros_like(logits).at[:, t].set(r[:, t]))[0]

    return jax.jit(jax.vmap(one))(jnp.arange(x_BL.shape[1]))


CAUSAL_CASES = pytest.mark.parametrize(
    "name,overrides", [("tiny-llama", {}), ("tiny-bloom", {}), ("tiny-gemma", {"attn_logit_softcap": 50.0})],
    ids=["llama", "bloom-alibi", "gemma-softcap"])


@CAUSAL_CASES
def test_causality_and_packing_by_gradients(name, overrides):
    """Row 0: one example.  Row 1: [A (5) | B (7)] packed.  Logits at t must not depend on
    tokens after t, nor on tokens of another packed example; they must depend on the rest."""
    cfg = preset(name, **overrides)
    model = model_for(name, **overrides)
    seg_BL = jnp.array([[1] * 12, [1] * 5 + [2] * 7], jnp.int32)
    pos_BL = jnp.array([list(range(12)), list(range(5)) + list(range(7))], jnp.int32)
    g = np.abs(np.asarray(_grads_per_query(model, tokens(cfg, (2, 12)), pos_BL, seg_BL))).sum(-1)
    for t in range(12):
        seen = (np.arange(12) <= t)[None] & (np.asarray(seg_BL) == np.asarray(seg_BL)[:, t:t + 1])
        assert np.all(g[t][~seen] == 0), f"logits at {t} depend on later or other-example tokens"
        assert np.all(g[t][seen] > 0), f"logits at {t} ignore visible tokens"


@CAUSAL_CASES
def test_packing_matches_separate_examples(name, overrides):
    cfg = preset(name, **overrides)
    model = model_for(name, **overrides)
    a, b = tokens(cfg, (1, 5), seed=1), tokens(cfg, (1, 7), seed=2)
    # [A | B | pad x4] and an all-padding row
    row_BL = jnp.concatenate([a, b, jnp.zeros((1, 4), jnp.int32)], axis=1)
    row_BL = jnp.concatenate([row_BL, jnp.zeros_like(row_BL)], axis=0)
    seg_BL = jnp.array([[1] * 5 + [2] * 7 + [0] * 4, [0] * 16], jnp.int32)
    pos_BL = jnp.array([list(range(5)) + list(range(7)) + [0] * 4, [0] * 16], jnp.int32)
    packed = np.asarray(forward(model, row_BL, pos_BL, seg_BL))
    assert np.all(np.isfinite(packed)), "padding produced non-finite logits"
    np.testing.assert_allclose(packed[:1, :5], np.asarray(forward(model, a)), atol=1e-5)
    np.testing.assert_allclose(packed[:1, 5:12], np.asarray(forward(model, b)), atol=1e-5)


# --------------------------------------------------------------------------- families and shapes


EXPECTED_SHAPES = {
    "tiny-llama": {"embed/embedding": (512, 64), "layers/1/attn/q/kernel": (64, 4, 16),
                   "layers/1/attn/k/kernel": (64, 2, 16), "layers/1/attn/o/kernel": (4, 16, 64),
                   "layers/1/mlp/gate/kernel": (64, 128), "layers/1/mlp/down/kernel": (128, 64),
                   "lm_head/kernel": (64, 512), "final_norm/scale": (64,)},
    "tiny-qwen2": {"layers/0/attn/q/bias": (4, 16), "layers/0/attn/v/bias": (2, 16)},
    "tiny-gemma": {"layers/0/attn/q/kernel": (64, 4, 32), "layers/0/attn/k/kernel": (64, 1, 32),
                   "layers/0/attn/o/kernel": (4, 32, 64), "layers/0/mlp/gate/kernel": (64, 128)},
    "tiny-bloom": {"embed_norm/scale": (96,), "embed_norm/bias": (96,), "layers/0/attn_norm/bias": (96,),
                   "layers/0/attn/q/bias": (6, 16), "layers/0/attn/o/bias": (96,),
                   "layers/0/mlp/up/bias": (384,), "layers/0/mlp/down/bias": (96,)},
}
ABSENT = {
    "tiny-llama": ["layers/0/attn/q/bias", "layers/0/attn_norm/bias", "embed_norm/scale"],
    "tiny-qwen2": ["layers/0/attn/o/bias", "layers/0/mlp/up/bias"],
    "tiny-gemma": ["lm_head/kernel"],
    "tiny-bloom": ["lm_head/kernel", "layers/0/mlp/gate/kernel"],
}


@pytest.mark.parametrize("name", TINY)
def test_family_builds_runs_and_counts(name):
    cfg = preset(name)
    model = model_for(name)
    params = params_of(model)
    for path, shape in EXPECTED_SHAPES[name].items():
        assert params[path].shape == shape, path
    for path in ABSENT[name]:
        assert path not in params, path
    assert sum(v.size for v in params.values()) == param_count(cfg)
    if cfg.norm_plus_one:
        assert np.all(np.asarray(params["final_norm/scale"]) == 0)
    logits = forward(model, tokens(cfg, (2, 8)))
    assert logits.shape == (2, 8, cfg.vocab_size) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


# Known totals from the HF checkpoints (model.num_parameters()).
@pytest.mark.parametrize("name,count", [("llama-3-8b", 8_030_261_248), ("llama-3.1-8b", 8_030_261_248),
                                        ("qwen2-7b", 7_615_616_512), ("gemma-7b", 8_537_680_896),
                                        ("bloom-7b1", 7_069_016_064)])
def test_real_preset_param_counts(name, count):
    cfg = preset(name)
    assert param_count(cfg) == count
    assert train_flops_per_token(cfg, 4096) > 6 * (count - cfg.vocab_size * cfg.d_model)


def test_flops_formula():
    cfg = preset("tiny-llama")
    D, H, G, K, F, V, NL = 64, 4, 2, 16, 128, 512, 2
    matmul = NL * (D * H * K * 2 + 2 * D * G * K + 3 * D * F) + D * V
    assert train_flops_per_token(cfg, 32) == 6 * matmul + 12 * NL * 32 * H * K


def test_gqa_equals_mha_with_repeated_kv():
    """GQA/MQA is MHA whose k/v heads are shared by groups: repeat them and compare."""
    for kv in (2, 1):
        gqa = model_for("tiny-llama", n_kv_heads=kv)
        mha = build_model(preset("tiny-llama", n_kv_heads=4), rngs=nnx.Rngs(0))
        state = nnx.state(gqa, nnx.Param)
        for layer in state["layers"].values():
            for name in ("k", "v"):
                kernel = layer["attn"][name]["kernel"]
                kernel.set_value(jnp.repeat(kernel[...], 4 // kv, axis=1))
        nnx.update(mha, state)
        x_BL = tokens(preset("tiny-llama"), (2, 8))
        np.testing.assert_allclose(np.asarray(forward(gqa, x_BL)), np.asarray(forward(mha, x_BL)), atol=1e-5)


def test_rope_scaling_variants():
    x_BL = tokens(preset("tiny-llama"), (2, 8))
    base = model_for("tiny-llama")

    def with_scaling(scaling):
        other = build_model(preset("tiny-llama", rope_scaling=scaling), rngs=nnx.Rngs(0))
        nnx.update(other, nnx.state(base, nnx.Param))
        return other

    # factor 1 is no scaling, for every type (yarn's attention factor is 1 too)
    for kind in ("linear", "llama3", "yarn"):
        same = with_scaling(RopeScalingConfig(type=kind, factor=1.0, original_max_position=64))
        np.testing.assert_array_equal(np.asarray(forward(same, x_BL)), np.asarray(forward(base, x_BL)),
                                      err_msg=kind)
    # linear factor 2 at positions 2p == no scaling at positions p
    pos_BL = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    lin = with_scaling(RopeScalingConfig(type="linear", factor=2.0))
    np.testing.assert_allclose(np.asarray(forward(lin, x_BL, 2 * pos_BL)),
                               np.asarray(forward(base, x_BL, pos_BL)), atol=1e-5)
    assert not np.allclose(np.asarray(forward(lin, x_BL)), np.asarray(forward(base, x_BL)), atol=1e-5)


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match=r"model\.family.*'nope'.*decoder"):
        build_model(ModelConfig(family="nope"), rngs=nnx.Rngs(0))


def test_final_logit_softcap_bounds_logits():
    cfg = preset("tiny-gemma", final_logit_softcap=0.05, attn_logit_softcap=1.0)
    model = model_for("tiny-gemma", final_logit_softcap=0.05, attn_logit_softcap=1.0)
    logits = forward(model, tokens(cfg, (2, 8)))
    assert np.all(np.abs(np.asarray(logits)) <= 0.05)


def test_bfloat16_compute_float32_params_and_logits():
    cfg = preset("tiny-llama", dtype="bfloat16")
    model = model_for("tiny-llama", dtype="bfloat16")
    assert all(v.dtype == jnp.float32 for v in params_of(model).values())
    logits = forward(model, tokens(cfg, (2, 8)))
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))
    want = forward(model_for("tiny-llama"), tokens(cfg, (2, 8)))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=0.05)
    bf16 = build_model(preset("tiny-llama", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert all(v.dtype == jnp.bfloat16 for v in params_of(bf16).values())


# --------------------------------------------------------------------------- remat and jit


def _loss_grads(model, x_BL):
    def loss(m):
        logits = m(x_BL[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), x_BL[:, 1:, None], -1))
    return jax.jit(nnx.grad(loss))(model)


def test_remat_policies_give_identical_gradients():
    x_BL = tokens(preset("tiny-llama"), (2, 9))
    base = model_for("tiny-llama")
    want = params_of_state(_loss_grads(base, x_BL))
    for policy in sorted(REMAT_POLICIES):
        m = build_model(preset("tiny-llama", remat=policy), rngs=nnx.Rngs(0))
        got = params_of_state(_loss_grads(m, x_BL))
        for path in want:
            np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=1e-7,
                                       err_msg=f"{policy} {path}")


def params_of_state(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bloom"])
def test_jit_matches_eager(name):
    cfg, model = preset(name), model_for(name)
    x_BL = tokens(cfg, (2, 8))
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(model, x_BL)),
                               np.asarray(model(x_BL)), atol=1e-5)
