"""HF parity for the decoder-only families: transformers' logits == jaxft's, both ways.

Tiny random float32 models with perturbed norm weights and biases, saved with
``save_pretrained``; compared on a right-padded batch at the non-pad positions.
"""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.config.schema import MeshConfig
from jaxft.interop import load_hf, save_hf
from jaxft.models.registry import build_model
from jaxft.sharding import make_mesh, use_mesh

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

V, L = 96, 12
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.1)
ROPE = dict(SMALL, intermediate_size=64, max_position_embeddings=64)

CASES = {
    "llama_gqa_untied": ("LlamaForCausalLM", dict(ROPE, num_key_value_heads=2, head_dim=16,
                                                  tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "llama_mqa_tied_llama3": ("LlamaForCausalLM", dict(
        ROPE, num_key_value_heads=1, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama_linear_bias": ("LlamaForCausalLM", dict(
        ROPE, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0))),
    "qwen2": ("Qwen2ForCausalLM", dict(ROPE, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2_tied_yarn": ("Qwen2ForCausalLM", dict(
        ROPE, num_key_value_heads=1, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16))),
    "gemma": ("GemmaForCausalLM", dict(ROPE, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
    "gemma2": ("Gemma2ForCausalLM", dict(
        ROPE, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma2_all_global": ("Gemma2ForCausalLM", dict(  # no sliding layer: exported with a usable window
        ROPE, num_key_value_heads=2, head_dim=16, sliding_window=4, layer_types=["full_attention"] * 2)),
    "bloom": ("BloomForCausalLM", dict(SMALL, n_layer=2, n_head=4)),
}


def make_hf_model(arch: str, kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    cls = getattr(transformers, arch)
    config = cls.config_class(**kwargs)
    model = cls._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # move norm weights and biases off their init so (1 + w), biases... matter
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, (3, L))
    mask = (np.arange(L)[None, :] < np.array([[L], [9], [5]])).astype(np.int64)
    return ids * mask, mask


def hf_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


def jaxft_logits(cfg, state, ids, mask, mesh=None) -> np.ndarray:
    cfg = dataclasses.replace(cfg, dtype="float32")
    if mesh is None:
        model = build_model(cfg, rngs=nnx.Rngs(0))
        nnx.update(model, state)
        return np.asarray(model(jnp.asarray(ids), None, jnp.asarray(mask, jnp.int32)))
    with use_mesh(mesh):
        model = build_model(cfg, rngs=nnx.Rngs(0))
        nnx.update(model, state)
        return np.asarray(nnx.jit(lambda m, x, s: m(x, None, s))(model, jnp.asarray(ids),
                                                                  jnp.asarray(mask, jnp.int32)))


def assert_close(ours, ref, mask):
    real = mask.astype(bool)
    diff = float(np.abs(ours - ref)[real].max())
    tol = 1e-4 * max(1.0, float(np.abs(ref[real]).max()))
    assert diff <= tol, f"max |diff| {diff:.3g} > {tol:.3g}"
    return diff


@pytest.mark.parametrize("case", list(CASES))
def test_import_export_parity(case, tmp_path):
    arch, kwargs = CASES[case]
    hf_model = make_hf_model(arch, kwargs)
    shard = {"max_shard_size": "20KB"} if case == "qwen2" else {}
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True, **shard)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ids, mask = batch()
    ref = hf_logits(hf_model, ids, mask)

    cfg, state = load_hf(tmp_path / "hf")
    ours = jaxft_logits(cfg, state, ids, mask)
    diff = assert_close(ours, ref, mask)
    print(f"{case}: import max|diff| = {diff:.2e} (max|logit| {np.abs(ref).max():.2f})")

    save_hf(cfg, state, tmp_path / "out", max_shard_size="30KB" if case == "gemma2" else "2GB")
    if case == "gemma2":
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [arch]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert type(reloaded).__name__ == arch
    diff = assert_close(hf_logits(reloaded, ids, mask), ours, mask)
    print(f"{case}: round trip max|diff| = {diff:.2e}")


def test_switches_matter(tmp_path):
    """The Gemma 2 features are exercised: turning one off changes the logits."""
    arch, kwargs = CASES["gemma2"]
    make_hf_model(arch, kwargs).save_pretrained(tmp_path, safe_serialization=True)
    cfg, state = load_hf(tmp_path)
    assert cfg.sliding_window == 4 and cfg.sliding_window_pattern == 2 and cfg.post_norms
    ids, mask = batch()
    base = jaxft_logits(cfg, state, ids, mask)
    for change in (dict(sliding_window=None), dict(query_pre_attn_scalar=None), dict(attn_logit_softcap=None),
                   dict(final_logit_softcap=None)):
        other = jaxft_logits(dataclasses.replace(cfg, **change), state, ids, mask)
        assert np.abs(other - base)[mask.astype(bool)].max() > 1e-3, change


def test_bf16_checkpoint(tmp_path):
    arch, kwargs = CASES["llama_gqa_untied"]
    hf_model = make_hf_model(arch, kwargs).to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, state = load_hf(tmp_path, dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state))
    ref_w = hf_model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()  # [H*K, D]
    ours = np.asarray(state["layers"][0]["attn"]["q"]["kernel"][...], np.float32)  # [D, H, K]
    np.testing.assert_array_equal(ours.reshape(ours.shape[0], -1).T, ref_w)


def test_sharded_import_on_mesh(tmp_path):
    arch, kwargs = CASES["llama_gqa_untied"]
    hf_model = make_hf_model(arch, kwargs)
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg, state = load_hf(tmp_path, mesh=mesh)
    P = jax.sharding.PartitionSpec
    expected = {
        ("embed", "embedding"): P("tensor", "fsdp"),  # [vocab, embed]
        ("layers", 0, "attn", "q", "kernel"): P("fsdp", "tensor", None),  # [embed, heads, head_dim]
        ("layers", 0, "attn", "k", "kernel"): P("fsdp", "tensor", None),
        ("layers", 1, "attn", "o", "kernel"): P("tensor", None, "fsdp"),  # [heads, head_dim, embed]
        ("layers", 1, "mlp", "down", "kernel"): P("tensor", "fsdp"),  # [mlp, embed]
        ("layers", 0, "mlp", "gate", "kernel"): P("fsdp", "tensor"),
        ("final_norm", "scale"): P(None),
        ("lm_head", "kernel"): P("fsdp", "tensor"),  # [embed, vocab]
    }
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(state)}
    for path, spec in expected.items():
        arr = flat[path]
        assert arr.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), arr.ndim), (path, arr.sharding)
    q = flat[("layers", 0, "attn", "q", "kernel")]
    assert {s.data.shape for s in q.addressable_shards} == {(16, 2, 16)}  # [32/fsdp, 4/tensor, 16]
    ids, mask = batch()
    assert_close(jaxft_logits(cfg, state, ids, mask, mesh=mesh), hf_logits(hf_model, ids, mask), mask)


@pytest.mark.parametrize("layout,stored,spec,stored_spec", [
    (("linear", (32,), (4, 16)), (64, 32), ("fsdp", "tensor", None), ("tensor", "fsdp")),  # q: [H*K, D] -> [D, H, K]
    (("linear", (4, 16), (32,)), (32, 64), ("tensor", None, "fsdp"), ("fsdp", "tensor")),  # o: [D, H*K] -> [H, K, D]
    (("identity",), (128, 32), ("tensor", "fsdp"), ("tensor", "fsdp")),  # embedding
    (("reshape", (4, 16)), (64,), ("tensor", None), ("tensor",)),  # a q bias
    (("linear", (32,), (4, 16)), (64, 32), (None, None, "tensor"), ()),  # head_dim sharded: replicated
])
def test_import_changes_each_layout_on_the_devices_without_communication(layout, stored, spec, stored_spec):
    """Import places each stored tensor so that its layout change (transpose / reshape / cast,
    compiled) needs no collective: the slices a device gets are the ones its output comes from."""
    from jaxft.interop.families.common import identity, linear, reshaped
    from jaxft.interop.placement import layout_fn as _layout_fn, place as _place, stored_sharding as _stored_sharding

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    kind = layout[0]
    t = (linear("w", "ours", *layout[1:]) if kind == "linear" else reshaped("w", "ours", layout[1])
         if kind == "reshape" else identity("w", "ours"))
    stored_np = np.arange(np.prod(stored), dtype=np.float32).reshape(stored).astype(jnp.bfloat16)
    want = t.to_ours(stored_np)[0]
    out_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    fn = _layout_fn(t, stored, "bfloat16", "float32", out_sharding)
    x = _place(stored_np, _stored_sharding(t.layout, out_sharding, want.ndim, len(stored)))
    assert x.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*stored_spec)),
                                       len(stored))
    hlo = fn.lower(x).compile().as_text()
    assert not re.search(r"all-to-all|all-gather|all-reduce|collective-permute", hlo)
    out = fn(x)
    assert out.dtype == jnp.float32 and out.sharding.is_equivalent_to(out_sharding, out.ndim)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want, np.float32))
