"""The tokenizer's training sample: per-language pools, temperature quotas with
water-filling, seeded O(k) sampling (jaxft.data.tokenizer_sample)."""

import json
import logging
import tracemalloc
from collections import Counter

import numpy as np
import pytest

from jaxft.config.schema import DataConfig, SourceConfig, TokenizerConfig
from jaxft.data import tokenizer_sample as ts
from jaxft.data.readers import Skipped
from jaxft.data.tokenizer import Tokenizer, train_tokenizer
from jaxft.data.tokenizer_sample import _LazyPermutation, pool_quotas, tokenizer_sample

WORDS = ["alpha", "beta", "gamma", "delta", "house", "river", "green", "stone", "water", "light"]

# Every text is "<pool> <source> <line> <word>": the pool it must land in comes first.
SIZES = {"en": 5050, "de": 5000, "yo": 50, "fr": 2000, "xp3": 600}


def _text(pool, source, i):
    return f"{pool} {source} {i} {WORDS[i % len(WORDS)]}"


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    # big en-de TSV, with bad lines (wrong column count, empty target) the index skips
    lines = ["en\tde"]
    for i in range(5000):
        lines.append(f"{_text('en', 'ende', i)}\t{_text('de', 'ende', i)}")
        if i % 500 == 0:
            lines.append(f"bad columns {i}\tbad\tbad")
            lines.append(f"bad empty {i}\t  ")
    (d / "en-de.tsv").write_text("\n".join(lines) + "\n")
    # small en-yo line-aligned text pair
    (d / "en-yo.en").write_text("".join(_text("en", "enyo", i) + "\n" for i in range(50)))
    (d / "en-yo.yo").write_text("".join(_text("yo", "enyo", i) + "\n" for i in range(50)))
    # monolingual French (the lm configs set src_lang)
    (d / "fr.txt").write_text("".join(_text("fr", "mono", i) + "\n" for i in range(2000)))
    # xP3-style prompts without language codes: pooled under the source's name
    (d / "xp3.jsonl").write_text("".join(
        json.dumps({"inputs": _text("xp3", "in", i), "targets": _text("xp3", "out", i)}) + "\n"
        for i in range(300)))
    return d


def _cfg(max_sentences=1000, seed=0, temperature=5.0, **tok):
    return DataConfig(
        train=(
            SourceConfig(type="tsv", path="en-de.tsv", src_lang="en", tgt_lang="de"),
            SourceConfig(type="text", src_path="en-yo.en", tgt_path="en-yo.yo", src_lang="en", tgt_lang="yo"),
            SourceConfig(type="text", task="lm", path="fr.txt", src_lang="fr", name="fr-lm"),
            SourceConfig(type="jsonl", task="prompt", path="xp3.jsonl", name="xp3"),
        ),
        tokenizer=TokenizerConfig(max_sentences=max_sentences, **tok),
        temperature=temperature,
        seed=seed,
    )


def _expected_quotas(sizes, total, temperature):
    """Water-filling computed independently: plain floats, one saturation round at a time."""
    quotas, left, active = {}, min(total, sum(sizes.values())), dict(sizes)
    while active:
        w = {k: n ** (1.0 / temperature) for k, n in active.items()}
        share = {k: left * w[k] / sum(w.values()) for k in active}
        full = [k for k in active if share[k] >= active[k]]
        if not full:
            floor = {k: int(share[k]) for k in active}
            extra = left - sum(floor.values())
            by_rem = sorted(active, key=lambda k: (-(share[k] - floor[k]), list(active).index(k)))
            for k in by_rem[:extra]:
                floor[k] += 1
            quotas.update(floor)
            break
        for k in full:
            quotas[k] = active.pop(k)
            left -= quotas[k]
    return {k: quotas.get(k, 0) for k in sizes}


def _pools_of(texts):
    return Counter(t.split(" ", 1)[0] for t in texts)


# ------------------------------------------------------------------ quotas


def test_quotas_follow_the_temperature_split_and_water_fill():
    # T=5: yo's share (~102) exceeds its 50 sentences; the other 950 go to the rest by n^(1/5)
    assert pool_quotas(SIZES, 1000, 5.0) == _expected_quotas(SIZES, 1000, 5.0) == \
        {"en": 273, "de": 272, "yo": 50, "fr": 227, "xp3": 178}
    # T=1: proportional, nothing saturates
    assert pool_quotas(SIZES, 1000, 1.0) == _expected_quotas(SIZES, 1000, 1.0) == \
        {"en": 398, "de": 394, "yo": 4, "fr": 157, "xp3": 47}
    # T=100, 3000: yo saturates first, then xp3 (its share grows past 600 once yo is out)
    q = pool_quotas(SIZES, 3000, 100.0)
    assert q == _expected_quotas(SIZES, 3000, 100.0)
    assert q["yo"] == 50 and q["xp3"] == 600 and sum(q.values()) == 3000
    # more than there is: everything, whole
    assert pool_quotas(SIZES, 10**6, 5.0) == SIZES
    assert pool_quotas(SIZES, 0, 5.0) == dict.fromkeys(SIZES, 0)
    assert pool_quotas({}, 100, 5.0) == {}


# ------------------------------------------------------------------ sampling


def test_counts_follow_quotas_and_texts_come_from_their_language(data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="jaxft.data.tokenizer_sample"):
        sample = tokenizer_sample(_cfg(), data_dir)
    assert sample.available == SIZES
    assert sample.counts == {"en": 273, "de": 272, "yo": 50, "fr": 227, "xp3": 178}
    assert len(sample.texts) == sum(sample.counts.values()) == 1000
    # every text is in the pool it was counted in, and no position was drawn twice
    assert _pools_of(sample.texts) == Counter(sample.counts)
    assert len(set(sample.texts)) == len(sample.texts)
    # the small pool (yo) is taken whole
    assert sorted(t for t in sample.texts if t.startswith("yo ")) == sorted(_text("yo", "enyo", i) for i in range(50))
    # the en pool draws from both of its sources (5000 + 50 sentences)
    en_sources = Counter(t.split()[1] for t in sample.texts if t.startswith("en "))
    assert en_sources["ende"] > 200 and sum(en_sources.values()) == 273
    # the xp3 pool holds both sides of the prompts; the lm source only its text
    assert {t.split()[1] for t in sample.texts if t.startswith("xp3 ")} == {"in", "out"}
    assert all(t.split()[1] == "mono" for t in sample.texts if t.startswith("fr "))
    # bad lines are never returned
    assert not any("bad" in t for t in sample.texts)
    # positions spread over the whole big source
    de_lines = [int(t.split()[2]) for t in sample.texts if t.startswith("de ")]
    assert min(de_lines) < 500 and max(de_lines) > 4500
    for pool, n in sample.counts.items():
        assert f"tokenizer sample: {pool} {n}/{SIZES[pool]}" in caplog.text


def test_deterministic_and_seeded(data_dir):
    a = tokenizer_sample(_cfg(), data_dir)
    b = tokenizer_sample(_cfg(), data_dir)
    assert a.texts == b.texts and a.counts == b.counts
    c = tokenizer_sample(_cfg(seed=1), data_dir)
    assert c.counts == a.counts  # quotas do not depend on the seed
    assert c.texts != a.texts
    assert set(c.texts) != set(a.texts)


def test_total_is_capped_by_what_is_available(data_dir):
    sample = tokenizer_sample(_cfg(max_sentences=10**6), data_dir)
    assert sample.counts == SIZES
    assert len(sample.texts) == len(set(sample.texts)) == sum(SIZES.values())


def test_max_examples_caps_a_pool(data_dir):
    cfg = _cfg()
    cfg = DataConfig(train=(cfg.train[0], cfg.train[1],
                            SourceConfig(type="text", task="lm", path="fr.txt", src_lang="fr", max_examples=40)),
                     tokenizer=cfg.tokenizer)
    sample = tokenizer_sample(cfg, data_dir)
    assert sample.available["fr"] == 40 and sample.counts["fr"] == 40
    assert {int(t.split()[2]) for t in sample.texts if t.startswith("fr ")} == set(range(40))
    assert len(sample.texts) == 1000


class _SkipEvery:
    """A source whose records at index % k == 0 are bad (as a lazily checked source reports them)."""

    def __init__(self, source, k):
        self.source, self.k = source, k

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return Skipped("json", f"x:{i}") if i % self.k == 0 else self.source[i]


def test_skipped_records_are_not_returned_and_are_made_up_for(data_dir, monkeypatch):
    real = ts.open_source

    def open_source(src, **kw):
        source = real(src, **kw)
        return _SkipEvery(source, 3 if src.name == "en-de" else 2 if src.name == "en-yo" else 10**9)

    monkeypatch.setattr(ts, "open_source", open_source)
    sample = tokenizer_sample(_cfg(), data_dir)
    lines = [(t.split()[1], int(t.split()[2])) for t in sample.texts]
    assert not any(src == "ende" and i % 3 == 0 for src, i in lines)
    assert not any(src == "enyo" and i % 2 == 0 for src, i in lines)
    # the big pools draw more positions to make up for the skipped ones; yo has only 25 good lines
    assert sample.counts == {"en": 273, "de": 272, "yo": 25, "fr": 227, "xp3": 178}
    assert _pools_of(sample.texts) == Counter(sample.counts)
    assert len(set(sample.texts)) == len(sample.texts)


def test_lazy_permutation_is_uniform_without_replacement_in_small_memory():
    rng = np.random.default_rng(0)
    full = _LazyPermutation(1000, rng)
    first = full.take(300)
    rest = full.take(10**6)
    assert sorted(first.tolist() + rest.tolist()) == list(range(1000)) and full.take(5).size == 0
    tracemalloc.start()
    huge = _LazyPermutation(10**12, np.random.default_rng(1)).take(20000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(set(huge.tolist())) == 20000 and huge.max() < 10**12
    assert peak < 20 * 2**20  # O(k): an arange(10**12) would be 8 TB
    # each position equally likely to be drawn first-k (chi-square-ish sanity check)
    hits = np.zeros(20, int)
    for s in range(2000):
        hits[_LazyPermutation(20, np.random.default_rng(s)).take(5)] += 1
    assert np.all(np.abs(hits - 500) < 100)


# ------------------------------------------------------------------ wiring


def test_prepare_tokenizer_trains_on_the_sample(data_dir, tmp_path, monkeypatch):
    from jaxft.train import setup

    seen = {}
    real = setup.tokenizer_sample

    def spy(cfg, base_dir):
        seen["sample"] = real(cfg, base_dir)
        return seen["sample"]

    monkeypatch.setattr(setup, "tokenizer_sample", spy)
    cfg = _cfg(max_sentences=400, train_vocab_size=120, model_type="bpe", byte_fallback=False)
    tok = setup.prepare_tokenizer(cfg, tmp_path / "run", data_dir)
    assert isinstance(tok, Tokenizer) and tok.path == str(tmp_path / "run" / "tokenizer.model")
    assert len(seen["sample"].texts) == 400 and seen["sample"].counts == _expected_quotas(SIZES, 400, 5.0)
    assert tok.decode(tok.encode("yo enyo 7 house")) == "yo enyo 7 house"
    # the same as training directly on the sample: the wiring adds nothing else
    direct = train_tokenizer(seen["sample"].texts, tmp_path / "direct.model", cfg.tokenizer)
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == (tmp_path / "direct.model").read_bytes()
    assert direct.vocab_size == tok.vocab_size
