"""Dropout (`model.dropout` / `attention_dropout` / `activation_dropout`, `peft.lora.dropout`):
the rate is realised, rate 0 / eval / decoding are untouched, masks are a function of
(train.seed, step) only (exact resume, any mesh, any remat), every family drops, and the
HF config fields round-trip."""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxft.config.errors import ConfigError
from jaxft.config.loader import load_config
from jaxft.config.schema import LoraConfig, MeshConfig, ModelConfig, OptimizerConfig, PeftConfig, TrainConfig
from jaxft.models import build_model
from jaxft.models.dropout import dropout, dropout_rng, has_dropout
from jaxft.models.registry import model_input_keys
from jaxft.sharding import batch_sharding, make_mesh, use_mesh
from jaxft.train.optim import make_optimizer, make_schedule
from jaxft.train.state import init_train_state, make_init_fn
from jaxft.train.step import jit_eval_step, jit_train_step, make_eval_step, make_loss_fn, make_train_step

from trainutil import write_run_config

PRESETS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models"
RATES = dict(dropout=0.2, attention_dropout=0.2, activation_dropout=0.2)
OPT = OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="constant")
RANDOM_PRIMITIVES = ("random_bits", "threefry2x32")


def preset(name: str, **overrides) -> ModelConfig:
    cfg = ModelConfig(**yaml.safe_load((PRESETS / f"{name}.yaml").read_text())["model"])
    return dataclasses.replace(cfg, **overrides)


def small(name: str, **overrides) -> ModelConfig:
    """One layer per stack: the same sites, half the compile time."""
    return preset(name, n_layers=1, n_decoder_layers=None if name == "tiny-llama" else 1, **overrides)


def make_batch(cfg: ModelConfig, rows: int = 8, length: int = 12, src_len: int = 10, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = lambda shape: rng.integers(3, cfg.vocab_size, size=shape).astype(np.int32)  # noqa: E731
    seg = np.ones((rows, length), np.int32)
    seg[rows // 2:, -3:] = 0  # padding
    batch = {"inputs": ids((rows, length)), "targets": ids((rows, length)), "segment_ids": seg,
             "positions": np.arange(length, dtype=np.int32)[None].repeat(rows, 0) * (seg > 0),
             "weights": (seg > 0).astype(np.float32)}
    batch.update(enc_inputs=ids((rows, src_len)), enc_segment_ids=np.ones((rows, src_len), np.int32),
                 enc_positions=np.arange(src_len, dtype=np.int32)[None].repeat(rows, 0))
    return {k: batch[k] for k in ("targets", "weights", *model_input_keys(cfg))}


@functools.cache  # the mesh test reuses a family test's run
def one_step(cfg: ModelConfig, mesh_cfg: MeshConfig = MeshConfig(data=-1), train_cfg: TrainConfig = TrainConfig(),
             peft: PeftConfig | None = None, steps: int = 1, evaluate: bool = False) -> tuple[float, list[float]]:
    """(eval loss at init or nan, train losses of ``steps`` steps) on one batch."""
    mesh, tx = make_mesh(mesh_cfg), make_optimizer(OPT, 10)
    init_fn, graphdef = make_init_fn(cfg, train_cfg, tx, 0, peft)
    keys = model_input_keys(cfg)
    with use_mesh(mesh):
        state, shardings = init_train_state(init_fn, mesh)
        batch = jax.device_put(make_batch(cfg), batch_sharding(mesh))
        ev = {"loss_sum": np.nan, "weight_sum": 1.0}
        if evaluate:
            eval_step = jit_eval_step(make_eval_step(graphdef, train_cfg, keys), shardings, batch_sharding(mesh))
            ev = eval_step(state, batch)
        step = jit_train_step(make_train_step(graphdef, tx, train_cfg, make_schedule(OPT, 10), keys), shardings,
                              batch_sharding(mesh))
        losses = []
        for _ in range(steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        return float(ev["loss_sum"] / ev["weight_sum"]), losses


def step_jaxpr(cfg: ModelConfig, peft: PeftConfig | None = None, evaluate: bool = False) -> str:
    """The train (or eval) step's jaxpr, traced on abstract values."""
    tx = make_optimizer(OPT, 10)
    init_fn, graphdef = make_init_fn(cfg, TrainConfig(), tx, 0, peft)
    keys = model_input_keys(cfg)
    step = (make_eval_step(graphdef, TrainConfig(), keys) if evaluate
            else make_train_step(graphdef, tx, TrainConfig(), make_schedule(OPT, 10), keys))
    with use_mesh(make_mesh(MeshConfig(data=-1))):
        return str(jax.make_jaxpr(step)(jax.eval_shape(init_fn), jax.eval_shape(lambda: make_batch(cfg))))


# --------------------------------------------------------------------------- the function


def test_dropout_realises_the_rate_and_keeps_the_mean():
    rate, n = 0.3, 512 * 512
    x = jnp.ones((512, 512), jnp.float32)

    @jax.jit
    def drop(key):
        with dropout_rng(key):
            return dropout(x, rate), dropout(x, rate)

    y, y2 = drop(jax.random.key(0))
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
    assert abs(float(jnp.mean(y)) - 1.0) < 4 * math.sqrt(rate / (1 - rate) / n)  # E[x] kept
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / (1 - rate)], rtol=1e-6)
    assert not np.array_equal(y, y2)  # successive calls draw fresh masks
    np.testing.assert_array_equal(drop(jax.random.key(0))[0], y)  # same key, same mask
    assert not np.array_equal(drop(jax.random.key(1))[0], y)
    assert dropout(x, rate) is x  # no stream: identity
    with dropout_rng(jax.random.key(0)):
        assert dropout(x, 0.0) is x
        assert dropout(x.astype(jnp.bfloat16), rate).dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5", "tiny-mbart"])
def test_forward_drops_only_inside_a_context(name):
    cfg = small(name, **RATES)
    model, plain = build_model(cfg, rngs=nnx.Rngs(0)), build_model(small(name), rngs=nnx.Rngs(0))
    batch = make_batch(cfg, rows=2)
    inputs = [batch[k] for k in model_input_keys(cfg)]

    def forward(model, key):
        with dropout_rng(key):
            return model(*inputs)

    # eval / decoding (no stream): exactly the rate-0 program, so bitwise the rate-0 numbers
    def jaxpr(model) -> str:
        graphdef, state = nnx.split(model)
        return str(jax.make_jaxpr(lambda state: forward(nnx.merge(graphdef, state), None))(state))

    assert jaxpr(model) == jaxpr(plain)
    forward = nnx.jit(forward)
    eval_out = forward(model, None)
    a, b = forward(model, jax.random.key(0)), forward(model, jax.random.key(1))
    assert not np.allclose(a, eval_out) and not np.allclose(a, b)
    np.testing.assert_array_equal(forward(model, jax.random.key(0)), a)


def test_remat_and_chunked_loss_see_the_same_masks():
    batch = make_batch(preset("tiny-llama"), length=19)
    sums = []
    for remat, chunk in (("none", 0), ("full", 5)):
        cfg = preset("tiny-llama", remat=remat, **RATES)
        graphdef, params, rest = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        loss_fn = jax.jit(jax.grad(make_loss_fn(graphdef, TrainConfig(loss_chunk=chunk, loss_chunk_mib=0)), has_aux=True))
        grads, aux = loss_fn(params, rest, batch, jax.random.key(3))
        sums.append((float(aux["loss_sum"]), grads))
    for loss, grads in sums[1:]:
        np.testing.assert_allclose(loss, sums[0][0], rtol=1e-6)
        for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(sums[0][1])):
            np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the train step


def test_rate_zero_step_takes_no_rng_path():
    assert not any(p in step_jaxpr(small("tiny-llama")) for p in RANDOM_PRIMITIVES)  # today's program
    assert not has_dropout(build_model(small("tiny-llama"), rngs=nnx.Rngs(0)))
    assert any(p in step_jaxpr(small("tiny-llama", attention_dropout=0.1)) for p in RANDOM_PRIMITIVES)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5", "tiny-mbart"])
def test_every_family_trains_with_dropout_and_evaluates_without(name):
    cfg = small(name, **RATES)
    assert not any(p in step_jaxpr(cfg, evaluate=True) for p in RANDOM_PRIMITIVES)  # eval never drops
    eval_loss, (train_loss,) = one_step(cfg, evaluate=True)  # eval: the rate-0 loss of these params
    assert np.isfinite(train_loss) and abs(train_loss - eval_loss) > 1e-4


def test_masks_do_not_depend_on_the_mesh():
    cfg = small("tiny-mbart", **RATES)
    _, dp = one_step(cfg, evaluate=True)  # the same call (cache key) as the tiny-mbart family test
    _, sharded = one_step(cfg, MeshConfig(data=2, fsdp=2, tensor=2))
    np.testing.assert_allclose(sharded, dp, rtol=1e-5)


def test_lora_dropout_trains_and_changes_the_loss():
    cfg = small("tiny-llama")
    lora = lambda rate: PeftConfig(method="lora", lora=LoraConfig(rank=4, dropout=rate))  # noqa: E731
    assert any(p in step_jaxpr(cfg, lora(0.5)) for p in RANDOM_PRIMITIVES)  # the adapter alone asks for a key
    _, plain = one_step(cfg, peft=lora(0.0), steps=2)
    _, dropped = one_step(cfg, peft=lora(0.5), steps=2)
    np.testing.assert_allclose(dropped[0], plain[0], rtol=1e-6)  # b = 0 at init: the branch adds nothing yet
    assert abs(dropped[1] - plain[1]) > 1e-6  # ... but b's first update saw dropped inputs


def test_resume_is_bitwise_exact_with_dropout(tmp_path):
    from jaxft.train.loop import train

    extra = {"model.dropout": 0.1, "model.attention_dropout": 0.1}
    ref = train(load_config(write_run_config(tmp_path, steps=4, extra=extra, name="ref")), base_dir=tmp_path)
    cfg = load_config(write_run_config(tmp_path, steps=4, extra=extra, name="resumed"))
    assert train(cfg, base_dir=tmp_path, stop_after=2).step == 2
    resumed = train(cfg, base_dir=tmp_path)
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == ref.losses[step], step


# --------------------------------------------------------------------------- config and HF


@pytest.mark.parametrize("key,value", [("model.dropout", 1.0), ("model.attention_dropout", -0.1),
                                       ("peft.lora.dropout", 1.5)])
def test_out_of_range_rates_name_the_key(tmp_path, key, value):
    section, _, leaf = key.rpartition(".")
    tree: dict = {"model": {"preset": "tiny-llama"}}
    node = tree
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[leaf] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path)
    with pytest.raises(ValueError, match="model.dropout"):
        build_model(preset("tiny-llama", dropout=1.0), rngs=nnx.Rngs(0))


def test_real_presets_carry_their_hf_rates():
    rates = lambda name: tuple(getattr(preset(name), k) for k in RATES)  # noqa: E731
    assert rates("mt5-small") == rates("umt5-base") == rates("t5-v1_1-xl") == (0.1, 0.1, 0.1)
    assert rates("mbart-large-50") == (0.1, 0.0, 0.0)
    assert rates("nllb-200-distilled-600M") == rates("m2m100_418M") == (0.1, 0.1, 0.0)
    assert rates("bloom-7b1") == rates("llama-3-8b") == rates("tiny-t5") == (0.0, 0.0, 0.0)


def test_hf_config_round_trip_of_the_rates():
    transformers = pytest.importorskip("transformers")
    from jaxft.interop import hf_config_to_model_config
    from jaxft.interop.hf import model_config_to_hf_config

    small = dict(vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    t5 = transformers.MT5Config(feed_forward_proj="gated-gelu", dropout_rate=0.25, **small).to_dict()
    cfg = hf_config_to_model_config(t5)
    assert (cfg.dropout, cfg.attention_dropout, cfg.activation_dropout) == (0.25, 0.25, 0.25)
    assert model_config_to_hf_config(cfg)["dropout_rate"] == 0.25

    bart = dict(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)
    for cls in (transformers.MBartConfig, transformers.M2M100Config):
        hf = cls(dropout=0.15, attention_dropout=0.05, activation_dropout=0.3, **bart).to_dict()
        cfg = hf_config_to_model_config(hf)
        assert (cfg.dropout, cfg.attention_dropout, cfg.activation_dropout) == (0.15, 0.05, 0.3)
        out = model_config_to_hf_config(cfg)
        assert (out["dropout"], out["attention_dropout"], out["activation_dropout"]) == (0.15, 0.05, 0.3)
        absent = {k: v for k, v in hf.items() if "dropout" not in k}  # transformers' class defaults
        want = (cls().dropout, cls().attention_dropout, cls().activation_dropout)
        cfg = hf_config_to_model_config(absent)
        assert (cfg.dropout, cfg.attention_dropout, cfg.activation_dropout) == want

    bloom = transformers.BloomConfig(hidden_size=16, n_layer=1, n_head=2, vocab_size=64, hidden_dropout=0.1,
                                     attention_dropout=0.2).to_dict()
    cfg = hf_config_to_model_config(bloom)
    assert (cfg.dropout, cfg.attention_dropout) == (0.1, 0.2)
    out = model_config_to_hf_config(cfg)
    assert (out["hidden_dropout"], out["attention_dropout"]) == (0.1, 0.2)
    llama = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, vocab_size=64, attention_dropout=0.3).to_dict()
    cfg = hf_config_to_model_config(llama)
    assert cfg.attention_dropout == 0.3 and model_config_to_hf_config(cfg)["attention_dropout"] == 0.3
    with pytest.raises(ValueError, match="dropout_rate"):
        hf_config_to_model_config(dict(t5, dropout_rate=1.5))


def test_a_run_dir_saved_before_a_key_existed_resumes_with_its_default():
    """Keys added to the schema later (model.dropout, train.loss_chunk, a source field) are
    read as their defaults from an older run's saved config, not refused as changed."""
    from jaxft.config.schema import Config, DataConfig, SourceConfig, to_dict
    from jaxft.runs.resume import incompatible_keys

    cfg = Config(data=DataConfig(train=(SourceConfig(type="tsv", path="d.tsv"),)))
    saved = to_dict(cfg)
    for section, key in (("model", "dropout"), ("model", "attention_dropout"), ("train", "loss_chunk")):
        del saved[section][key]
    del saved["data"]["train"][0]["hf_name"]
    assert incompatible_keys(saved, to_dict(cfg)) == []
    saved["model"]["d_model"] = 7
    assert [k for k, _, _ in incompatible_keys(saved, to_dict(cfg))] == ["model.d_model"]
    for key, value in (("model", "remat"), "full"), (("train", "loss_chunk"), 64):  # memory only: may change
        changed = to_dict(cfg)
        changed[key[0]][key[1]] = value
        assert incompatible_keys(to_dict(cfg), changed) == []
