"""`jaxft.models.precast`: a decoding loop reads weights cast once to the compute dtype.  Which arrays
are cast (every `Linear` kernel and `Embed` table, per layer or stacked, under LoRA; nothing else),
and decoding with them equals decoding without.  That the GPU loop then reads no float32 weight is
tested on a compiled XLA:GPU program in test_plan_gpu.py (XLA:CPU computes bf16 products in float32
and carries float32 weights either way)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.config.schema import LoraConfig
from jaxft.eval import decode as decode_lib
from jaxft.eval.decode import DecodeConfig
from jaxft.eval.types import SplitModel
from jaxft.models import build_model
from jaxft.models.precast import compute_dtype_states
from jaxft.models.scan import stack_layers
from jaxft.peft.lora import LoRAParam, apply_lora

from test_decode import batch, preset, run

STRATEGIES = (DecodeConfig(strategy="greedy", max_len=6, eos_id=1),
              DecodeConfig(strategy="beam", beam_size=2, n_best=2, max_len=6, eos_id=1))


def _dtypes(states) -> dict[str, jnp.dtype]:
    out = {}
    for i, s in enumerate(states):
        for path, leaf in jax.tree_util.tree_flatten_with_path(s)[0]:
            out[f"{i}:" + "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)] = \
                leaf.dtype
    return out


def _bf16_model(name: str, lora: bool = False):
    cfg = preset(name, dtype="bfloat16")
    model = build_model(cfg, rngs=nnx.Rngs(0))
    if lora:
        apply_lora(model, LoraConfig(rank=4, targets=(r"(attn|self_attn|cross)/(q|v)/kernel$",)), rngs=nnx.Rngs(1))
    return cfg, model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
@pytest.mark.parametrize("stacked", [False, True])
def test_linear_kernels_and_embedding_tables_are_cast_the_rest_kept(name, stacked):
    cfg, model = _bf16_model(name, lora=True)
    graphdef, factors, rest = nnx.split(model, LoRAParam, ...)
    states = stack_layers(factors, rest) if stacked else (factors, rest)
    before, after = _dtypes(states), _dtypes(compute_dtype_states(graphdef, states))
    assert set(before) == set(after) and all(d == jnp.float32 for d in before.values())
    cast = {p for p, d in after.items() if d == jnp.bfloat16}
    kept = set(after) - cast
    assert all(p.endswith("/kernel/value") or p.endswith("embed/embedding/value") for p in cast), sorted(cast)
    assert {p for p in before if p.endswith("/kernel/value")} <= cast  # every Linear's, LoRA-wrapped ones too
    assert any("embed/embedding" in p for p in cast)
    assert any("/lora/" in p for p in kept) and any(p.endswith("scale/value") for p in kept)
    if name == "tiny-t5":  # the relative position tables are added to float32 logits as they are
        assert any("rel_bias/embedding" in p for p in kept) and not any("rel_bias" in p for p in cast)
    if stacked:
        assert any("/stacked/" in p for p in cast)


def test_a_float32_model_is_left_as_it_is():
    cfg = preset("tiny-llama", dtype="float32")
    graphdef, state = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))
    (same,) = compute_dtype_states(graphdef, (state,))
    assert all(a is b for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(same)))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_decoding_with_the_cast_weights_equals_decoding_without(name, monkeypatch):
    """bf16 compute, float32 parameters, LoRA, stacked layers: greedy and beam search."""
    cfg, model = _bf16_model(name, lora=True)
    graphdef, factors, rest = nnx.split(model, LoRAParam, ...)
    factors = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(0).normal(0, 0.3, x.shape), x.dtype), factors)
    split = SplitModel(graphdef, stack_layers(factors, rest))
    ids, lengths = batch(cfg, lengths=(7, 3, 5, 1))
    for strategy in STRATEGIES:
        got = run(split, cfg, strategy, ids, lengths)
        with monkeypatch.context() as m:
            m.setattr(decode_lib, "compute_dtype_states", lambda graphdef, states: tuple(states))
            decode_lib._generate_jit.clear_cache()
            want = run(split, cfg, strategy, ids, lengths)
        decode_lib._generate_jit.clear_cache()
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.scores, want.scores)
