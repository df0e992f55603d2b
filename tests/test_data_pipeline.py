import json
import random

import numpy as np
import pytest

from jaxft.config.schema import DataConfig, SourceConfig, TokenizerConfig
from jaxft.data.pipeline import build_dev_batches, build_train_pipeline, read_directions
from jaxft.data.sources import DataError
from jaxft.data.tasks import Featurizer, OverlongError
from jaxft.data.tokenizer import train_tokenizer

WORDS = "the a cat dog house runs blue green quick slow river Haus Katze blau ilé ajá".split()
KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def _sentence(rng):
    return " ".join(rng.choices(WORDS, k=rng.randint(1, 10)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    for direction, n in [("en-de", 120), ("en-yo", 15)]:
        rows = "".join(f"{_sentence(rng)}\t{_sentence(rng)}\n" for _ in range(n))
        (d / f"train.{direction}.tsv").write_text("src\ttgt\n" + rows)
        (d / f"dev.{direction}.tsv").write_text("src\ttgt\n" + rows)
    (d / "mono.txt").write_text("".join(_sentence(rng) + "\n" for _ in range(40)))
    return d


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(1)
    texts = [_sentence(rng) for _ in range(500)] + ["Translate from English to German Yoruba"] * 20
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t.model",
                           TokenizerConfig(train_vocab_size=300, model_type="bpe"))


def _cfg(**kw):
    train = (SourceConfig(type="tsv", path="{split}.{src}-{tgt}.tsv", directions=("en-de", "en-yo")),
             SourceConfig(type="text", task="lm", path="mono.txt", tgt_lang="de"))
    # the test tokenizer is almost character-level: 128 tokens fit every example
    base = dict(train=train, dev=train[:1], seq_len=128, temperature=2.0, seed=7,
                prompt_template="{src_name} to {tgt_name}: {src} =")
    return DataConfig(**{**base, **kw})


def _batches(p, n):
    return [next(p) for _ in range(n)]


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_shapes_dtypes_rates_and_stats(tok, data_dir):
    p = build_train_pipeline(_cfg(), tok, global_batch=4, base_dir=data_dir)
    b = next(p)
    assert set(b) == set(KEYS)
    assert all(b[k].shape == (4, 128) for k in KEYS)
    assert all(b[k].dtype == (np.float32 if k == "weights" else np.int32) for k in KEYS)
    rates = {r["direction"]: r for r in p.rates}
    assert [r["examples"] for r in rates.values()] == [120, 15, 40]
    expected = np.array([120, 15, 40]) ** 0.5 / (np.array([120, 15, 40]) ** 0.5).sum()
    np.testing.assert_allclose([r["target"] for r in rates.values()], expected)
    np.testing.assert_allclose([r["realised"] for r in rates.values()], expected, atol=0.01)
    assert "en-yo" in p.rates_table() and p.stats["en-de"]["examples"] == 120


@pytest.mark.parametrize("packing", [True, False])
def test_rows_hold_whole_unpacked_examples(tok, data_dir, packing):
    cfg = _cfg(packing=packing)
    featurized = set()
    for d in read_directions(cfg, data_dir, split="train"):
        f = Featurizer(tok, seq_len=cfg.seq_len, prompt_template=cfg.prompt_template,
                       target_template=cfg.target_template, overlong="skip")
        for ex in d.examples:
            out = f(ex)
            if out is not None:
                featurized.add(tuple(tuple(out[k].tolist()) for k in ("inputs", "targets", "weights")))
    p = build_train_pipeline(cfg, tok, global_batch=4, base_dir=data_dir)
    segments_per_row = []
    for b in _batches(p, 5):
        for r in range(4):
            seg, pos = b["segment_ids"][r], b["positions"][r]
            n_seg = int(seg.max())
            segments_per_row.append(n_seg)
            used = seg > 0
            assert used[: used.sum()].all()  # segments first, then padding
            for k in KEYS:
                assert not b[k][r][~used].any(), k  # padding: token 0, weight 0, segment 0, position 0
            for s in range(1, n_seg + 1):
                idx = np.flatnonzero(seg == s)
                assert idx.tolist() == list(range(idx[0], idx[0] + len(idx)))
                assert pos[idx].tolist() == list(range(len(idx)))
                got = tuple(tuple(b[k][r][idx].tolist()) for k in ("inputs", "targets", "weights"))
                assert got in featurized  # same tokens and weights (none on the prompt) as unpacked
    if packing:
        assert max(segments_per_row) > 1
    else:
        assert max(segments_per_row) == 1


def test_deterministic_by_seed(tok, data_dir):
    a = _batches(build_train_pipeline(_cfg(), tok, global_batch=4, base_dir=data_dir), 4)
    b = _batches(build_train_pipeline(_cfg(), tok, global_batch=4, base_dir=data_dir), 4)
    c = _batches(build_train_pipeline(_cfg(seed=8), tok, global_batch=4, base_dir=data_dir), 4)
    _assert_same(a, b)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


@pytest.mark.parametrize("packing", [True, False])
def test_resume_from_state_is_exact(tok, data_dir, packing):
    p = build_train_pipeline(_cfg(packing=packing), tok, global_batch=4, base_dir=data_dir)
    _batches(p, 3)
    state = json.loads(json.dumps(p.get_state()))
    assert sorted(state) == [f"slot_{r}" for r in range(4)]
    expected = _batches(p, 5)
    q = build_train_pipeline(_cfg(packing=packing), tok, global_batch=4, base_dir=data_dir)
    q.set_state(state)
    _assert_same(_batches(q, 5), expected)


def test_two_processes_give_the_rows_of_one(tok, data_dir):
    one = _batches(build_train_pipeline(_cfg(), tok, global_batch=4, base_dir=data_dir), 4)
    procs = [build_train_pipeline(_cfg(), tok, global_batch=4, base_dir=data_dir, process_index=i,
                                  process_count=2) for i in range(2)]
    parts = [_batches(p, 4) for p in procs]
    for step in range(4):
        for k in KEYS:
            assert parts[0][step][k].shape == (2, 128)
            np.testing.assert_array_equal(np.concatenate([parts[0][step][k], parts[1][step][k]]), one[step][k])
    # a merged state restores each process; a process whose slots are missing refuses it
    merged = {**procs[0].get_state(), **procs[1].get_state()}
    expected = _batches(procs[1], 2)
    fresh = build_train_pipeline(_cfg(), tok, global_batch=4, base_dir=data_dir, process_index=1, process_count=2)
    fresh.set_state(merged)
    _assert_same(_batches(fresh, 2), expected)
    with pytest.raises(DataError, match=r"lacks slots \['slot_2', 'slot_3'\]"):
        fresh.set_state(procs[0].get_state())


def test_process_layout_errors(tok, data_dir):
    with pytest.raises(ValueError, match="not divisible by 3"):
        build_train_pipeline(_cfg(), tok, global_batch=4, base_dir=data_dir, process_count=3)
    with pytest.raises(ValueError, match="process_index 2"):
        build_train_pipeline(_cfg(), tok, global_batch=4, base_dir=data_dir, process_index=2, process_count=2)


def _fitting(tok, cfg, data_dir, split="train"):
    """Per direction: the featurized examples that fit (``Featurizer`` applied lazily, one by one)."""
    out = {}
    for d in read_directions(cfg, data_dir, split=split):
        f = Featurizer(tok, seq_len=cfg.seq_len, prompt_template=cfg.prompt_template,
                       target_template=cfg.target_template, overlong="skip")
        out[d.name] = [tuple(tuple(x[k].tolist()) for k in ("inputs", "targets", "weights"))
                       for x in map(f, d.examples) if x is not None]
    return out


def test_overlong_skip_up_front(tok, data_dir):
    cfg = _cfg(seq_len=64)
    fitting = _fitting(tok, cfg, data_dir)
    kept = {name: len(v) for name, v in fitting.items()}
    assert 0 < kept["en-de"] < 120 and 0 < kept["en-yo"] < 15 and kept["mono"] == 40
    p = build_train_pipeline(cfg, tok, global_batch=2, base_dir=data_dir)
    rates = {r["direction"]: r for r in p.rates}
    assert {n: r["examples"] for n, r in rates.items()} == kept
    assert rates["en-yo"]["overlong_skipped"] == 15 - kept["en-yo"] and rates["mono"]["overlong_skipped"] == 0
    sizes = np.array(list(kept.values()))  # temperature rates from the examples that are trained on
    np.testing.assert_allclose([r["target"] for r in rates.values()], sizes ** 0.5 / (sizes ** 0.5).sum())
    table = p.rates_table().splitlines()
    assert table[0].split()[:4] == ["direction", "examples", "over-long", "skipped"]
    assert table[3].split()[:3] == ["en-yo", str(kept["en-yo"]), str(15 - kept["en-yo"])]
    assert p.stats["en-de"]["overlong_skipped"] == 120 - kept["en-de"] and p.stats["en-de"]["examples"] == 120
    every = {x for v in fitting.values() for x in v}
    drawn = 0
    for b in _batches(p, 20):  # the drawn stream holds only examples that fit; none is skipped when drawn
        for r in range(2):
            seg = b["segment_ids"][r]
            for sid in range(1, int(seg.max()) + 1):
                idx = np.flatnonzero(seg == sid)
                assert tuple(tuple(b[k][r][idx].tolist()) for k in ("inputs", "targets", "weights")) in every
                drawn += 1
    assert drawn > 40 and all(s["tokenized_overlong_skipped"] == 0 for s in p.stats.values())
    # truncate: nothing dropped up front, cut when drawn (unchanged)
    t = build_train_pipeline(_cfg(seq_len=12, overlong="truncate"), tok, global_batch=2, base_dir=data_dir)
    b = next(t)
    assert [r["examples"] for r in t.rates] == [120, 15, 40] and b["weights"].sum() > 0
    assert sum(s["tokenized_truncated"] for s in t.stats.values()) > 0
    assert sum(s["overlong_skipped"] for s in t.stats.values()) == 0
    with pytest.raises(DataError, match=r"^data.train\[0\].directions\[0\]: all 120 examples of 'en-de' are "
                                        r"over-long, e.g. \S+train.en-de.tsv:2: example of \d+ tokens"):
        build_train_pipeline(_cfg(seq_len=30), tok, global_batch=2, base_dir=data_dir)


def test_overlong_error_at_build_time_names_file_and_line(tok, data_dir, tmp_path):
    cfg = _cfg(seq_len=64, overlong="error")
    f = Featurizer(tok, seq_len=64, prompt_template=cfg.prompt_template, target_template="{tgt}", overlong="skip")
    lengths = f.lengths(read_directions(cfg, data_dir, split="train")[0].examples)[:, 0]
    i = int(np.flatnonzero(lengths > 64)[0])  # the first over-long example: line i + 2 (after the header)
    with pytest.raises(OverlongError) as info:
        build_train_pipeline(cfg, tok, global_batch=2, base_dir=data_dir)
    assert str(info.value) == (
        f"{data_dir / 'train.en-de.tsv'}:{i + 2}: example of {lengths[i]} tokens > data.seq_len=64 "
        f"(data.train[0].directions[0]; {(lengths > 64).sum() - 1} more in this source; "
        f"data.overlong: skip or truncate would handle it)")
    # the line, not the example index: a blank line before it is no example
    (tmp_path / "lm.txt").write_text("short\n\n" + "a\tb\n" + " ".join(WORDS * 3) + "\nshort again\n")
    lm = (SourceConfig(type="text", task="lm", path="lm.txt", tgt_lang="de"),)
    with pytest.raises(OverlongError, match=rf"^{tmp_path / 'lm.txt'}:4: example of \d+ tokens > data.seq_len=64 "
                                            rf"\(data.train\[0\]; data.overlong"):
        build_train_pipeline(_cfg(seq_len=64, overlong="error", train=lm), tok, global_batch=2, base_dir=tmp_path)
    # dev: the whole file is checked when the batches are built, not only the examples used
    with pytest.raises(OverlongError, match=rf"^{data_dir / 'dev.en-de.tsv'}:{i + 2}: "):
        build_dev_batches(cfg, tok, batch_size=1, base_dir=data_dir, max_batches=1)


def test_dev_batches(tok, data_dir, caplog):
    cfg = _cfg(seq_len=128)  # long enough that no dev example is skipped
    dev = build_dev_batches(cfg, tok, batch_size=8, base_dir=data_dir, max_batches=20)
    assert list(dev) == ["en-de", "en-yo"] and "over-long" not in caplog.text
    batches = dev["en-de"]
    assert len(batches) == 15 and all(b[k].shape == (8, 128) for b in batches for k in KEYS)  # 120 examples
    again = build_dev_batches(cfg, tok, batch_size=8, base_dir=data_dir, max_batches=2)["en-de"]
    _assert_same(again, batches[:2])  # first examples in file order
    ex = read_directions(cfg, data_dir, split="dev")[0].examples[0]
    f = Featurizer(tok, seq_len=128, prompt_template=cfg.prompt_template, target_template="{tgt}", overlong="skip")
    first = f(ex)
    n = len(first["inputs"])
    np.testing.assert_array_equal(batches[0]["inputs"][0, :n], first["inputs"])
    np.testing.assert_array_equal(batches[0]["weights"][0, :n], first["weights"])
    assert batches[0]["segment_ids"][0].tolist() == [1] * n + [0] * (128 - n)
    yo = dev["en-yo"]  # 15 examples: the second batch has 7 real rows, 1 all-zero row
    assert len(yo) == 2 and yo[1]["segment_ids"][:7].all(axis=1).sum() == 0
    assert yo[1]["weights"][:7].any(axis=1).all() and not any(yo[1][k][7].any() for k in KEYS)
