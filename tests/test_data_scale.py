"""Data at scale: the cached line index, constant-memory shuffling, lazy over-long
handling and worker processes (identical batches, exact resume)."""

import json
import os
import pickle
import random

import numpy as np
import pytest

from jaxft.config.schema import DataConfig, SourceConfig, TokenizerConfig
from jaxft.data import index as index_mod
from jaxft.data import mixture as mixture_mod
from jaxft.data.mixture import EpochShuffled, FeistelPermutation
from jaxft.data.pipeline import build_train_pipeline
from jaxft.data.sources import DataError, open_source, read_source
from jaxft.data.tasks import OverlongError
from jaxft.data.tokenizer import train_tokenizer

WORDS = "the a cat dog house runs blue green quick slow river Haus Katze blau ilé ajá".split()


def _sentence(rng, hi=10):
    return " ".join(rng.choices(WORDS, k=rng.randint(1, hi)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    for direction, n in [("en-de", 150), ("en-yo", 20)]:
        rows = "".join(f"{_sentence(rng)}\t{_sentence(rng)}\n" for _ in range(n))
        (d / f"train.{direction}.tsv").write_text("src\ttgt\n" + rows)
    (d / "long.txt").write_text("".join(_sentence(rng, 40) + "\n" for _ in range(60)))
    return d


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(1)
    texts = [_sentence(rng) for _ in range(500)] + ["Translate from English to German Yoruba"] * 20
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t.model",
                           TokenizerConfig(train_vocab_size=300, model_type="bpe"))


def _cfg(**kw):
    train = (SourceConfig(type="tsv", path="train.{src}-{tgt}.tsv", directions=("en-de", "en-yo")),)
    base = dict(train=train, seq_len=128, temperature=2.0, seed=3, prompt_template="{src_name} to {tgt_name}: {src} =")
    return DataConfig(**{**base, **kw})


def _same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------ the index


def _tsv_source(path, name="d"):
    return SourceConfig(type="tsv", path=str(path), src_lang="en", tgt_lang="de", name=name)


def test_index_random_access_matches_sequential_read_and_names_lines(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_bytes(b"en\tde\nHi\tHallo\nbad line\n\n\xff\tx\ncat\tKatze\r\n")
    src = open_source(_tsv_source(p), key="data.train[0]")
    exs, _ = read_source(_tsv_source(p))
    assert len(src) == 2 and [src[i] for i in range(2)] == exs
    assert (src[1].src, src[1].tgt) == ("cat", "Katze")
    assert src.where(0) == f"{p}:2" and src[1].where == f"{p}:6"
    assert src.stats.skipped == {"columns": 1, "blank": 1, "utf8": 1} and src.stats.records == 5
    with pytest.raises(IndexError):
        src[2]
    clone = pickle.loads(pickle.dumps(src))  # what a worker process receives
    assert [clone[i] for i in range(2)] == exs


def test_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    p = tmp_path / "d.tsv"
    p.write_text("en\tde\n" + "".join(f"s{i}\tt{i}\n" for i in range(50)))
    first = open_source(_tsv_source(p))
    meta = first.index_path.with_suffix(".json")
    assert first.index_path.is_file() and json.loads(meta.read_text())["examples"] == 50
    assert first.index_path.stat().st_size == 50 * index_mod.SINGLE.itemsize

    def no_build(*a, **k):
        raise AssertionError("rebuilt a cached index")

    with monkeypatch.context() as m:  # a second open reads only the .json: no parse
        m.setattr(index_mod.LineSource, "_build", no_build)
        again = open_source(_tsv_source(p))
        assert len(again) == 50 and again[49].tgt == "t49"
    p.write_text("en\tde\n" + "".join(f"s{i}\tu{i}\n" for i in range(70)))  # edited: new size and content
    changed = open_source(_tsv_source(p))
    assert len(changed) == 70 and changed[0].tgt == "u0"
    assert changed.index_path != first.index_path and not first.index_path.exists()
    # a changed field mapping is another index, of the same file
    swapped = open_source(SourceConfig(type="tsv", path=str(p), src_lang="en", tgt_lang="de", name="d",
                                       src_field="de", tgt_field="en"))
    assert swapped[0].src == "u0" and swapped.index_path != changed.index_path


def test_index_dir_setting_and_unwritable_cache(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("en\tde\na\tb\n")
    src = open_source(_tsv_source(p), index_dir=str(tmp_path / "idx"))
    assert src.index_path.parent == tmp_path / "idx"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match=r"cannot write the line index of .*d.tsv.*data.index_dir"):
        open_source(_tsv_source(p), index_dir=str(blocker / "sub"))


def test_text_pair_index_and_jsonl_index(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\n\nfour\n")
    (tmp_path / "a.de").write_text("eins\nzwei\n\nvier\n")
    src = open_source(SourceConfig(type="text", src_path=str(tmp_path / "a.en"), tgt_path=str(tmp_path / "a.de"),
                                   src_lang="en", tgt_lang="de", name="p"))
    assert [(src[i].src, src[i].tgt) for i in range(len(src))] == [("one", "eins"), ("two", "zwei"), ("four", "vier")]
    assert src.where(2) == f"{tmp_path / 'a.en'}:4 / {tmp_path / 'a.de'}:4"
    (tmp_path / "x.jsonl").write_text('{"inputs": "Q", "targets": "A"}\n[1]\n{"inputs": "Q2", "targets": "A2"}\n')
    js = open_source(SourceConfig(type="jsonl", task="prompt", path=str(tmp_path / "x.jsonl"), name="x"))
    assert [js[i].tgt for i in range(len(js))] == ["A", "A2"] and js.stats.skipped == {"json": 1}


# ------------------------------------------------------------ shuffling


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n):
    p = FeistelPermutation(n, [5, 0])
    assert sorted(p[i] for i in range(n)) == list(range(n))
    if n >= 64:
        assert [p[i] for i in range(n)] != list(range(n))
        assert [FeistelPermutation(n, [5, 1])[i] for i in range(n)] != [p[i] for i in range(n)]


def test_large_sources_shuffle_without_a_table(monkeypatch):
    monkeypatch.setattr(mixture_mod, "PERMUTATION_TABLE_MAX", 10)
    s = EpochShuffled(range(100), seed=4)
    epoch0, epoch1 = [s[i] for i in range(100)], [s[i] for i in range(100, 200)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(100)) and epoch0 != epoch1
    assert isinstance(s._perm(0), FeistelPermutation)
    assert [pickle.loads(pickle.dumps(s))[i] for i in range(100)] == epoch0


# --------------------------------------------------- lazy over-long handling


def test_sources_above_the_scan_limit_skip_over_long_examples_when_drawn(tok, data_dir):
    lm = (SourceConfig(type="text", task="lm", path="long.txt", tgt_lang="de"),)
    scanned = build_train_pipeline(_cfg(train=lm, seq_len=48), tok, global_batch=2, base_dir=data_dir)
    lazy = build_train_pipeline(_cfg(train=lm, seq_len=48, overlong_scan=10), tok, global_batch=2,
                                base_dir=data_dir)
    n_over = scanned.directions[0].overlong_skipped
    assert 0 < n_over < 60 and scanned.rates[0]["examples"] == 60 - n_over
    assert lazy.directions[0].overlong_skipped == 0 and lazy.rates[0]["examples"] == 60  # records: not scanned
    for _ in range(20):
        next(lazy)
    counts = lazy.counts()[0]
    assert counts["overlong_skipped"] > 0 and counts["examples"] > 0
    assert lazy.stats["long"]["tokenized_overlong_skipped"] == counts["overlong_skipped"]
    error = build_train_pipeline(_cfg(train=lm, seq_len=48, overlong_scan=10, overlong="error"), tok,
                                 global_batch=2, base_dir=data_dir)
    with pytest.raises(OverlongError, match=rf"^{data_dir / 'long.txt'}:\d+: source 'long"):
        for _ in range(20):
            next(error)


# ------------------------------------------------------------------ workers


def test_workers_give_identical_batches_and_resume_exactly(tok, data_dir):
    ref = build_train_pipeline(_cfg(), tok, global_batch=4, base_dir=data_dir)
    expected = [next(ref) for _ in range(8)]
    two = build_train_pipeline(_cfg(workers=2, prefetch=3), tok, global_batch=4, base_dir=data_dir)
    try:
        got = [next(two) for _ in range(4)]
        state = two.get_state()
        assert json.loads(json.dumps(state)) == state
    finally:
        two.close()
    _same(got, expected[:4])
    one = build_train_pipeline(_cfg(workers=1), tok, global_batch=4, base_dir=data_dir)
    one.set_state(state)  # resumed with another worker count
    try:
        _same([next(one) for _ in range(4)], expected[4:])
        assert sum(c["examples"] for c in one.counts()) > 0  # the workers' counts reach the main process
    finally:
        one.close()
    zero = build_train_pipeline(_cfg(), tok, global_batch=4, base_dir=data_dir)
    zero.set_state(state)
    _same([next(zero) for _ in range(4)], expected[4:])


def test_a_worker_error_reaches_the_main_process(tok, data_dir):
    lm = (SourceConfig(type="text", task="lm", path="long.txt", tgt_lang="de"),)
    p = build_train_pipeline(_cfg(train=lm, seq_len=48, overlong_scan=10, overlong="error", workers=1), tok,
                             global_batch=2, base_dir=data_dir)
    try:
        with pytest.raises(OverlongError, match=rf"{data_dir / 'long.txt'}:\d+"):
            for _ in range(20):
                next(p)
        assert not p._pool or not p._pool.procs
    finally:
        p.close()


def test_closing_the_pipeline_stops_its_workers(tok, data_dir):
    p = build_train_pipeline(_cfg(workers=2), tok, global_batch=4, base_dir=data_dir)
    next(p)
    procs = list(p._pool.procs)
    assert all(proc.is_alive() for proc in procs)
    state = p.get_state()
    p.close()
    assert not any(proc.is_alive() for proc in procs)
    assert p.get_state() == state  # a later next() restarts from the consumed position
    ref = build_train_pipeline(_cfg(), tok, global_batch=4, base_dir=data_dir)
    next(ref)
    try:
        _same([next(p)], [next(ref)])
    finally:
        p.close()
    assert os.getpid()  # the test process itself is untouched


def test_token_lengths_of_the_over_long_scan_are_cached(tok, data_dir, monkeypatch):
    from jaxft.data import directions as directions_mod

    lm = (SourceConfig(type="text", task="lm", path="long.txt", tgt_lang="de"),)
    first = build_train_pipeline(_cfg(train=lm, seq_len=48), tok, global_batch=2, base_dir=data_dir)
    expected = [next(first) for _ in range(3)]

    def no_scan(*a, **k):
        raise AssertionError("tokenized the source again")

    with monkeypatch.context() as m:  # a restart reads the cached lengths
        m.setattr(directions_mod, "example_lengths", no_scan)
        again = build_train_pipeline(_cfg(train=lm, seq_len=48), tok, global_batch=2, base_dir=data_dir)
        assert again.directions[0].overlong_skipped == first.directions[0].overlong_skipped > 0
        _same([next(again) for _ in range(3)], expected)
        with pytest.raises(AssertionError, match="tokenized"):  # another setting: measured again
            build_train_pipeline(_cfg(train=lm, seq_len=48, prompt_template="{src}"), tok, global_batch=2,
                                 base_dir=data_dir)


def test_missing_indexes_are_built_in_parallel_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(index_mod, "PARALLEL_BUILD_BYTES", 0)
    monkeypatch.setattr(index_mod.os, "cpu_count", lambda: 2)
    srcs = []
    for lang in ("de", "fr", "yo"):
        (tmp_path / f"en-{lang}.tsv").write_text("en\tx\n" + "".join(f"s{i}\t{lang}{i}\n" for i in range(30)))
        srcs.append((SourceConfig(type="tsv", path=str(tmp_path / f"en-{lang}.tsv"), src_lang="en", tgt_lang=lang,
                                  name=f"en-{lang}"), f"data.train[{len(srcs)}]"))
    def no_build(self, *a):
        raise AssertionError("built in this process")

    monkeypatch.setattr(index_mod.LineSource, "_build", no_build)  # worker processes are not patched
    index_mod.build_indexes(srcs, "skip", str(tmp_path / "idx"))
    opened = [open_source(s, key=k, index_dir=str(tmp_path / "idx")) for s, k in srcs]  # cached: no build
    assert [o[29].tgt for o in opened] == ["de29", "fr29", "yo29"]
    (tmp_path / "bad.tsv").write_text("en\tx\nonly one column\n")
    bad = SourceConfig(type="tsv", path=str(tmp_path / "bad.tsv"), src_lang="en", tgt_lang="de", name="bad")
    (tmp_path / "ok.tsv").write_text("en\tx\na\tb\n")
    ok = SourceConfig(type="tsv", path=str(tmp_path / "ok.tsv"), src_lang="en", tgt_lang="de", name="ok")
    with pytest.raises(DataError, match=r"bad.tsv: no usable examples.*data.train\[7\]"):
        index_mod.build_indexes([(ok, "data.train[6]"), (bad, "data.train[7]")], "skip", str(tmp_path / "idx"))
