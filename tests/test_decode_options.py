"""HF anti-repetition decoding options: ``repetition_penalty`` and ``no_repeat_ngram_size``.

Processor values on hand-made arrays and against transformers' own processors, config
validation and CLI flags, and ``generate`` parity with HF ``generate`` (greedy, beam 4)
on a tiny LLaMA (decoder-only: the prompt counts) and a tiny T5 (encoder-decoder: the
decoder start id counts), with outputs that repeat without the options; top-k 1
sampling with the options equals greedy.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.config.schema import DecodeConfig
from jaxft.eval.decode import generate, strip
from jaxft.eval.sampling import no_repeat_ngram, repetition_penalty
from jaxft.models import build_model

# --------------------------------------------------------------------------- processors


def test_repetition_penalty_values():
    x = jnp.array([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    hist = jnp.array([[-1, 0, 1, 3], [3, 3, 2, 0]])  # -1: padding; column 3 is not yet generated (cur=3)
    got = repetition_penalty(x, hist, jnp.int32(3), 2.0)
    np.testing.assert_allclose(got, [[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.25, 1.5]])
    assert repetition_penalty(x, hist, jnp.int32(3), 1.0) is x


def test_no_repeat_ngram_values():
    x = jnp.zeros((1, 10))
    hist = jnp.array([[5, 6, 5, 6, 5, 9]])  # cur=5: the 9 is not yet generated
    banned = lambda h, cur, n: np.flatnonzero(np.isinf(no_repeat_ngram(x, jnp.array(h), jnp.int32(cur), n)[0]))  # noqa: E731
    assert banned(hist, 5, 2).tolist() == [6]  # bigrams (5, 6) seen: 6 may not follow 5
    assert banned(hist, 5, 3).tolist() == [6]  # (6, 5, 6) seen
    assert banned(hist, 5, 1).tolist() == [5, 6]  # unigrams: every seen token
    assert banned(hist, 4, 3).tolist() == [5]  # prefix (5, 6): (5, 6, 5) seen
    assert banned(hist, 2, 3).tolist() == []  # no complete trigram yet
    assert banned([[-1, -1, 5, 5]], 4, 2).tolist() == [5]  # padding starts no n-gram
    assert no_repeat_ngram(x, hist, jnp.int32(5), 0) is x


@pytest.mark.parametrize("n", [1, 2, 3])
def test_processors_match_transformers(n):
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(n)
    ids = rng.integers(0, 6, (8, 9))  # a small vocab: many repeats
    x = rng.normal(size=(8, 12)).astype(np.float32)
    hist = np.concatenate([ids, np.zeros((8, 3), np.int64)], axis=1)  # columns from cur=9 on: not generated
    theirs = lp.RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor(ids), torch.tensor(x)).numpy()
    np.testing.assert_allclose(repetition_penalty(jnp.array(x), jnp.array(hist), jnp.int32(9), 1.7), theirs, rtol=1e-6)
    theirs = lp.NoRepeatNGramLogitsProcessor(n)(torch.tensor(ids), torch.tensor(x)).numpy()
    np.testing.assert_array_equal(no_repeat_ngram(jnp.array(x), jnp.array(hist), jnp.int32(9), n), theirs)


def test_config_validation_and_cli_flags():
    with pytest.raises(ValueError, match=r"^decode.repetition_penalty: must be > 0, got 0.0$"):
        DecodeConfig(repetition_penalty=0.0)
    with pytest.raises(ValueError, match=r"^decode.no_repeat_ngram_size: must be >= 0, got -1$"):
        DecodeConfig(no_repeat_ngram_size=-1)
    from jaxft.cli import build_parser
    args = build_parser().parse_args(["translate", "run", "--src-lang", "en", "--tgt-lang", "de",
                                      "--repetition-penalty", "1.3", "--no-repeat-ngram-size", "3"])
    assert (args.repetition_penalty, args.no_repeat_ngram_size) == (1.3, 3)


# --------------------------------------------------------------------------- transformers generate parity


def _pair(family, tmp_path, torch, transformers):
    """(our model, HF model, pad id, decoder start id) with the same weights."""
    import test_decode as td
    if family == "llama":
        from jaxft.interop import load_hf
        hf = td._hf_llama(torch, transformers)
        hf.save_pretrained(tmp_path, safe_serialization=True)
        cfg, state = load_hf(tmp_path)
        model = build_model(dataclasses.replace(cfg, dtype="float32"), rngs=nnx.Rngs(0))
        nnx.update(model, state)
        return cfg, model, hf, None
    import test_models_bart as tb
    import test_models_t5 as tt
    cfg, hf = tt._hf_model("tiny-t5")
    model = build_model(cfg, rngs=nnx.Rngs(1))
    tb._load(model, tt._hf_to_jaxft(cfg, hf))
    return cfg, model, hf, 0  # T5 starts the decoder with the pad id 0


def _repeats(seq, n: int) -> bool:
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(set(grams)) < len(grams)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_matches_transformers_generate(family, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import test_decode as td
    cfg, model, hf, start = _pair(family, tmp_path, torch, transformers)
    W, T, eos, pad = 6, 12, 1, 0
    ids, lengths = td.batch(cfg, lengths=(6, 4, 2), width=W, pad=pad)
    mask = (np.arange(W)[None] < lengths[:, None]).astype(np.int64)
    dec_only = start is None
    if dec_only:  # HF: left padding (excluded by its repetition penalty, ours by both processors)
        ids_hf, mask_hf = (np.stack([np.roll(r, W - n) for r, n in zip(a, lengths)]) for a in (ids, mask))
        src = dict(inputs=ids, lengths=lengths)
    else:
        ids_hf, mask_hf, src = ids, mask, dict(enc_inputs=ids, enc_lengths=lengths)
    history = [list(r[:n]) if dec_only else [start] for r, n in zip(ids, lengths)]  # what the processors see
    base = DecodeConfig(strategy="greedy", max_len=T, pad_id=pad, decoder_start_id=start, eos_id=eos,
                        length_penalty_mode="hf")
    beam = dict(strategy="beam", beam_size=4, n_best=2, length_penalty=1.0)
    ours = lambda **kw: generate(model, config=dataclasses.replace(base, **kw), **src)  # noqa: E731

    def theirs(**kw):
        gc = transformers.GenerationConfig(max_new_tokens=T, eos_token_id=eos, pad_token_id=pad, bos_token_id=None,
                                           decoder_start_token_id=start, forced_eos_token_id=None, do_sample=False,
                                           **kw)
        with torch.no_grad():
            res = hf.generate(input_ids=torch.tensor(ids_hf), attention_mask=torch.tensor(mask_hf),
                              generation_config=gc, return_dict_in_generate=True, output_scores=True)
        return res.sequences.numpy()[:, W if dec_only else 1:], getattr(res, "sequences_scores", None)

    plain = np.asarray(ours().tokens)[:, 0]
    assert any(_repeats(h + list(p), 1) for h, p in zip(history, plain))
    assert any(_repeats(h + list(p), 2) for h, p in zip(history, plain))
    cases = [(dict(repetition_penalty=1.3), dict(num_beams=1, repetition_penalty=1.3)),
             (dict(no_repeat_ngram_size=2), dict(num_beams=1, no_repeat_ngram_size=2)),
             (dict(beam, repetition_penalty=1.3, no_repeat_ngram_size=3),
              dict(num_beams=4, num_return_sequences=2, length_penalty=1.0, early_stopping="never",
                   repetition_penalty=1.3, no_repeat_ngram_size=3))]
    for ours_kw, theirs_kw in cases:
        out = ours(**ours_kw)
        want, want_scores = theirs(**theirs_kw)
        got = np.asarray(out.tokens).reshape(want.shape[0], -1)
        np.testing.assert_array_equal(got[:, :want.shape[1]], want, err_msg=f"{family} {ours_kw}")
        if "strategy" in ours_kw:
            np.testing.assert_allclose(np.asarray(out.scores).reshape(-1), want_scores.numpy(), atol=1e-4)
            unpenalised = np.asarray(ours(**beam).tokens).reshape(got.shape)
        else:
            unpenalised = plain
        assert (got != unpenalised).any(), f"{family} {ours_kw}: the option changed nothing"
        if ours_kw == cases[0][0]:  # top-k 1 sampling is greedy, penalty included, for each of n_best samples
            sampled = ours(strategy="sample", n_best=2, top_k=1, temperature=0.7, **ours_kw).tokens
            np.testing.assert_array_equal(sampled, np.repeat(out.tokens, 2, axis=1))
        n, k = ours_kw.get("no_repeat_ngram_size", 0), got.shape[0] // len(history)
        for i, (row, length) in enumerate(zip(got, np.asarray(out.lengths).reshape(-1))):
            assert not n or not _repeats(history[i // k] + strip(row, length, eos), n), (history[i // k], row)



# --------------------------------------------------------------------------- several stop tokens


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_every_stop_id_ends_an_output_like_eos(strategy):
    """`stop_ids` (a chat template's end of turn beside the tokenizer's eos): greedy and beam
    search end a hypothesis at any stop token, mask them all before min_len, and the output
    without stops is the prefix of the free run up to that token."""
    from jaxft.config.schema import ModelConfig

    cfg = ModelConfig(family="decoder", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                      max_seq_len=64, dtype="float32")
    model = build_model(cfg, rngs=nnx.Rngs(3))
    prompt = np.array([[5, 9, 12, 7], [8, 3, 30, 2]], np.int32)
    base = DecodeConfig(strategy=strategy, beam_size=3, max_len=12, length_penalty=0.0, eos_id=None, pad_id=0)
    free = generate(model, config=base, inputs=prompt)
    free_tokens = np.asarray(free.tokens)[:, 0]
    stop = int(free_tokens[0, 4])  # a token the best output of row 0 produces at step 5
    out = generate(model, config=dataclasses.replace(base, eos_id=63, stop_ids=(stop,)), inputs=prompt)
    tokens, lengths = np.asarray(out.tokens)[:, 0], np.asarray(out.lengths)[:, 0]
    for row in range(2):
        n = int(lengths[row])
        assert n <= base.max_len and (n == base.max_len or tokens[row, n - 1] in (63, stop))
        assert (tokens[row, n:] == 0).all()
        assert list(tokens[row, :n]).count(stop) <= 1
    first = list(free_tokens[0]).index(stop) + 1
    if strategy == "greedy":
        assert lengths[0] == first and list(tokens[0, :first]) == list(free_tokens[0, :first])
        assert strip(tokens[0], lengths[0], (63, stop)) == list(free_tokens[0, :first - 1])
    late = generate(model, config=dataclasses.replace(base, eos_id=63, stop_ids=(stop,), min_len=first + 1),
                    inputs=prompt)
    late_tokens = np.asarray(late.tokens)[:, 0]
    assert stop not in list(late_tokens[0, :first + 1]) and 63 not in list(late_tokens[0, :first + 1])
