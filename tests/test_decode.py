"""Cached decoding: == full forward, beam search exactness, sampling, forcing, batching,
HF ``generate`` parity and sharding.  Tiny random float32 models."""

from __future__ import annotations

import dataclasses
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxft.config.schema import MeshConfig, ModelConfig
from jaxft.eval import cache as cache_lib
from jaxft.eval.decode import (DecodeConfig, _generate_jit, decode_all, generate, length_sorted_batches,
                               restore_order)
from jaxft.eval.sampling import first_argmax, length_penalty, top_k_filter, top_p_filter
from jaxft.models import build_model
from jaxft.sharding import make_mesh, use_mesh

PRESETS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models"
GEMMA2 = dict(sliding_window=3, attn_logit_softcap=5.0, final_logit_softcap=10.0, post_norms=True)
FAMILIES = {  # id -> (preset, overrides)
    "llama-gqa": ("tiny-llama", {}), "bloom-alibi": ("tiny-bloom", {}), "gemma2-local": ("tiny-gemma", GEMMA2),
    "t5-relative": ("tiny-t5", {}), "umt5-per-layer": ("tiny-umt5", {}),
    "mbart-learned": ("tiny-mbart", {}), "nllb-sinusoidal": ("tiny-nllb", {}),
}
_MODELS: dict = {}


def preset(name: str, **overrides) -> ModelConfig:
    data = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())["model"]
    return dataclasses.replace(ModelConfig(**data), **overrides)


def model_for(name: str, **overrides):
    key = (name, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        cfg = preset(name, **overrides)
        _MODELS[key] = (cfg, build_model(cfg, rngs=nnx.Rngs(0)))
    return _MODELS[key]


def batch(cfg: ModelConfig, lengths=(7, 4, 2), width=7, seed=0, pad=0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded random rows (real tokens >= 3) and their lengths."""
    ids = np.random.default_rng(seed).integers(3, cfg.vocab_size, (len(lengths), width))
    lengths = np.asarray(lengths, np.int32)
    return np.where(np.arange(width)[None] < lengths[:, None], ids, pad).astype(np.int32), lengths


def run(model, cfg: ModelConfig, config: DecodeConfig, ids, lengths, **kw):
    src = "enc_inputs" if cache_lib.model_is_encoder_decoder(model) else "inputs"
    config = dataclasses.replace(config, decoder_start_id=cfg.decoder_start_id)
    return generate(model, config=config, **{src: ids, src.replace("inputs", "lengths"): lengths}, **kw)


def full_logits(model, ids, lengths, gen_BT, start_id) -> np.ndarray:
    """Non-cached forward over the whole sequence: logits_BTV predicting gen_BT."""
    B, T = gen_BT.shape
    if cache_lib.model_is_encoder_decoder(model):
        seg = (np.arange(ids.shape[1])[None] < lengths[:, None]).astype(np.int32)
        dec = np.concatenate([np.full((B, 1), start_id, np.int32), gen_BT[:, :-1]], 1)
        return np.asarray(model(jnp.asarray(ids), None, jnp.asarray(seg), jnp.asarray(dec)))
    left, seg, pos = (np.asarray(a) for a in cache_lib.left_align(jnp.asarray(ids), jnp.asarray(lengths), 0))
    P = ids.shape[1]
    seq = np.concatenate([left, gen_BT[:, :-1]], 1)
    seg = np.concatenate([seg, np.ones((B, T - 1), np.int32)], 1)
    pos = np.concatenate([pos, pos[:, -1:] + 1 + np.arange(T - 1)[None]], 1)
    return np.asarray(model(jnp.asarray(seq), jnp.asarray(pos), jnp.asarray(seg)))[:, P - 1:]


# --------------------------------------------------------------------------- cache == full forward


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_greedy_is_argmax_of_full_forward(family):
    cfg, model = model_for(FAMILIES[family][0], **FAMILIES[family][1])
    ids, lengths = batch(cfg)
    T = 8
    out = run(model, cfg, DecodeConfig(strategy="greedy", max_len=T, eos_id=None, length_penalty=0.0), ids, lengths)
    gen = np.asarray(out.tokens[:, 0])
    full = full_logits(model, ids, lengths, gen, cfg.decoder_start_id)
    np.testing.assert_array_equal(full.argmax(-1), gen)
    logp = jax.nn.log_softmax(full, -1)
    np.testing.assert_allclose(out.scores[:, 0], np.take_along_axis(logp, gen[..., None], -1).sum((1, 2)),
                               atol=1e-4)
    # teacher-forced through the cache, step by step: the same logits
    st = cache_lib.start(model, max_len=T, pad_id=0, **(
        dict(enc_inputs=ids, enc_lengths=lengths, decoder_start_id=cfg.decoder_start_id)
        if cache_lib.model_is_encoder_decoder(model) else dict(inputs=ids, lengths=lengths)))
    c, tok, pos, steps = st.cache, st.token_B, st.position_B, []
    assert (st.logits_BV is None) == cache_lib.model_is_encoder_decoder(model)
    for t in range(T):
        if t == 0 and st.logits_BV is not None:  # decoder-only: the prefill gives the first logits
            logits = st.logits_BV
        else:
            logits, c = cache_lib.step(model, tok, pos, c)
        steps.append(np.asarray(logits))
        tok, pos = jnp.asarray(gen[:, t]), pos + 1
    np.testing.assert_allclose(np.stack(steps, 1), full, atol=1e-4)


# --------------------------------------------------------------------------- beam search


def with_eos_from_greedy(model, cfg, ids, lengths, step=2, **kw):
    """An EOS id the model actually produces: row 0's greedy token at ``step``."""
    out = run(model, cfg, DecodeConfig(strategy="greedy", max_len=step + 1, eos_id=None), ids, lengths, **kw)
    return int(out.tokens[0, 0, step])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_beam_size_one_is_greedy(name):
    cfg, model = model_for(name)
    ids, lengths = batch(cfg)
    eos = with_eos_from_greedy(model, cfg, ids, lengths)
    for alpha, stop in ((0.0, "bound"), (0.6, "full")):
        base = DecodeConfig(strategy="greedy", max_len=8, eos_id=eos, length_penalty=alpha,
                            early_stopping=stop)
        greedy = run(model, cfg, base, ids, lengths)
        beam = run(model, cfg, dataclasses.replace(base, strategy="beam", beam_size=1), ids, lengths)
        np.testing.assert_array_equal(beam.tokens, greedy.tokens)
        np.testing.assert_array_equal(beam.lengths, greedy.lengths)
        np.testing.assert_allclose(beam.scores, greedy.scores, atol=1e-5)
    n = int(greedy.lengths[0, 0])  # EOS handled: row 0 stops at its first EOS, then pads
    assert n <= 3 and int(greedy.tokens[0, 0, n - 1]) == eos and (np.asarray(greedy.tokens[0, 0, n:]) == 0).all()


@pytest.mark.parametrize("alpha,mode", [(0.6, "gnmt"), (1.0, "hf"), (0.0, "gnmt")])
def test_large_beam_finds_exhaustive_best(alpha, mode):
    V, T = 6, 3  # beam V**(T-1) = 36: every hypothesis of lengths 1..3 (XLA:CPU compiles beam 216 for 6 s)
    cfg, model = model_for("tiny-llama", vocab_size=V, init_std=0.1)
    prompt = np.array([[3, 4, 5]], np.int32)
    eos = int(np.argsort(np.asarray(model(jnp.asarray(prompt)))[0, -1])[-2])  # the 2nd likeliest first token
    # log-probs of every length-T continuation, then all hypotheses: EOS-terminated or length T
    seqs = np.array(list(itertools.product(range(V), repeat=T)), np.int32)
    logp = np.asarray(jax.nn.log_softmax(full_logits(model, np.repeat(prompt, len(seqs), 0),
                                                     np.full(len(seqs), 3, np.int32), seqs, 0), -1))
    cum = np.cumsum(np.take_along_axis(logp, seqs[..., None], -1)[..., 0], 1)
    hyps = {}
    for s, c in zip(seqs.tolist(), cum):
        for n in range(1, T + 1):
            if n == T or s[n - 1] == eos:
                hyps[tuple(s[:n])] = c[n - 1] / float(length_penalty(n, alpha, mode))
                break
    ranked = sorted(hyps.items(), key=lambda kv: -kv[1])
    config = DecodeConfig(strategy="beam", beam_size=V ** (T - 1), n_best=5, max_len=T, eos_id=eos,
                          length_penalty=alpha, length_penalty_mode=mode)
    out = generate(model, inputs=prompt, config=config)
    for j, (hyp, score) in enumerate(ranked[:5]):
        n = int(out.lengths[0, j])
        assert tuple(np.asarray(out.tokens[0, j, :n]).tolist()) == hyp, (j, ranked[:5])
        np.testing.assert_allclose(float(out.scores[0, j]), score, atol=1e-4)
    assert sum(h[-1] == eos for h, _ in ranked[:5]) >= (1 if alpha == 0 else 0)  # EOS semantics exercised


# --------------------------------------------------------------------------- sampling


def test_filters_on_hand_made_logits():
    probs = np.array([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.1, 0.15, 0.2, 0.5]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    kept = lambda x: np.isfinite(np.asarray(x))  # noqa: E731
    np.testing.assert_array_equal(kept(top_p_filter(logits, 0.5)), [[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(kept(top_p_filter(logits, 0.6)), [[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(kept(top_p_filter(logits, 0.8)), [[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(kept(top_p_filter(logits, 0.01)), [[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]])
    assert kept(top_p_filter(logits, 1.0)).all()
    np.testing.assert_array_equal(kept(top_k_filter(logits, 2)), [[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]])
    np.testing.assert_allclose(np.asarray(top_k_filter(logits, 2))[0, :2], np.log(probs[0, :2]), rtol=1e-6)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mbart"])
def test_sampling_limits_and_seeds(name):
    cfg, model = model_for(name)
    ids, lengths = batch(cfg)
    greedy = run(model, cfg, DecodeConfig(strategy="greedy", max_len=6, eos_id=None), ids, lengths)
    sample = DecodeConfig(strategy="sample", max_len=6, eos_id=None)
    for config in (dataclasses.replace(sample, top_k=1), dataclasses.replace(sample, temperature=1e-4),
                   dataclasses.replace(sample, temperature=0.0), dataclasses.replace(sample, top_p=1e-6)):
        out = run(model, cfg, config, ids, lengths, rng=jax.random.key(3))
        np.testing.assert_array_equal(out.tokens, greedy.tokens)
    hot = dataclasses.replace(sample, temperature=1.5, top_k=50, top_p=0.95, n_best=3)
    a = run(model, cfg, hot, ids, lengths, rng=jax.random.key(1))
    b = run(model, cfg, hot, ids, lengths, rng=jax.random.key(1))
    c = run(model, cfg, hot, ids, lengths, rng=jax.random.key(2))
    assert a.tokens.shape == (3, 3, 6)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    assert (np.asarray(a.tokens[:, 0]) != np.asarray(a.tokens[:, 1])).any()  # n samples differ


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-mbart"])
def test_beams_and_samples_read_their_inputs_encoder_kv_stored_once(name, monkeypatch):
    """The n rows of an input (beams, samples) read its encoder k/v stored once, not n copies,
    with the same tokens and scores as when every row had its own copy."""
    from jaxft.models import cache as model_cache

    cfg, model = model_for(name)
    ids, lengths = batch(cfg)
    start = cache_lib.start(model, enc_inputs=jnp.asarray(ids), enc_lengths=jnp.asarray(lengths), max_len=8, pad_id=0,
                            decoder_start_id=cfg.decoder_start_id)
    repeated = start.cache.repeat_rows(4)
    assert [c.k.shape[0] for c in repeated.cross] == [3] * len(repeated.cross)  # one per input
    assert repeated.enc_segment_ids_BS.shape[0] == 3
    assert [pool_shape(c) for c in repeated.layers] == [(3, 4 * 8)] * len(repeated.layers)  # one pool per input

    def with_copies(self, n):  # the layout before: every row its own copy of every k/v
        rep = lambda a, axis=0: jnp.repeat(a, n, axis=axis)  # noqa: E731
        return dataclasses.replace(copied_rows(self, n), cross=model_cache._rows(self.cross, rep),
                                   enc_segment_ids_BS=rep(self.enc_segment_ids_BS))

    assert_beams_and_samples_as_with(with_copies, model, cfg, ids, lengths, monkeypatch)


def assert_beams_and_samples_as_with(repeat_rows, model, cfg, ids, lengths, monkeypatch):
    """Beam 4 and 3 samples give the same tokens and scores with ``repeat_rows`` patched into
    `DecodeCache` (an older cache layout) as with today's."""
    from jaxft.models import cache as model_cache

    configs = (DecodeConfig(strategy="beam", beam_size=4, n_best=2, max_len=6, eos_id=None, length_penalty=0.6),
               DecodeConfig(strategy="sample", temperature=1.5, n_best=3, max_len=6, eos_id=None))
    today = [run(model, cfg, c, ids, lengths, rng=jax.random.key(1)) for c in configs]
    monkeypatch.setattr(model_cache.DecodeCache, "repeat_rows", repeat_rows)
    jax.clear_caches()  # trace generate again with the older layout
    for config, want in zip(configs, today):
        got = run(model, cfg, config, ids, lengths, rng=jax.random.key(1))
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)


def pool_shape(c) -> tuple[int, int]:
    """(rows, slots) of a layer's self-attention cache."""
    return c.v.shape[0], c.v.shape[c.slot_axes()[1]]


def copied_rows(cache, n):
    """`DecodeCache.repeat_rows` as it was: each row's own copy of the self-attention k/v, which
    beam search reorders every step."""
    rep = lambda a, axis=0: jnp.repeat(a, n, axis=axis)  # noqa: E731
    from jaxft.models import cache as model_cache

    return dataclasses.replace(cache, layers=model_cache._rows(cache.layers, rep), segment_ids_BS=rep(cache.segment_ids_BS),
                               positions_BS=rep(cache.positions_BS))


# every family per layer; stacked, the families whose layers differ from one another (gemma2's
# local / global windows, umT5's per-layer relative bias) and grouped-query RoPE (ALiBi and T5's
# shared bias are the same stacked code as per layer)
@pytest.mark.parametrize("family,stack", [
    (f, False) for f in ("llama-gqa", "bloom-alibi", "gemma2-local", "t5-relative", "umt5-per-layer")] + [
    (f, True) for f in ("llama-gqa", "gemma2-local", "umt5-per-layer")],
    ids=lambda v: v if isinstance(v, str) else ("stacked" if v else "per-layer"))
def test_beams_and_samples_read_one_pool_per_input(family, stack, monkeypatch):
    """The n rows of an input (beams, samples) read one pool of self-attention k/v per input (its
    prompt once, then each row's own slots) and beam search reorders the rows' ancestry, not the
    cache: the same tokens and scores as when every row had its own copy of the cache, reordered
    every step (RoPE + grouped-query, ALiBi, sliding window + soft-capping, T5's relative bias
    per stack and per layer; per-layer and stacked layers)."""
    from flax import nnx

    from jaxft.eval.types import SplitModel
    from jaxft.models.scan import stack_layers

    name, overrides = FAMILIES[family]
    cfg, model = model_for(name, **overrides)
    ids, lengths = batch(cfg)  # 7, 4 and 2 tokens in 7 columns
    if not stack and not cache_lib.model_is_encoder_decoder(model):
        start = cache_lib.start(model, inputs=jnp.asarray(ids), lengths=jnp.asarray(lengths), max_len=8, pad_id=0)
        repeated = start.cache.repeat_rows(4)  # the prompt (7 slots) once, then 4 x 8 own slots
        assert [pool_shape(c) for c in repeated.layers] == [(3, 7 + 4 * 8)] * cfg.n_layers
        assert repeated.ancestry_RT.shape == (12, 8) and repeated.segment_ids_BS.shape == (12, 15)
    if stack:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        model = SplitModel(graphdef, stack_layers(params, rest))
    assert_beams_and_samples_as_with(copied_rows, model, cfg, ids, lengths, monkeypatch)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_beam_search_moves_rows_without_copying_the_kv_cache(name, monkeypatch):
    """The compiled beam search gathers no per-row k/v array (4-D or more, 3 inputs x 4 beams
    rows): only the rows' ancestry, segment ids and positions move (with per-row copies, every
    layer's k and v were gathered)."""
    import re

    from jaxft.models import cache as model_cache

    cfg, model = model_for(name)
    ids, lengths = batch(cfg)
    config = DecodeConfig(strategy="beam", beam_size=4, max_len=6, eos_id=None)

    def kv_gathers() -> list[str]:
        program = str(jax.make_jaxpr(lambda i, n: run(model, cfg, config, i, n).tokens)(ids, lengths))
        return re.findall(r":(?:f32|bf16|f16)\[12(?:,\d+){3,}\] = gather", program)

    assert kv_gathers() == []
    monkeypatch.setattr(model_cache.DecodeCache, "repeat_rows", copied_rows)
    jax.clear_caches()
    assert len(kv_gathers()) >= 2  # the check sees them where they are


@pytest.mark.parametrize("where", ["cpu", "tpu"])
def test_the_pools_mask_is_built_once_per_step_on_the_cpu(where, monkeypatch):
    """Every layer reads a beam pool's mask; on the CPU it is `materialized` (read through one gather,
    a pred array of the folded [B, 1, n, prompt + n x own] shape) rather than recomputed from the
    ancestry inside each layer's softmax. Other platforms take it as computed."""
    import re

    from jaxft.models import kernels

    monkeypatch.setattr(kernels, "platform", lambda: where)
    cfg, model = model_for("tiny-llama")
    ids, lengths = batch(cfg, lengths=(5, 3), width=5)  # a shape no other test traces
    own = 4 if where == "cpu" else 5  # jit's trace cache does not see the patched platform: new shapes
    config = DecodeConfig(strategy="beam", beam_size=3, max_len=own, eos_id=None)
    program = str(jax.make_jaxpr(lambda i, n: run(model, cfg, config, i, n).tokens)(ids, lengths))
    mask_gathers = re.findall(rf":bool\[2,1,3,{5 + 3 * own}\] = gather", program)  # 5 prompt slots + 3 x own
    assert len(mask_gathers) == (1 if where == "cpu" else 0)


# --------------------------------------------------------------------------- forcing, lengths, batching


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-nllb"])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_forced_ids_and_min_len(name, strategy):
    cfg, model = model_for(name)
    ids, lengths = batch(cfg)
    eos = with_eos_from_greedy(model, cfg, ids, lengths, step=0)  # row 0 would stop at once
    base = DecodeConfig(strategy=strategy, max_len=7, eos_id=eos, beam_size=3, n_best=2 if strategy == "beam" else 1)
    out = run(model, cfg, base, ids, lengths)
    assert int(out.lengths[0, 0]) == 1 or strategy == "beam"
    out = run(model, cfg, dataclasses.replace(base, min_len=3), ids, lengths)
    assert (np.asarray(out.tokens[:, :, :3]) != eos).all() and (np.asarray(out.lengths) >= 4).all()
    out = run(model, cfg, dataclasses.replace(base, forced_ids=(11, 12)), ids, lengths)
    assert (np.asarray(out.tokens[:, :, :2]) == [11, 12]).all()
    forced = np.array([[20, -1], [21, 22], [-1, -1]], np.int32)
    out = run(model, cfg, base, ids, lengths, forced=forced)
    assert (np.asarray(out.tokens[:2, :, 0]) == [[20], [21]]).all() and (np.asarray(out.tokens[1, :, 1]) == 22).all()


# beam search in every family (pooled caches, n-best); greedy in one family of each kind
@pytest.mark.parametrize("name,strategy", [(n, "beam") for n in ("tiny-llama", "tiny-bloom", "tiny-mbart", "tiny-t5")]
                         + [("tiny-llama", "greedy"), ("tiny-t5", "greedy")])
def test_padded_batch_equals_one_by_one(name, strategy):
    cfg, model = model_for(name)
    ids, lengths = batch(cfg, lengths=(7, 3, 5, 1))
    eos = with_eos_from_greedy(model, cfg, ids, lengths, step=3)
    config = DecodeConfig(strategy=strategy, max_len=6, eos_id=eos, beam_size=3, n_best=2 if strategy == "beam" else 1)
    together = run(model, cfg, config, ids, lengths)
    for i, n in enumerate(lengths):
        alone = run(model, cfg, config, ids[i:i + 1, :n], lengths[i:i + 1])
        np.testing.assert_array_equal(alone.tokens[0], together.tokens[i])
        np.testing.assert_allclose(alone.scores[0], together.scores[i], atol=1e-4)


def test_length_sorted_batching_restores_order():
    cfg, model = model_for("tiny-mbart")
    seqs = [list(range(3, 3 + n)) for n in (5, 1, 9, 3, 7)]
    batches = length_sorted_batches(seqs, 2, pad_id=1, length_multiple=4)
    assert [b.indices.tolist() for b in batches] == [[2, 4], [0, 3], [1]]
    assert [b.ids.shape for b in batches] == [(2, 12), (2, 8), (2, 4)]
    assert restore_order(batches, [["c", "e"], ["a", "d"], ["b", "x"]]) == list("abcde")
    # long rows: a multiple of 128 columns (fewer shapes; the TPU's fused attention block)
    widths = [b.ids.shape[1] for b in length_sorted_batches([[5] * n for n in (512, 513, 700)], 1)]
    assert widths == [768, 640, 512]
    config = DecodeConfig(strategy="greedy", max_len=5, eos_id=None, pad_id=1, decoder_start_id=2)
    got = decode_all(model, seqs, config=config, batch_size=2)
    for seq, [(tokens, score)] in zip(seqs, got):
        want = generate(model, enc_inputs=np.array([seq]), config=config)
        assert tokens == np.asarray(want.tokens[0, 0]).tolist()
        np.testing.assert_allclose(score, float(want.scores[0, 0]), atol=1e-4)


# --------------------------------------------------------------------------- transformers parity


def _hf_llama(torch, transformers):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2,
        attn_implementation="eager")).eval()


def _hf_generate(hf, torch, transformers, ids, mask, **gen):
    gc = transformers.GenerationConfig(forced_eos_token_id=None, no_repeat_ngram_size=0, repetition_penalty=1.0,
                                       bos_token_id=None, **gen)
    with torch.no_grad():
        res = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), generation_config=gc,
                          return_dict_in_generate=True, output_scores=True)
    return res


@pytest.mark.parametrize("family", ["llama", "t5", "mbart"])
def test_matches_transformers_generate(family, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import test_models_bart as tb
    import test_models_t5 as tt
    from jaxft.interop import load_hf
    if family == "llama":
        llama = _hf_llama(torch, transformers)
        llama.save_pretrained(tmp_path, safe_serialization=True)
        cfg, state = load_hf(tmp_path)
        cfg = dataclasses.replace(cfg, dtype="float32")
        model = build_model(cfg, rngs=nnx.Rngs(0))
        nnx.update(model, state)
        hf, pad, start, forced = llama, 0, None, ()
    elif family == "t5":  # tiny-mt5 has 3 decoder layers: HF 5.x generate cannot cache those
        cfg, hf = tt._hf_model("tiny-t5")
        model = build_model(cfg, rngs=nnx.Rngs(1))
        tb._load(model, tt._hf_to_jaxft(cfg, hf))
        pad, start, forced = 0, 0, ()
    else:
        cfg = tb.preset("tiny-mbart")
        hf = tb._hf_model("tiny-mbart")
        with torch.no_grad():  # tied head + residual stream: untouched, it repeats its input token
            torch.manual_seed(1)
            hf.model.decoder.layer_norm.weight.normal_()
        hf.generation_config.forced_eos_token_id = None  # mBART's default forces EOS at max length
        model = build_model(cfg, rngs=nnx.Rngs(0))
        tb._load(model, tb._hf_to_ours(hf, cfg))
        pad, start, forced = 1, 2, (250,)
    ids, lengths = batch(cfg, lengths=(6, 4, 2), width=6, pad=pad)
    mask = (np.arange(6)[None] < lengths[:, None]).astype(np.int64)
    dec_only = family == "llama"
    hf_ids = np.stack([np.roll(r, 6 - n) for r, n in zip(ids, lengths)]) if dec_only else ids  # HF: left pad
    hf_mask = np.stack([np.roll(r, 6 - n) for r, n in zip(mask, lengths)]) if dec_only else mask
    T = 7
    ours_cfg = DecodeConfig(strategy="greedy", max_len=T, pad_id=pad, decoder_start_id=start, forced_ids=forced,
                            eos_id=None, length_penalty_mode="hf")
    src = dict(inputs=ids, lengths=lengths) if dec_only else dict(enc_inputs=ids, enc_lengths=lengths)
    free = np.asarray(generate(model, config=ours_cfg, **src).tokens)[:, 0, len(forced):]
    counts = np.bincount(free.reshape(-1), minlength=cfg.vocab_size)
    counts[list(forced)] = -1
    eos = int(counts.argmax())  # a token the model likes to produce (not the forced one)
    skip = 6 if dec_only else 1
    hf_kw = dict(max_new_tokens=T, eos_token_id=eos, pad_token_id=pad, decoder_start_token_id=start,
                 forced_bos_token_id=forced[0] if forced else None)
    cases = [(dict(), dict(do_sample=False, num_beams=1)),
             (dict(min_len=2), dict(do_sample=False, num_beams=1, min_new_tokens=2))]
    # every length penalty x stopping rule on the decoder-only family; the beam search is shared code,
    # so the encoder-decoders (whose cache steps differ) check two of them (each case compiles anew)
    combos = itertools.product((0.0, 1.0, -0.5), (("bound", "never"), ("full", True))) if dec_only else \
        ((0.0, ("bound", "never")), (-0.5, ("full", True)))
    for alpha, (ours_stop, hf_stop) in combos:
        if not (alpha < 0 and ours_stop == "bound"):  # HF's "never" bound is ours only for alpha >= 0
            cases.append((dict(strategy="beam", beam_size=4, n_best=3, length_penalty=alpha, early_stopping=ours_stop),
                          dict(num_beams=4, num_return_sequences=3, length_penalty=alpha, early_stopping=hf_stop)))
    n_eos = 0
    for ours_kw, theirs_kw in cases:
        out = generate(model, config=dataclasses.replace(ours_cfg, eos_id=eos, **ours_kw), **src)
        res = _hf_generate(hf, torch, transformers, hf_ids, hf_mask, **hf_kw, **theirs_kw)
        n = out.tokens.shape[1]
        want = res.sequences.numpy()[:, skip:].reshape(3, n, -1)
        after_eos = np.cumsum(np.cumsum(want == eos, -1), -1) > 1
        want = np.where(after_eos, pad, want)  # HF fills beams with eos when pad_token_id is 0
        got = np.asarray(out.tokens)[:, :, :want.shape[2]]
        np.testing.assert_array_equal(got, want, err_msg=f"{ours_kw}")
        assert (np.asarray(out.tokens)[:, :, want.shape[2]:] == pad).all()
        n_eos += int((got == eos).sum())
        if "strategy" in ours_kw:
            np.testing.assert_allclose(np.asarray(out.scores).reshape(-1), res.sequences_scores.numpy(), atol=1e-4)
    assert n_eos > 0


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mbart"])
def test_sharded_decoding_matches_unsharded(name):
    cfg, model = model_for(name)
    ids, lengths = batch(cfg, lengths=(7, 3, 5, 1))
    eos = with_eos_from_greedy(model, cfg, ids, lengths, step=3)
    configs = [DecodeConfig(strategy="greedy", max_len=6, eos_id=eos),
               DecodeConfig(strategy="beam", beam_size=2, n_best=2, max_len=6, eos_id=eos)]
    want = [run(model, cfg, c, ids, lengths) for c in configs]
    graphdef, state = nnx.split(model)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with use_mesh(mesh):
        sharded = nnx.merge(graphdef, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
        got = [run(sharded, cfg, c, ids, lengths) for c in configs]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.tokens, w.tokens)
        np.testing.assert_allclose(g.scores, w.scores, atol=1e-4)


def test_first_argmax_is_argmax_with_ties_and_masked_entries():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(16, 300)).astype(np.float32)  # many tied maxima per row
    x[3, :] = -np.inf
    x[3, 7] = -1e30
    x[5, :] = -np.inf  # a row with nothing left: argmax says 0
    np.testing.assert_array_equal(np.asarray(jax.jit(first_argmax)(jnp.asarray(x))), np.argmax(x, axis=-1))
    nan_row = jnp.asarray(np.where(np.arange(300) == 4, np.nan, 0.0)[None].astype(np.float32))
    assert 0 <= int(first_argmax(nan_row)[0]) < 300


# --------------------------------------------------------------------------- cache layout


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_both_cache_layouts_decode_alike(name, monkeypatch):
    """The CPU stores caches head-major ([B, G, S, K]; grouped-query keys [B, G, K, S]: what its
    attention contracts fastest); other platforms [B, S, G, K].  Forcing the latter here: the
    same outputs, per layer and stacked.  (A decoder with grouped-query heads, and an
    encoder-decoder's self- and cross-attention caches: mBART's are the same code as T5's.)"""
    from jaxft.eval.types import SplitModel
    from jaxft.models import cache as cache_mod
    from jaxft.models.scan import stack_layers

    cfg, model = model_for(name)
    ids, lengths = batch(cfg, lengths=(7, 3, 5, 1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    split = SplitModel(graphdef, stack_layers(params, rest))
    configs = [DecodeConfig(strategy="greedy", max_len=6, eos_id=1),
               DecodeConfig(strategy="beam", beam_size=2, n_best=2, max_len=6, eos_id=1)]
    assert cache_mod.head_major_default()  # the CPU's layout
    if not cache_lib.model_is_encoder_decoder(model):  # tiny-llama: grouped-query, keys slots-last
        assert cfg.n_heads > cfg.kv_heads and model.init_cache(2, 5).layers[0].keys_last
    want = [run(m, cfg, c, ids, lengths) for m in (model, split) for c in configs]
    asked = []
    monkeypatch.setattr(cache_mod, "head_major_default", lambda: asked.append(1) is None and False)
    assert not cache_mod.KVCache.zeros(2, 5, 3, 4, jnp.float32).head_major
    asked.clear()
    _generate_jit.clear_cache()  # retrace: the layout is chosen when the program is traced
    try:
        got = [run(m, cfg, c, ids, lengths) for m in (model, split) for c in configs]
    finally:
        _generate_jit.clear_cache()
    assert asked  # the programs were traced with [B, S, G, K] caches
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.tokens, w.tokens)
        np.testing.assert_allclose(g.scores, w.scores, rtol=1e-5, atol=1e-5)


def test_cache_layouts_store_the_same_keys():
    from jaxft.models.cache import KVCache, LayerSlot

    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32) for _ in range(2))  # [B, L, G, K]
    plain = KVCache.of(jnp.zeros((2, 6, 4, 5)), jnp.zeros((2, 6, 4, 5))).write(k, v, jnp.int32(2))
    major = KVCache.of(jnp.zeros((2, 4, 6, 5)), jnp.zeros((2, 4, 6, 5)), True).write(k, v, jnp.int32(2))
    last = KVCache.of(jnp.zeros((2, 4, 5, 6)), jnp.zeros((2, 4, 6, 5)), True, True).write(k, v, jnp.int32(2))
    np.testing.assert_array_equal(np.asarray(major.k[:, :, 2:5]), np.asarray(k).transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(np.asarray(last.k[..., 2:5]), np.asarray(k).transpose(0, 2, 3, 1))
    for cache in (major, last):
        for a, b in zip(plain.kv_BSGK(), cache.kv_BSGK()):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(plain.kv_BSGK()[0][:, 2:5]), np.asarray(k))
    # the CPU's choice: keys slots-last only where a kv head serves several query heads
    assert KVCache.zeros(2, 6, 4, 5, jnp.float32, group=2).k.shape == (2, 4, 5, 6)
    assert KVCache.zeros(2, 6, 4, 5, jnp.float32, group=1).k.shape == (2, 4, 6, 5)
    # a stacked stack (leading layer axis): layer 1 written, layers 0 and 2 untouched, in every layout
    for cache in (KVCache.of(jnp.zeros((3, 2, 6, 4, 5)), jnp.zeros((3, 2, 6, 4, 5))),
                  KVCache.of(jnp.zeros((3, 2, 4, 6, 5)), jnp.zeros((3, 2, 4, 6, 5)), True),
                  KVCache.of(jnp.zeros((3, 2, 4, 5, 6)), jnp.zeros((3, 2, 4, 6, 5)), True, True)):
        slot = LayerSlot(cache, jnp.int32(1)).write(k, v, jnp.int32(2))
        for a, b in zip(slot.kv_BSGK(), plain.kv_BSGK()):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert not np.asarray(slot.stack.k[0]).any() and not np.asarray(slot.stack.v[2]).any()


@pytest.mark.parametrize("family", ["llama-gqa", "bloom-alibi", "gemma2-local"])
def test_prefill_attends_to_the_prompt_alone_and_fills_the_cache_alike(family):
    """The prefill writes the prompt into an empty cache and attends over the prompt's own keys
    only: the same last-token logits and cache as attending over every slot of the cache (the
    empty ones masked), per layer and stacked, with scores [L, L] instead of [L, S] (less
    compiled memory)."""
    from jaxft.eval.types import SplitModel
    from jaxft.models.scan import merged, stack_layers

    cfg, model = model_for(FAMILIES[family][0], **FAMILIES[family][1])
    ids, lengths = batch(cfg, lengths=(7, 4, 2))
    ids_BP, seg_BP, pos_BP = cache_lib.left_align(jnp.asarray(ids), jnp.asarray(lengths), 0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    stacked = SplitModel(graphdef, stack_layers(params, rest))

    def prefill(split, new_tokens, flag):
        def f(states):
            with merged(split.graphdef, *states) as m:
                return m.decode_step(ids_BP, pos_BP, m.init_cache(ids.shape[0], ids.shape[1] + new_tokens), seg_BP,
                                     prefill=flag)
        return jax.jit(f), split.states

    per_layer = SplitModel(graphdef, (params, rest))
    for split in (per_layer, stacked):
        (f_all, states), (f_own, _) = prefill(split, 8, False), prefill(split, 8, True)
        (want_logits, want_cache), (got_logits, got_cache) = f_all(states), f_own(states)
        # the prefill's logits: the last prompt token's alone
        np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits)[:, -1:], rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # a long room for new tokens: the prompt-only prefill's scores stay [L, L]
    f_all, states = prefill(stacked, 2048, False)
    f_own, _ = prefill(stacked, 2048, True)
    temp = [f.lower(states).compile().memory_analysis().temp_size_in_bytes for f in (f_all, f_own)]
    assert temp[1] < temp[0] / 2, temp
