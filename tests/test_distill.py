"""Word-level knowledge distillation (`train.distill`): the loss terms against plain
numpy, chunked == whole, alpha 0 == plain training, a teacher equal to the student
gives KL 0 (from a run dir and from an HF folder), and the one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.config.loader import load_config
from jaxft.runs.model import restore_model
from jaxft.train.loop import train
from jaxft.train.losses import chunked_distill_sums, distill_token_sums, summed_token_losses, token_kl
from trainutil import read_jsonl

from trainutil import write_run_config

KW = dict(label_smoothing=0.1, z_loss=1e-3)


def _logits(seed, shape=(2, 6, 11)):
    return jax.random.normal(jax.random.key(seed), shape) * 3


def _np_kl(t, s, T, k):
    t, s = np.asarray(t, np.float64) / T, np.asarray(s, np.float64) / T
    if k:  # both renormalised over the teacher's top k
        idx = np.argsort(-t, axis=-1)[..., :k]
        t, s = np.take_along_axis(t, idx, -1), np.take_along_axis(s, idx, -1)
    logq = s - np.log(np.exp(s).sum(-1, keepdims=True))
    logp = t - np.log(np.exp(t).sum(-1, keepdims=True))
    return (np.exp(logp) * (logp - logq)).sum(-1)


@pytest.mark.parametrize("T,k", [(1.0, 0), (2.0, 0), (1.5, 3)])
def test_kl_matches_numpy(T, k):
    t, s = _logits(0), _logits(1)
    np.testing.assert_allclose(token_kl(t, s, T, k), _np_kl(t, s, T, k), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(token_kl(t, t, T, k)))) < 1e-6  # a teacher equal to the student


def test_distill_sums_mix_cross_entropy_and_kl():
    s, t = _logits(0), _logits(1)
    targets = jax.random.randint(jax.random.key(2), (2, 6), 0, 11)
    w = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.float32)
    plain = summed_token_losses(s, targets, w, **KW)
    zero = distill_token_sums(s, t, targets, w, alpha=0.0, temperature=2.0, top_k=0, **KW)
    np.testing.assert_allclose(zero[:3], plain, rtol=1e-6)  # alpha 0: exactly the cross-entropy
    half = distill_token_sums(s, t, targets, w, alpha=0.5, temperature=2.0, top_k=0, **KW)
    kl = float(np.sum(_np_kl(t, s, 2.0, 0) * np.asarray(w)))
    np.testing.assert_allclose(half[3], kl, rtol=1e-5)
    want = 0.5 * (float(plain[0]) - float(plain[1])) + float(plain[1]) + 0.5 * 4.0 * kl
    np.testing.assert_allclose(half[0], want, rtol=1e-5)


def test_chunked_distillation_equals_whole_values_and_gradients():
    kh, kt, kw_, kx = jax.random.split(jax.random.key(3), 4)
    hs, ht = jax.random.normal(kh, (2, 10, 4)), jax.random.normal(kt, (2, 10, 4))
    ws, wt = jax.random.normal(kw_, (4, 13)), jax.random.normal(kx, (4, 13))
    targets = jax.random.randint(kx, (2, 10), 0, 13)
    w = (jnp.arange(10) < 8).astype(jnp.float32)[None].repeat(2, 0)
    kw = dict(alpha=0.7, temperature=1.5, top_k=4, **KW)

    def loss(ws, chunk):
        return chunked_distill_sums(hs, lambda h: h @ ws, ht, lambda h: h @ wt, targets, w, chunk=chunk, **kw)[0]

    whole, g_whole = jax.value_and_grad(loss)(ws, 10)
    chunked, g_chunked = jax.value_and_grad(loss)(ws, 3)  # 4 chunks of 3, two padded tokens
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)
    np.testing.assert_allclose(g_chunked, g_whole, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(whole, distill_token_sums(hs @ ws, ht @ wt, targets, w, **kw)[0], rtol=1e-5)


def _kl(run_dir):
    return [r["kl"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    return train(load_config(write_run_config(tmp, steps=3, name="teacher")), base_dir=tmp)


def test_distillation_runs_from_a_run_and_an_hf_teacher(tmp_path, teacher):
    tok = str(teacher.run_dir / "tokenizer.model")
    student = {"data.tokenizer": {"path": tok}}
    plain = train(load_config(write_run_config(tmp_path, steps=2, name="plain", extra=student)), base_dir=tmp_path)
    alpha0 = write_run_config(tmp_path, steps=2, name="alpha0", extra=student)
    cfg = load_config(alpha0, [f"train.distill.teacher=run:{teacher.run_dir}", "train.distill.alpha=0"])
    zero = train(cfg, base_dir=tmp_path)
    assert zero.losses == pytest.approx(plain.losses, rel=1e-6)  # alpha 0: plain training, teacher or not
    # the same init as the teacher's (seed 0), the teacher 3 steps on: ~2e-3 (1e-7 if they were equal)
    assert all(k > 1e-4 for k in _kl(zero.run_dir))

    # A student that starts as the teacher: KL 0 at the first step (both loaders).
    same = write_run_config(tmp_path, steps=2, name="same", extra=student)
    cfg = load_config(same, [f"train.distill.teacher=run:{teacher.run_dir}", f"model.init_from=run:{teacher.run_dir}",
                             "train.distill.temperature=2"])
    assert _kl(train(cfg, base_dir=tmp_path).run_dir)[0] == pytest.approx(0.0, abs=1e-5)

    from jaxft.runs.export import export_run

    hf = export_run(teacher.run_dir, tmp_path / "teacher_hf", fmt="hf")
    same_hf = write_run_config(tmp_path, steps=2, name="same_hf", extra=student)
    cfg = load_config(same_hf, [f"train.distill.teacher=hf:{hf}", f"model.init_from=hf:{hf}", "train.distill.top_k=8"])
    assert _kl(train(cfg, base_dir=tmp_path).run_dir)[0] == pytest.approx(0.0, abs=1e-5)


def test_a_teacher_that_cannot_teach_is_refused_in_one_line(tmp_path, teacher):
    path = write_run_config(tmp_path, steps=2, name="student")
    with pytest.raises(ValueError, match=r"train\.distill\.teacher: .* has model\.vocab_size 512, the student 640"):
        train(load_config(path, [f"train.distill.teacher=run:{teacher.run_dir}", "model.vocab_size=640"]),
              base_dir=tmp_path)
    other = write_run_config(tmp_path, steps=2, name="student2")  # trains its own, smaller tokenizer
    with pytest.raises(ValueError, match=r"train\.distill\.teacher: .* another tokenizer"):
        train(load_config(other, [f"train.distill.teacher=run:{teacher.run_dir}",
                                  "data.tokenizer.train_vocab_size=400"]), base_dir=tmp_path)
    with pytest.raises(ValueError, match=r"train\.distill\.teacher.*expected 'run:<run dir>'"):
        load_config(path, [f"train.distill.teacher={teacher.run_dir}"])


def test_the_lowered_step_takes_the_teacher_weights(tmp_path, teacher):
    """`jaxft lower` (and planning) counts the teacher: its weights are arguments of the step."""
    from jaxft.train.aot import lower_train_step

    path = write_run_config(tmp_path, steps=2, name="student", extra={"data.tokenizer": {"path": "x.model"}})
    plain = lower_train_step(load_config(path)).compile().memory_analysis().argument_size_in_bytes
    cfg = load_config(path, [f"train.distill.teacher=run:{teacher.run_dir}"])
    distill = lower_train_step(cfg).compile().memory_analysis().argument_size_in_bytes
    restored = restore_model(teacher.run_dir)
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(restored.params))
    assert distill - plain == per_device
