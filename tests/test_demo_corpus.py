"""Tests for the offline CLDR/num2words parallel demo corpus."""

from __future__ import annotations

import json
import unicodedata
from importlib.metadata import version
from pathlib import Path

import babel
import pytest

from jaxft.demo.corpus import DEMO_LANGUAGES, GENERATORS, build_corpus

SPLITS = ("train", "dev", "test")
SMALL = {"n_train": 120, "n_dev": 30, "n_test": 30}


def _read(path: Path) -> list[str]:
    raw = path.read_bytes().decode("utf-8")
    assert raw.endswith("\n")
    return raw[:-1].split("\n")


def _scripts(text: str) -> set[str]:
    """First word of the Unicode name of every letter, e.g. LATIN, CYRILLIC, ARABIC, HANGUL, CJK."""
    out = set()
    for ch in text:
        if unicodedata.category(ch).startswith("L"):
            name = unicodedata.name(ch, "")
            out.add("CJK" if name.startswith(("CJK", "HIRAGANA", "KATAKANA")) else name.split(" ")[0])
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo_corpus")
    return out, build_corpus(out, seed=0, **SMALL)


def test_files_exist_with_exact_counts(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    for split in SPLITS:
        for lang in DEMO_LANGUAGES:
            lines = _read(out / f"{split}.{lang}")
            assert len(lines) == SMALL[f"n_{split}"], (split, lang)
            for line in lines:
                assert line and line == line.strip()
                assert "\t" not in line and "\r" not in line
                assert unicodedata.normalize("NFC", line) == line


def test_language_and_script_coverage(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    assert len(DEMO_LANGUAGES) >= 8
    assert len({code.split("_")[1] for code in DEMO_LANGUAGES}) >= 4
    found: set[str] = set()
    for lang in DEMO_LANGUAGES:
        found |= _scripts((out / f"train.{lang}").read_text(encoding="utf-8"))
    assert {"LATIN", "CYRILLIC", "ARABIC", "HEBREW", "CJK", "HANGUL"} <= found


@pytest.mark.parametrize("lang,script", [("rus_Cyrl", "CYRILLIC"), ("ukr_Cyrl", "CYRILLIC"),
                                         ("arb_Arab", "ARABIC"), ("heb_Hebr", "HEBREW"),
                                         ("jpn_Jpan", "CJK"), ("kor_Hang", "HANGUL"), ("tha_Thai", "THAI")])
def test_native_script_in_most_lines(corpus: tuple[Path, dict], lang: str, script: str) -> None:
    out, _ = corpus
    lines = _read(out / f"train.{lang}")
    native = sum(script in _scripts(line) for line in lines)
    assert native >= 0.8 * len(lines), (lang, native)


def test_line_aligned(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    for split in SPLITS:
        eng = _read(out / f"{split}.eng_Latn")
        for lang in DEMO_LANGUAGES:
            other = _read(out / f"{split}.{lang}")
            assert len(other) == len(eng)
        deu, fra = _read(out / f"{split}.deu_Latn"), _read(out / f"{split}.fra_Latn")
        assert sum(d != f for d, f in zip(deu, fra)) > 0.9 * len(deu)
    # Same spec rendered in every language: digit-free English lines stay digit-free in German.
    eng, deu = _read(out / "train.eng_Latn"), _read(out / "train.deu_Latn")
    for e, d in zip(eng, deu):
        e_digits = sorted(c for c in e if c.isdigit())
        d_digits = sorted(c for c in d if c.isdigit())
        if "AM" not in e and "PM" not in e:  # 12h vs 24h clocks change digits
            assert e_digits == d_digits, (e, d)


def test_no_overlap_between_splits(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    train = set(_read(out / "train.eng_Latn"))
    dev = _read(out / "dev.eng_Latn")
    test = _read(out / "test.eng_Latn")
    assert len(train) == SMALL["n_train"]  # unique within train, too
    assert not train & set(dev) and not train & set(test) and not set(dev) & set(test)


def test_generators_are_mixed(corpus: tuple[Path, dict]) -> None:
    _, manifest = corpus
    used = manifest["generator_counts"]
    assert sum(used.values()) == sum(SMALL.values())
    assert sum(v > 0 for v in used.values()) >= 8


def test_manifest(corpus: tuple[Path, dict]) -> None:
    out, manifest = corpus
    on_disk = json.loads((out / "MANIFEST.json").read_text(encoding="utf-8"))
    assert on_disk == manifest
    assert manifest["seed"] == 0
    assert manifest["languages"] == DEMO_LANGUAGES
    assert manifest["scripts"]["rus_Cyrl"] == "Cyrl"
    assert manifest["counts"] == {"train": 120, "dev": 30, "test": 30}
    assert manifest["generators"] == sorted(GENERATORS)
    assert manifest["babel_version"] == babel.__version__
    assert manifest["num2words_version"] == version("num2words")


def test_deterministic_and_idempotent(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    build_corpus(a, seed=3, n_train=40, n_dev=10, n_test=10)
    build_corpus(b, seed=3, n_train=40, n_dev=10, n_test=10)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # Idempotent: same parameters -> nothing rewritten.
    stamp = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    (a / "train.eng_Latn").write_text("sentinel\n", encoding="utf-8")
    sentinel_mtime = (a / "train.eng_Latn").stat().st_mtime_ns
    again = build_corpus(a, seed=3, n_train=40, n_dev=10, n_test=10)
    assert again == json.loads((a / "MANIFEST.json").read_text(encoding="utf-8"))
    assert (a / "train.eng_Latn").read_text(encoding="utf-8") == "sentinel\n"
    assert (a / "train.eng_Latn").stat().st_mtime_ns == sentinel_mtime
    assert (a / "MANIFEST.json").stat().st_mtime_ns == stamp["MANIFEST.json"]
    # Different parameters -> rebuilt.
    build_corpus(a, seed=3, n_train=41, n_dev=10, n_test=10)
    assert len(_read(a / "train.eng_Latn")) == 41


def test_different_seeds_differ(tmp_path: Path) -> None:
    build_corpus(tmp_path / "s0", seed=0, n_train=30, n_dev=5, n_test=5)
    build_corpus(tmp_path / "s1", seed=1, n_train=30, n_dev=5, n_test=5)
    assert _read(tmp_path / "s0" / "train.eng_Latn") != _read(tmp_path / "s1" / "train.eng_Latn")


def test_language_subset_and_validation(tmp_path: Path) -> None:
    manifest = build_corpus(tmp_path, n_train=10, n_dev=2, n_test=2, languages=["rus_Cyrl", "eng_Latn"])
    assert list(manifest["languages"]) == ["rus_Cyrl", "eng_Latn"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["MANIFEST.json"] + [f"{s}.{lang}" for s in SPLITS for lang in ("rus_Cyrl", "eng_Latn")])
    assert any("CYRILLIC" in _scripts(line) for line in _read(tmp_path / "train.rus_Cyrl"))
    with pytest.raises(ValueError):
        build_corpus(tmp_path / "bad", languages=["xxx_Latn"])
