"""T5 / mT5 / umT5: HF parity, relative buckets, sharding, causality and packing, remat, counts."""

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

from jaxft.config.schema import MeshConfig, ModelConfig
from jaxft.models import build_model, param_count, train_flops_per_token
from jaxft.models.layers import REMAT_POLICIES
from jaxft.models.t5 import relative_position_bucket
from jaxft.sharding import batch_sharding, make_mesh, use_mesh

PRESETS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models"
TINY = ["tiny-t5", "tiny-mt5", "tiny-umt5"]


def preset(name: str, **overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig(**yaml.safe_load((PRESETS / f"{name}.yaml").read_text())["model"]),
                               **overrides)


_MODELS: dict = {}


def model_for(name: str, **overrides):
    key = (name, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        _MODELS[key] = build_model(preset(name, **overrides), rngs=nnx.Rngs(0))
    return _MODELS[key]


def flat(state) -> dict[str, jax.Array]:
    return {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(state)}


def tokens(cfg: ModelConfig, shape, seed=0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 2, cfg.vocab_size, jnp.int32)


@nnx.jit
def forward(model, *args):
    return model(*args)


def seg_pos(lengths: list[int], total: int) -> tuple[list[int], list[int]]:
    """Segment ids 1..n for the given lengths, then padding (0) up to ``total``; positions."""
    seg = [i + 1 for i, n in enumerate(lengths) for _ in range(n)]
    pos = [p for n in lengths for p in range(n)]
    pad = total - len(seg)
    return seg + [0] * pad, pos + [0] * pad


# --------------------------------------------------------------------------- HF parity


def _hf_model(name: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = preset(name)
    umt5 = cfg.relative_bias_per_layer
    config_cls = transformers.UMT5Config if umt5 else transformers.T5Config
    model_cls = transformers.UMT5ForConditionalGeneration if umt5 else transformers.T5ForConditionalGeneration
    hf_cfg = config_cls(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.dim_per_head, d_ff=cfg.mlp_dim,
        num_layers=cfg.n_layers, num_decoder_layers=cfg.n_decoder_layers, num_heads=cfg.n_heads,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance, dropout_rate=0.0,
        layer_norm_epsilon=cfg.norm_eps, initializer_factor=1.0,
        feed_forward_proj="relu" if cfg.activation == "relu" else "gated-gelu",
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="eager")
    torch.manual_seed(0)
    hf = model_cls(hf_cfg).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():  # norms start at 1: perturb them so they are tested
            if "layer_norm" in pname:
                p.add_(0.2 * torch.randn_like(p))
        if not cfg.tie_embeddings:
            # transformers 5 always ties lm_head to `shared` (and then skips the d_model**-0.5
            # scaling when tie_word_embeddings=False); real v1.1/mT5/umT5 heads are separate.
            hf.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model) * cfg.d_model ** -0.5)
    return cfg, hf


def _hf_to_jaxft(cfg: ModelConfig, hf) -> dict[tuple, np.ndarray]:
    """HF T5 state dict -> our flat parameter paths (the test's own small mapping)."""
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    D, H, K = cfg.d_model, cfg.n_heads, cfg.dim_per_head
    out = {"embed/embedding": sd["shared.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head/kernel"] = sd["lm_head.weight"].T

    def attn(dst, src):
        for n in "qkv":
            out[f"{dst}/{n}/kernel"] = sd[f"{src}.{n}.weight"].T.reshape(D, H, K)
        out[f"{dst}/o/kernel"] = sd[f"{src}.o.weight"].T.reshape(H, K, D)
        if f"{src}.relative_attention_bias.weight" in sd:
            table = sd[f"{src}.relative_attention_bias.weight"]
            if cfg.relative_bias_per_layer:
                out[f"{dst}/rel_bias/embedding"] = table
            else:  # HF keeps the shared table in block 0
                out[dst.split("/")[0] + "/rel_bias/embedding"] = table

    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers or cfg.n_layers)):
        for i in range(n_layers):
            src, dst = f"{stack}.block.{i}.layer", f"{stack}/layers/{i}"
            attn(f"{dst}/attn", f"{src}.0.SelfAttention")
            out[f"{dst}/attn_norm/scale"] = sd[f"{src}.0.layer_norm.weight"]
            m = 1
            if stack == "decoder":
                attn(f"{dst}/cross", f"{src}.1.EncDecAttention")
                out[f"{dst}/cross_norm/scale"] = sd[f"{src}.1.layer_norm.weight"]
                m = 2
            out[f"{dst}/mlp_norm/scale"] = sd[f"{src}.{m}.layer_norm.weight"]
            ff = f"{src}.{m}.DenseReluDense"
            if cfg.activation == "relu":
                out[f"{dst}/mlp/up/kernel"] = sd[f"{ff}.wi.weight"].T
            else:
                out[f"{dst}/mlp/gate/kernel"] = sd[f"{ff}.wi_0.weight"].T
                out[f"{dst}/mlp/up/kernel"] = sd[f"{ff}.wi_1.weight"].T
            out[f"{dst}/mlp/down/kernel"] = sd[f"{ff}.wo.weight"].T
        out[f"{stack}/final_norm/scale"] = sd[f"{stack}.final_layer_norm.weight"]
    return out


@pytest.mark.parametrize("name", TINY, ids=["t5-v1.0-relu-tied", "mt5-gated-untied", "umt5-per-layer"])
def test_logits_match_transformers(name):
    import torch
    cfg, hf = _hf_model(name)
    model = build_model(cfg, rngs=nnx.Rngs(1))
    state = nnx.state(model, nnx.Param)
    ours = flat(state)
    weights = _hf_to_jaxft(cfg, hf)
    assert set(weights) == set(ours), set(weights) ^ set(ours)
    for path, value in nnx.to_flat_state(state):
        key = "/".join(map(str, path))
        assert weights[key].shape == value.shape, key
        value.set_value(jnp.asarray(weights[key]))
    nnx.update(model, state)

    # Right-padded batch, lengths long enough to reach the log-spaced buckets.
    S, L = 20, 18
    enc_len, dec_len = [20, 13, 7], [18, 9, 5]
    enc_mask = np.array([[1] * n + [0] * (S - n) for n in enc_len], np.int64)
    dec_mask = np.array([[1] * n + [0] * (L - n) for n in dec_len], np.int64)
    enc_ids = np.asarray(tokens(cfg, (3, S), seed=3)) * enc_mask
    dec_ids = np.asarray(tokens(cfg, (3, L), seed=4)) * dec_mask
    dec_ids[:, 0] = 0  # decoder_start_id
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(enc_ids), attention_mask=torch.tensor(enc_mask),
                  decoder_input_ids=torch.tensor(dec_ids),
                  decoder_attention_mask=torch.tensor(dec_mask)).logits.numpy()
    pos = lambda n: jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (3, n))  # noqa: E731
    got = np.asarray(forward(model, jnp.asarray(enc_ids, jnp.int32), pos(S), jnp.asarray(enc_mask, jnp.int32),
                             jnp.asarray(dec_ids, jnp.int32), pos(L), jnp.asarray(dec_mask, jnp.int32)))
    real = dec_mask.astype(bool)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- relative buckets


# (relative = key_pos - query_pos, bidirectional, buckets, max_distance) -> bucket, by hand:
# bidirectional: n = buckets // 2 per sign (keys after the query add n), max_exact = n // 2;
# causal: max_exact = buckets // 2, rel > 0 -> 0.  Beyond max_exact:
# max_exact + floor(ln(d / max_exact) / ln(max_distance / max_exact) * (n - max_exact)), capped.
BUCKET_CASES = [
    (0, True, 32, 128, 0), (-1, True, 32, 128, 1), (1, True, 32, 128, 17),
    (-7, True, 32, 128, 7), (-8, True, 32, 128, 8),       # ln(1) = 0
    (-12, True, 32, 128, 9),     # 8 + floor(ln 1.5 / ln 16 * 8 = 1.17)
    (-20, True, 32, 128, 10),    # 8 + floor(ln 2.5 / ln 16 * 8 = 2.64)
    (20, True, 32, 128, 26),     # 16 + 10
    (-127, True, 32, 128, 15),   # 8 + floor(7.98)
    (-128, True, 32, 128, 15), (-1000, True, 32, 128, 15), (1000, True, 32, 128, 31),
    (5, False, 32, 128, 0), (0, False, 32, 128, 0), (-5, False, 32, 128, 5),
    (-15, False, 32, 128, 15), (-16, False, 32, 128, 16),
    (-20, False, 32, 128, 17),   # 16 + floor(ln 1.25 / ln 8 * 16 = 1.72)
    (-64, False, 32, 128, 26),   # 16 + floor(ln 4 / ln 8 * 16 = 10.67)
    (-127, False, 32, 128, 31), (-500, False, 32, 128, 31),
    (3, True, 8, 20, 6),         # 4 + 2 + floor(ln 1.5 / ln 10 * 2 = 0.35)
    (-10, True, 8, 20, 3),       # 2 + floor(ln 5 / ln 10 * 2 = 1.40)
    (-19, True, 8, 20, 3), (25, True, 8, 20, 7),
]


@pytest.mark.parametrize("rel,bidirectional,buckets,max_distance,want", BUCKET_CASES)
def test_relative_position_bucket_by_hand(rel, bidirectional, buckets, max_distance, want):
    got = relative_position_bucket(jnp.array(rel), bidirectional=bidirectional, num_buckets=buckets,
                                   max_distance=max_distance)
    assert int(got) == want


def test_relative_position_bucket_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = np.arange(-300, 301)
    for bidirectional in (True, False):
        for buckets, max_distance in ((32, 128), (8, 16), (16, 32), (64, 256)):
            want = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidirectional,
                                                         num_buckets=buckets, max_distance=max_distance)
            got = relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                           num_buckets=buckets, max_distance=max_distance)
            np.testing.assert_array_equal(np.asarray(got), want.numpy(), err_msg=f"{bidirectional} {buckets}")


# --------------------------------------------------------------------------- sharding


def _packed_batch(cfg: ModelConfig, B: int):
    S, L = 16, 12
    rows = [([16], [12]), ([5, 8], [4, 6]), ([9], [7]), ([3, 4, 5], [2, 3, 4])]
    enc_seg, enc_pos, dec_seg, dec_pos = [], [], [], []
    for i in range(B):
        e, d = rows[i % len(rows)]
        for (seg, pos), n, lens in (((enc_seg, enc_pos), S, e), ((dec_seg, dec_pos), L, d)):
            s, p = seg_pos(lens, n)
            seg.append(s)
            pos.append(p)
    a = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return (tokens(cfg, (B, S), 5), a(enc_pos), a(enc_seg), tokens(cfg, (B, L), 6), a(dec_pos), a(dec_seg))


@pytest.mark.parametrize("name,mesh_cfg", [("tiny-umt5", MeshConfig(data=8)),
                                           ("tiny-t5", MeshConfig(data=2, fsdp=2, tensor=2))],
                         ids=["umt5-dp8", "t5-d2f2t2"])
def test_sharded_forward_matches_unsharded(name, mesh_cfg):
    cfg, model = preset(name), model_for(name)
    batch = _packed_batch(cfg, 8)
    want = forward(model, *batch)
    graphdef, state = nnx.split(model)
    mesh = make_mesh(mesh_cfg)
    with use_mesh(mesh):
        sharded = nnx.merge(graphdef, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
        batch = [jax.device_put(x, batch_sharding(mesh)) for x in batch]
        got = jax.jit(lambda m, *a: m(*a))(sharded, *batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_sharded_init_specs():
    small = dict(n_layers=2, n_decoder_layers=1)
    cfg = preset("tiny-umt5", **small)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with use_mesh(mesh):
        abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
        specs = {"/".join(map(str, k)): v.get_value() for k, v in
                 nnx.to_flat_state(nnx.get_partition_spec(nnx.state(abstract, nnx.Param)))}
        state = jax.jit(lambda: nnx.state(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param))()
    assert specs["embed/embedding"] == P("tensor", "fsdp")
    assert specs["encoder/layers/0/attn/q/kernel"] == P("fsdp", "tensor", None)
    assert specs["decoder/layers/0/cross/o/kernel"] == P("tensor", None, "fsdp")
    assert specs["encoder/layers/1/attn/rel_bias/embedding"] == P(None, "tensor")
    assert specs["decoder/layers/0/mlp/gate/kernel"] == P("fsdp", "tensor")
    assert specs["decoder/layers/0/mlp/down/kernel"] == P("tensor", "fsdp")
    assert specs["lm_head/kernel"] == P("fsdp", "tensor")
    assert specs["decoder/final_norm/scale"] == P(None)
    got = flat(state)
    for path, spec in specs.items():
        assert got[path].sharding.is_equivalent_to(NamedSharding(mesh, spec), got[path].ndim), path
    for path, value in flat(nnx.state(model_for("tiny-umt5", **small), nnx.Param)).items():
        np.testing.assert_allclose(np.asarray(got[path]), np.asarray(value), rtol=1e-6, err_msg=path)


# --------------------------------------------------------------------------- causality and packing


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-umt5"])
def test_causality_bidirectionality_and_packing_by_gradients(name):
    """Row 0: one example.  Row 1: [A | B | pad] on both sides.  Decoder logits at t depend on
    decoder inputs <= t of their own example, and on every encoder token of their example;
    on nothing else (neither self- nor cross-attention leaks across examples or from padding)."""
    cfg, model = preset(name), model_for(name)
    S, L = 14, 12
    (es0, ep0), (es1, ep1) = seg_pos([14], S), seg_pos([5, 6], S)
    (ds0, dp0), (ds1, dp1) = seg_pos([12], L), seg_pos([4, 5], L)
    enc_seg, enc_pos = jnp.array([es0, es1]), jnp.array([ep0, ep1])
    dec_seg, dec_pos = jnp.array([ds0, ds1]), jnp.array([dp0, dp1])

    @nnx.jit
    def grads(model, enc_ids, dec_ids):
        def logits(e, d):
            enc = model.encode_embedded(e, enc_pos, enc_seg)
            return model.decode_embedded(d, dec_pos, dec_seg, enc, enc_seg)

        out, vjp = jax.vjp(logits, model.embed(enc_ids), model.embed(dec_ids))
        r = jax.random.normal(jax.random.key(1), out.shape)
        return out, jax.vmap(lambda t: vjp(jnp.zeros_like(out).at[:, t].set(r[:, t])))(jnp.arange(L))

    out, (g_enc, g_dec) = grads(model, tokens(cfg, (2, S), 7), tokens(cfg, (2, L), 8))
    g_enc, g_dec = np.abs(np.asarray(g_enc)).sum(-1), np.abs(np.asarray(g_dec)).sum(-1)  # [L, B, S|L]
    assert np.all(np.isfinite(np.asarray(out)))
    es, ds = np.asarray(enc_seg), np.asarray(dec_seg)
    for b in range(2):
        for t in range(L):
            if ds[b, t] == 0:
                continue
            seen_dec = (np.arange(L) <= t) & (ds[b] == ds[b, t])
            assert np.all(g_dec[t, b][~seen_dec] == 0), f"row {b}: logits at {t} see later/other decoder tokens"
            assert np.all(g_dec[t, b][seen_dec] > 0), f"row {b}: logits at {t} ignore visible decoder tokens"
            seen_enc = es[b] == ds[b, t]
            assert np.all(g_enc[t, b][~seen_enc] == 0), f"row {b}: logits at {t} see other encoder tokens"
            assert np.all(g_enc[t, b][seen_enc] > 0), f"row {b}: logits at {t} ignore encoder tokens"


@pytest.mark.parametrize("name", TINY)
def test_packing_matches_separate_examples(name):
    """Rows: [A | B | pad] on both sides, A alone (+pad), B alone (+pad), all padding; then B
    alone unpadded.  A and B get the logits they get alone; padding gives no NaN; encode +
    decode == __call__."""
    cfg, model = preset(name), model_for(name)
    ea, eb = tokens(cfg, (1, 6), 11), tokens(cfg, (1, 9), 12)
    da, db = tokens(cfg, (1, 5), 13), tokens(cfg, (1, 7), 14)
    S, L = 18, 15
    pad = lambda n: jnp.zeros((1, n), jnp.int32)  # noqa: E731
    enc = jnp.concatenate([jnp.concatenate([ea, eb, pad(3)], 1), jnp.concatenate([ea, pad(12)], 1),
                           jnp.concatenate([eb, pad(9)], 1), pad(S)])
    dec = jnp.concatenate([jnp.concatenate([da, db, pad(3)], 1), jnp.concatenate([da, pad(10)], 1),
                           jnp.concatenate([db, pad(8)], 1), pad(L)])
    rows = [([6, 9], [5, 7]), ([6], [5]), ([9], [7]), ([], [])]
    enc_sp = [seg_pos(e, S) for e, _ in rows]
    dec_sp = [seg_pos(d, L) for _, d in rows]
    a = lambda sp, i: jnp.array([x[i] for x in sp], jnp.int32)  # noqa: E731
    batch = (enc, a(enc_sp, 1), a(enc_sp, 0), dec, a(dec_sp, 1), a(dec_sp, 0))
    out = np.asarray(forward(model, *batch))
    assert np.all(np.isfinite(out)), "padding produced non-finite logits"
    np.testing.assert_allclose(out[0, :5], out[1, :5], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:12], out[2, :7], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:12], np.asarray(forward(model, eb, None, None, db))[0], atol=1e-5)
    split = nnx.jit(lambda m, *b: m.decode(*b[3:], m.encode(*b[:3]), b[2]))(model, *batch)
    np.testing.assert_allclose(np.asarray(split), out, atol=1e-6)


# --------------------------------------------------------------------------- remat, counts, flops


def _loss_grads(model, batch):
    def loss(m):
        logits = m(*batch)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[3][..., None], -1))
    return flat(jax.jit(nnx.grad(loss))(model))


def test_remat_policies_give_identical_gradients():
    small = dict(n_layers=1, n_decoder_layers=1)
    batch = _packed_batch(preset("tiny-umt5"), 2)
    want = _loss_grads(build_model(preset("tiny-umt5", **small), rngs=nnx.Rngs(0)), batch)
    for policy in sorted(REMAT_POLICIES):
        got = _loss_grads(build_model(preset("tiny-umt5", remat=policy, **small), rngs=nnx.Rngs(0)), batch)
        for path in want:
            np.testing.assert_allclose(np.asarray(got[path]), np.asarray(want[path]), rtol=1e-6, atol=1e-7,
                                       err_msg=f"{policy} {path}")


EXPECTED = {
    "tiny-t5": {"encoder/rel_bias/embedding": (8, 4), "decoder/rel_bias/embedding": (8, 4),
                "encoder/layers/0/attn/q/kernel": (32, 4, 12), "decoder/layers/1/cross/o/kernel": (4, 12, 32),
                "encoder/layers/1/mlp/up/kernel": (32, 64), "decoder/layers/0/mlp/down/kernel": (64, 32)},
    "tiny-mt5": {"decoder/layers/2/cross_norm/scale": (32,), "decoder/layers/2/mlp/gate/kernel": (32, 48),
                 "lm_head/kernel": (32, 160)},
    "tiny-umt5": {"encoder/layers/1/attn/rel_bias/embedding": (16, 4),
                  "decoder/layers/0/attn/rel_bias/embedding": (16, 4)},
}
ABSENT = {
    "tiny-t5": ["lm_head/kernel", "encoder/layers/0/mlp/gate/kernel", "encoder/layers/0/attn/rel_bias/embedding",
                "encoder/layers/0/cross/q/kernel"],
    "tiny-mt5": ["decoder/layers/3/attn/q/kernel", "decoder/layers/0/attn/rel_bias/embedding"],
    "tiny-umt5": ["encoder/rel_bias/embedding", "decoder/rel_bias/embedding"],
}


@pytest.mark.parametrize("name", TINY)
def test_builds_with_paths_shapes_init_and_count(name):
    cfg = preset(name)
    params = flat(nnx.state(model_for(name), nnx.Param))
    for path, shape in EXPECTED[name].items():
        assert params[path].shape == shape, path
    for path in ABSENT[name]:
        assert path not in params, path
    assert sum(v.size for v in params.values()) == param_count(cfg)
    # scaled init (std factor * ...): q (D*K)^-1/2, k D^-1/2, o (H*K)^-1/2, down F^-1/2, embed 1
    D, H, K, F = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.mlp_dim
    stds = {"encoder/layers/0/attn/q/kernel": (D * K) ** -0.5, "encoder/layers/0/attn/k/kernel": D ** -0.5,
            "encoder/layers/0/attn/o/kernel": (H * K) ** -0.5, "encoder/layers/0/mlp/up/kernel": D ** -0.5,
            "encoder/layers/0/mlp/down/kernel": F ** -0.5, "embed/embedding": 1.0}
    for path, std in stds.items():
        assert abs(float(jnp.std(params[path])) / std - 1) < 0.15, path


# Totals of the HF checkpoints (transformers meta-device model, plus the separate lm_head
# that v1.1 / mT5 / umT5 checkpoints carry).
@pytest.mark.parametrize("name,count", [
    ("t5-v1_1-small", 76_961_152), ("t5-v1_1-base", 247_577_856), ("t5-v1_1-large", 783_150_080),
    ("t5-v1_1-xl", 2_849_757_184), ("t5-v1_1-xxl", 11_135_332_352),
    ("mt5-small", 300_176_768), ("mt5-base", 582_401_280), ("mt5-large", 1_229_581_312),
    ("mt5-xl", 3_742_619_648), ("mt5-xxl", 12_921_057_280),
    ("umt5-small", 306_601_984), ("umt5-base", 592_043_520), ("umt5-xl", 3_768_356_864),
    ("umt5-xxl", 12_972_531_712)])
def test_real_preset_param_counts(name, count):
    cfg = preset(name)
    assert cfg.family == "t5" and cfg.decoder_start_id == 0
    assert param_count(cfg) == count


def test_t5_flops_formula():
    cfg = preset("tiny-mt5")  # D 32, H 4, K 8, F 48, V 160, 2 encoder + 3 decoder layers, gated
    D, H, K, F, V, NE, ND, T = 32, 4, 8, 48, 160, 2, 3, 16
    matmul = NE * (4 * D * H * K + 3 * D * F) + ND * (8 * D * H * K + 3 * D * F) + D * V
    assert train_flops_per_token(cfg, T) == 6 * matmul + 12 * T * H * K * (NE + 2 * ND)


def test_bfloat16_compute_is_finite_and_close():
    cfg = preset("tiny-mt5", dtype="bfloat16")
    batch = _packed_batch(cfg, 2)
    got = forward(model_for("tiny-mt5", dtype="bfloat16"), *batch)
    assert got.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(got)))
    want = forward(model_for("tiny-mt5"), *batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.1 * float(jnp.abs(want).max()))
