import dataclasses
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.config.schema import ModelConfig, TokenizerConfig
from jaxft.data.tokenizer import train_tokenizer
from jaxft.data.vocab import extend_tokenizer, lang_tag_pieces, t5_sentinel_pieces
from jaxft.models.layers import Embed
from jaxft.models.registry import build_model
from jaxft.models.embedding_resize import extend_embeddings

WORDS = "the a cat dog house runs blue green quick slow river Haus Katze blau".split()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=8)) for _ in range(300)]
    path = tmp_path_factory.mktemp("tok") / "t.model"
    train_tokenizer(texts, path, TokenizerConfig(train_vocab_size=350, model_type="bpe"),
                    user_defined_symbols=["<2de>"])
    return path


def test_lang_tag_and_sentinel_pieces():
    assert lang_tag_pieces(["de", "yo", "zho_Hant"]) == ["<2de>", "<2yo>", "<2zho_Hant>"]
    assert t5_sentinel_pieces(3) == ["<extra_id_2>", "<extra_id_1>", "<extra_id_0>"]


def test_extend_tokenizer_appends_and_keeps_ids(tok_path, tmp_path):
    from jaxft.data.tokenizer import Tokenizer
    old = Tokenizer.load(tok_path)
    n = old.vocab_size
    new = extend_tokenizer(tok_path, ["<2de>", *lang_tag_pieces(["yo", "ha"]), "<mask>", "<2yo>"],
                           tmp_path / "ext.model")
    assert new.vocab_size == n + 3  # <2de> present, <2yo> repeated: skipped
    assert [new.piece_id(p) for p in ("<2yo>", "<2ha>", "<mask>")] == [n, n + 1, n + 2]
    assert new.piece_id("<2de>") == old.piece_id("<2de>")
    assert all(new.id_to_piece(i) == old.id_to_piece(i) for i in range(n))
    text = "the cat runs blue"
    assert new.encode(text) == old.encode(text)
    ids = new.encode("<2yo> the cat <mask> blau")
    assert n in ids and n + 2 in ids and new.decode(ids) == "<2yo> the cat <mask> blau"
    # one piece wherever it occurs, exactly like a symbol given at training time
    assert new.encode("<2yo> the cat") == [n if i == 4 else i for i in new.encode("<2de> the cat")]
    with pytest.raises(ValueError, match="whitespace"):
        extend_tokenizer(tok_path, ["a b"], tmp_path / "bad.model")


def _cfg(tie, vocab=48):
    return ModelConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, mlp_dim=64, dtype="float32",
                       tie_embeddings=tie)


@pytest.mark.parametrize("tie", [False, True])
def test_extend_embeddings_keeps_old_logits(tie):
    cfg = _cfg(tie)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray([[1, 5, 7, 47, 3, 2], [0, 9, 9, 30, 12, 1]], jnp.int32)
    before = np.asarray(model(ids))
    _, state = nnx.split(model)
    old_embed = np.asarray(model.embed.embedding[...])
    grown = extend_embeddings(state, 56)
    new_model = build_model(dataclasses.replace(cfg, vocab_size=56), rngs=nnx.Rngs(1))
    nnx.update(new_model, grown)
    after = np.asarray(new_model(ids))
    assert after.shape == (2, 6, 56)
    np.testing.assert_allclose(after[..., :48], before, atol=1e-6)
    emb = new_model.embed.embedding
    np.testing.assert_array_equal(np.asarray(emb[...][:48]), old_embed)
    np.testing.assert_allclose(np.asarray(emb[...][48:]), np.broadcast_to(old_embed.mean(0), (8, 32)), atol=1e-6)
    assert emb.get_metadata()["out_sharding"] == ("vocab", "embed")  # logical axes kept
    if not tie:
        k = np.asarray(new_model.lm_head.kernel[...])
        old_k = np.asarray(model.lm_head.kernel[...])
        np.testing.assert_array_equal(k[:, :48], old_k)
        np.testing.assert_allclose(k[:, 48:], np.broadcast_to(old_k.mean(1, keepdims=True), (32, 8)), atol=1e-6)
        assert new_model.lm_head.kernel.get_metadata()["out_sharding"] == ("embed", "vocab")


class _Biased(nnx.Module):
    def __init__(self):
        self.embed = Embed(10, 4, init_std=1.0, param_dtype=jnp.float32, dtype=jnp.float32, rngs=nnx.Rngs(0))
        self.lm_bias = nnx.Param(jnp.arange(10, dtype=jnp.float32), out_sharding=("vocab",))
        self.other = nnx.Param(jnp.ones((10,)))  # same length, not a vocabulary parameter


def test_extend_embeddings_bias_normal_and_errors():
    with nnx.use_eager_sharding(False):  # no mesh here
        _, state = nnx.split(_Biased())
    grown = extend_embeddings(state, 13, init="normal", rng=jax.random.key(1))
    flat = {tuple(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(grown)}
    assert flat[("lm_bias",)].tolist() == list(range(10)) + [0, 0, 0]
    assert flat[("other",)].shape == (10,)
    emb = np.asarray(flat[("embed", "embedding")])
    assert emb.shape == (13, 4) and np.abs(emb[10:]).max() > 0 and not np.allclose(emb[10], emb[11])
    zeros = extend_embeddings(state, 12, init="zeros")
    assert not np.asarray(dict((tuple(map(str, p)), v.get_value()) for p, v in nnx.to_flat_state(zeros))[
        ("embed", "embedding")])[10:].any()
    assert extend_embeddings(state, 10) is state
    with pytest.raises(ValueError, match="smaller"):
        extend_embeddings(state, 8)
    with pytest.raises(ValueError, match="init"):
        extend_embeddings(state, 12, init="bogus")
