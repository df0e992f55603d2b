"""mBART / NLLB encoder-decoder: HF parity, sharding, causality, packing, parameter counts."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxft.config.schema import MeshConfig, ModelConfig
from jaxft.models import build_model, param_count, train_flops_per_token
from jaxft.sharding import batch_sharding, make_mesh, use_mesh

PRESETS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models"
TINY = ["tiny-mbart", "tiny-nllb"]
PAD = 1  # HF pad_token_id (mBART, M2M100, NLLB)


def preset(name: str, **overrides) -> ModelConfig:
    data = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())["model"]
    return dataclasses.replace(ModelConfig(**data), **overrides)


def params_of(model) -> dict[str, jax.Array]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, k)): v[...] for k, v in flat}


def tokens(cfg: ModelConfig, shape, seed=0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 3, cfg.vocab_size, jnp.int32)


@nnx.jit
def forward(model, *args):
    return model(*args)


_MODELS: dict = {}


def model_for(name: str, **overrides):
    key = (name, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        _MODELS[key] = build_model(preset(name, **overrides), rngs=nnx.Rngs(0))
    return _MODELS[key]


def packed_batch(cfg: ModelConfig):
    """Row 0: one example on both sides.  Row 1: [A | B | pad] packed on both sides."""
    enc_seg = jnp.array([[1] * 12, [1] * 5 + [2] * 6 + [0] * 1], jnp.int32)
    enc_pos = jnp.array([list(range(12)), list(range(5)) + list(range(6)) + [0]], jnp.int32)
    dec_seg = jnp.array([[1] * 10, [1] * 4 + [2] * 5 + [0] * 1], jnp.int32)
    dec_pos = jnp.array([list(range(10)), list(range(4)) + list(range(5)) + [0]], jnp.int32)
    return tokens(cfg, (2, 12), 1), enc_pos, enc_seg, tokens(cfg, (2, 10), 2), dec_pos, dec_seg


# --------------------------------------------------------------------------- HF parity


def _hf_model(name: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=512, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                  max_position_embeddings=64, scale_embedding=True, pad_token_id=PAD, bos_token_id=0,
                  eos_token_id=2, decoder_start_token_id=2, dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    if name == "tiny-mbart":
        hf = transformers.MBartForConditionalGeneration(
            transformers.MBartConfig(activation_function="gelu", **common))
    else:
        common.update(encoder_layers=3)
        hf = transformers.M2M100ForConditionalGeneration(
            transformers.M2M100Config(activation_function="relu", **common))
    hf.eval()
    with torch.no_grad():  # random biases and norm parameters, so every weight matters;
        for n, p in hf.named_parameters():  # large fc1 inputs tell erf GELU from tanh GELU
            p.add_(torch.randn_like(p) * (0.3 if n.endswith("fc1.weight") else 0.05))
    return hf


def _hf_to_ours(hf, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Test-only mapping of HF MBart/M2M100 weights onto our parameter paths."""
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    D, H, K = cfg.d_model, cfg.n_heads, cfg.dim_per_head
    out = {"embed/embedding": sd["model.shared.weight"]}

    def norm(src, dst):
        out[f"{dst}/scale"], out[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def attn(src, dst):
        for n in "qkv":
            out[f"{dst}/{n}/kernel"] = sd[f"{src}.{n}_proj.weight"].T.reshape(D, H, K)
            out[f"{dst}/{n}/bias"] = sd[f"{src}.{n}_proj.bias"].reshape(H, K)
        out[f"{dst}/o/kernel"] = sd[f"{src}.out_proj.weight"].T.reshape(H, K, D)
        out[f"{dst}/o/bias"] = sd[f"{src}.out_proj.bias"]

    n_dec = cfg.n_decoder_layers or cfg.n_layers
    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", n_dec)):
        s = f"model.{stack}"
        if cfg.position == "learned":
            out[f"{stack}/pos_embed/embedding"] = sd[f"{s}.embed_positions.weight"]
        if cfg.embed_norm:
            norm(f"{s}.layernorm_embedding", f"{stack}/embed_norm")
        norm(f"{s}.layer_norm", f"{stack}/final_norm")
        for i in range(n_layers):
            src, dst = f"{s}.layers.{i}", f"{stack}/layers/{i}"
            norm(f"{src}.self_attn_layer_norm", f"{dst}/attn_norm")
            attn(f"{src}.self_attn", f"{dst}/attn")
            if stack == "decoder":
                norm(f"{src}.encoder_attn_layer_norm", f"{dst}/cross_norm")
                attn(f"{src}.encoder_attn", f"{dst}/cross")
            norm(f"{src}.final_layer_norm", f"{dst}/mlp_norm")
            out[f"{dst}/mlp/up/kernel"] = sd[f"{src}.fc1.weight"].T
            out[f"{dst}/mlp/up/bias"] = sd[f"{src}.fc1.bias"]
            out[f"{dst}/mlp/down/kernel"] = sd[f"{src}.fc2.weight"].T
            out[f"{dst}/mlp/down/bias"] = sd[f"{src}.fc2.bias"]
    return out


def _load(model, weights: dict[str, np.ndarray]) -> None:
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    paths = {"/".join(map(str, k)) for k, _ in flat}
    assert paths == set(weights), (paths ^ set(weights))
    for k, var in flat:
        path = "/".join(map(str, k))
        assert var[...].shape == weights[path].shape, path
        var.set_value(jnp.asarray(weights[path]))
    nnx.update(model, state)


@pytest.mark.parametrize("name", TINY)
def test_hf_parity(name):
    torch = pytest.importorskip("torch")
    cfg = preset(name)
    hf = _hf_model(name)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    _load(model, _hf_to_ours(hf, cfg))
    # Right-padded source and target; real tokens never equal PAD (M2M100 positions skip pads).
    rng = np.random.default_rng(0)
    enc_len, dec_len = np.array([10, 7, 4]), np.array([8, 5, 3])
    enc_mask = np.arange(10)[None] < enc_len[:, None]
    dec_mask = np.arange(8)[None] < dec_len[:, None]
    enc_ids = np.where(enc_mask, rng.integers(3, cfg.vocab_size, (3, 10)), PAD)
    dec_ids = np.where(dec_mask, rng.integers(3, cfg.vocab_size, (3, 8)), PAD)
    dec_ids[:, 0] = cfg.decoder_start_id
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(enc_ids), attention_mask=torch.tensor(enc_mask.astype(np.int64)),
                  decoder_input_ids=torch.tensor(dec_ids),
                  decoder_attention_mask=torch.tensor(dec_mask.astype(np.int64))).logits.numpy()
    pos = lambda n: np.broadcast_to(np.arange(n, dtype=np.int32), (3, n))  # noqa: E731
    got = np.asarray(forward(model, jnp.asarray(enc_ids, jnp.int32), pos(10), enc_mask.astype(np.int32),
                             jnp.asarray(dec_ids, jnp.int32), pos(8), dec_mask.astype(np.int32)))
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got[dec_mask], want[dec_mask], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("name,mesh_cfg", [("tiny-mbart", MeshConfig(data=8)),
                                           ("tiny-mbart", MeshConfig(data=2, fsdp=2, tensor=2)),
                                           ("tiny-nllb", MeshConfig(data=2, fsdp=2, tensor=2))],
                         ids=["mbart-dp8", "mbart-d2f2t2", "nllb-d2f2t2"])
def test_sharded_forward_matches_unsharded(name, mesh_cfg):
    cfg, model = preset(name), model_for(name)
    enc, enc_pos, enc_seg, dec, dec_pos, dec_seg = packed_batch(cfg)
    args = [jnp.tile(a, (4, 1)) for a in (enc, enc_pos, enc_seg, dec, dec_pos, dec_seg)]  # batch 8
    want = forward(model, *args)
    graphdef, state = nnx.split(model)
    mesh = make_mesh(mesh_cfg)
    with use_mesh(mesh):
        sharded = nnx.merge(graphdef, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
        args = [jax.device_put(a, batch_sharding(mesh)) for a in args]
        got = jax.jit(lambda m, *a: m(*a))(sharded, *args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_sharded_init_specs():
    cfg = preset("tiny-mbart")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with use_mesh(mesh):
        abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
        specs = {"/".join(map(str, k)): v.get_value() for k, v in
                 nnx.to_flat_state(nnx.get_partition_spec(nnx.state(abstract, nnx.Param)))}
    P = jax.sharding.PartitionSpec
    assert specs["embed/embedding"] == P("tensor", "fsdp")
    assert specs["encoder/pos_embed/embedding"] == P(None, "fsdp")
    assert specs["decoder/layers/0/cross/q/kernel"] == P("fsdp", "tensor", None)
    assert specs["decoder/layers/0/cross/k/bias"] == P("tensor", None)
    assert specs["encoder/layers/0/attn/o/kernel"] == P("tensor", None, "fsdp")
    assert specs["encoder/layers/0/mlp/up/kernel"] == P("fsdp", "tensor")
    assert specs["decoder/final_norm/scale"] == P(None)


# --------------------------------------------------------------------------- causality and packing


def _grads_per_query(model, enc, enc_pos, enc_seg, dec, dec_pos, dec_seg):
    """g[t] = d <r, logits[:, t]> / d (encoder, decoder) token embeddings: [L, B, S|L, D] each."""
    enc_tok, dec_tok = model.embed_tokens(enc), model.embed_tokens(dec)

    def f(e, d):
        enc_BSD = model.encode_embedded(e, enc_pos, enc_seg)
        return model.decode_embedded(d, dec_pos, dec_seg, enc_BSD, enc_seg)

    logits, vjp = jax.vjp(f, enc_tok, dec_tok)
    r = jax.random.normal(jax.random.key(1), logits.shape)
    one = lambda t: vjp(jnp.zeros_like(logits).at[:, t].set(r[:, t]))  # noqa: E731
    return jax.jit(jax.vmap(one))(jnp.arange(dec.shape[1]))


@pytest.mark.parametrize("name", TINY)
def test_causality_bidirectionality_and_packing_by_gradients(name):
    """Decoder logits at t depend on decoder tokens <= t of their own segment only, and on
    every encoder token (before and after any position) of their own segment only."""
    cfg, model = preset(name), model_for(name)
    enc, enc_pos, enc_seg, dec, dec_pos, dec_seg = packed_batch(cfg)
    g_enc, g_dec = _grads_per_query(model, enc, enc_pos, enc_seg, dec, dec_pos, dec_seg)
    g_enc, g_dec = np.abs(np.asarray(g_enc)).sum(-1), np.abs(np.asarray(g_dec)).sum(-1)
    es, ds = np.asarray(enc_seg), np.asarray(dec_seg)
    L = dec.shape[1]
    for t in range(L):
        for b in range(2):
            s = ds[b, t]
            if s == 0:  # padding query: zero loss weight, not constrained
                continue
            seen_dec = (np.arange(L) <= t) & (ds[b] == s)
            assert np.all(g_dec[t, b][~seen_dec] == 0), f"row {b}, {t}: later/other dec tokens"
            assert np.all(g_dec[t, b][seen_dec] > 0), f"row {b}: logits at {t} ignore visible decoder tokens"
            seen_enc = es[b] == s
            assert np.all(g_enc[t, b][~seen_enc] == 0), f"row {b}: logits at {t} see another segment's source"
            assert np.all(g_enc[t, b][seen_enc] > 0), f"row {b}: logits at {t} ignore part of the source"


@pytest.mark.parametrize("name", TINY)
def test_encoder_is_bidirectional_within_segments(name):
    cfg, model = preset(name), model_for(name)
    enc, enc_pos, enc_seg, *_ = packed_batch(cfg)
    tok = model.embed_tokens(enc)
    out, vjp = jax.vjp(lambda e: model.encode_embedded(e, enc_pos, enc_seg), tok)
    r = jax.random.normal(jax.random.key(2), out.shape)
    g = jax.vmap(lambda i: vjp(jnp.zeros_like(out).at[:, i].set(r[:, i]))[0])(jnp.arange(enc.shape[1]))
    g = np.abs(np.asarray(g)).sum(-1)  # [S, B, S]
    es = np.asarray(enc_seg)
    for i in range(enc.shape[1]):
        same = es == es[:, i:i + 1]
        assert np.all(g[i][same] > 0) and np.all(g[i][~same] == 0), f"encoder position {i}"


@pytest.mark.parametrize("name", TINY)
def test_packing_matches_separate_examples(name):
    cfg, model = preset(name), model_for(name)
    enc, enc_pos, enc_seg, dec, dec_pos, dec_seg = packed_batch(cfg)
    # second row packed [A | B | pad]; add an all-padding row
    args = [a[1:] for a in (enc, enc_pos, enc_seg, dec, dec_pos, dec_seg)]
    args = [jnp.concatenate([a, jnp.zeros_like(a)], axis=0) for a in args]
    packed = np.asarray(forward(model, *args))
    assert np.all(np.isfinite(packed)), "padding produced non-finite logits"
    enc_a, enc_b, dec_a, dec_b = enc[1:, :5], enc[1:, 5:11], dec[1:, :4], dec[1:, 4:9]
    alone_a = np.asarray(forward(model, enc_a, None, None, dec_a, None, None))
    alone_b = np.asarray(forward(model, enc_b, None, None, dec_b, None, None))
    np.testing.assert_allclose(packed[:1, :4], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed[:1, 4:9], alone_b, atol=1e-5)
    # encode/decode split == full call
    enc_BSD = model.encode(enc_b, None, None)
    np.testing.assert_allclose(np.asarray(model.decode(dec_b, None, None, enc_BSD, None)), alone_b, atol=1e-5)


def test_sinusoidal_positions_match_hf_table():
    torch = pytest.importorskip("torch")
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding

    from jaxft.models.bart import sinusoidal_positions
    for dim in (64, 33):
        table = M2M100SinusoidalPositionalEmbedding(100, dim, padding_idx=PAD).weights.numpy()
        got = np.asarray(sinusoidal_positions(jnp.arange(90)[None], dim, PAD + 1))[0]
        np.testing.assert_allclose(got, table[PAD + 1:PAD + 91], atol=1e-5)
    del torch


# --------------------------------------------------------------------------- shapes and counts


EXPECTED_SHAPES = {
    "tiny-mbart": {"embed/embedding": (512, 64), "encoder/pos_embed/embedding": (66, 64),
                   "decoder/pos_embed/embedding": (66, 64), "encoder/embed_norm/bias": (64,),
                   "encoder/layers/1/attn/q/kernel": (64, 4, 16), "encoder/layers/1/attn/q/bias": (4, 16),
                   "encoder/layers/1/attn/o/kernel": (4, 16, 64), "encoder/layers/1/attn/o/bias": (64,),
                   "decoder/layers/1/cross/k/kernel": (64, 4, 16), "decoder/layers/1/cross_norm/scale": (64,),
                   "decoder/layers/1/mlp/up/kernel": (64, 128), "decoder/layers/1/mlp/down/bias": (64,),
                   "decoder/final_norm/bias": (64,)},
    "tiny-nllb": {"encoder/layers/2/mlp/up/bias": (128,), "decoder/layers/1/cross/v/bias": (4, 16)},
}
ABSENT = {
    "tiny-mbart": ["lm_head/kernel", "encoder/layers/0/mlp/gate/kernel"],
    "tiny-nllb": ["lm_head/kernel", "encoder/pos_embed/embedding", "encoder/embed_norm/scale",
                  "decoder/layers/2/attn/q/kernel"],
}


@pytest.mark.parametrize("name", TINY)
def test_family_builds_runs_and_counts(name):
    cfg, model = preset(name), model_for(name)
    params = params_of(model)
    for path, shape in EXPECTED_SHAPES[name].items():
        assert params[path].shape == shape, path
    for path in ABSENT[name]:
        assert path not in params, path
    assert sum(v.size for v in params.values()) == param_count(cfg)
    untied = build_model(preset(name, tie_embeddings=False), rngs=nnx.Rngs(0))
    assert params_of(untied)["lm_head/kernel"].shape == (64, 512)
    assert sum(v.size for v in params_of(untied).values()) == param_count(preset(name, tie_embeddings=False))


# Known totals from the HF checkpoints (model.num_parameters(); tied embeddings counted once).
@pytest.mark.parametrize("name,count", [("mbart-large-50", 610_879_488),
                                        ("nllb-200-distilled-600M", 615_073_792),
                                        ("nllb-200-distilled-1.3B", 1_370_638_336),
                                        ("nllb-200-1.3B", 1_370_638_336), ("nllb-200-3.3B", 3_344_863_232),
                                        ("m2m100_418M", 483_905_536)])
def test_real_preset_param_counts(name, count):
    cfg = preset(name)
    assert param_count(cfg) == count
    assert train_flops_per_token(cfg, 512) > 6 * (count - cfg.vocab_size * cfg.d_model)


def test_flops_formula():
    D, H, K, F, V, NE, ND, S = 64, 4, 16, 128, 512, 3, 2, 32
    matmul = NE * (4 * D * H * K + 2 * D * F) + ND * (8 * D * H * K + 2 * D * F) + D * V
    assert train_flops_per_token(preset("tiny-nllb"), S) == 6 * matmul + 12 * S * H * K * (NE + 2 * ND)


def test_config_errors():
    with pytest.raises(ValueError, match=r"model\.position"):
        build_model(preset("tiny-mbart", position="rope"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"model\.n_kv_heads"):
        build_model(preset("tiny-mbart", n_kv_heads=2), rngs=nnx.Rngs(0))


def test_remat_gives_identical_gradients():
    cfg = preset("tiny-nllb")
    enc, enc_pos, enc_seg, dec, dec_pos, dec_seg = packed_batch(cfg)

    def grads(m):
        def loss(m):
            return jnp.mean(m(enc, enc_pos, enc_seg, dec, dec_pos, dec_seg)[..., :8] ** 2)
        return {"/".join(map(str, k)): np.asarray(v[...])
                for k, v in nnx.to_flat_state(jax.jit(nnx.grad(loss))(m))}

    small = dict(n_layers=1, n_decoder_layers=1)
    want = grads(build_model(preset("tiny-nllb", **small), rngs=nnx.Rngs(0)))
    got = grads(build_model(preset("tiny-nllb", remat="full", **small), rngs=nnx.Rngs(0)))
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-7, err_msg=path)
