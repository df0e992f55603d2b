"""Readers and the bad-input policy table of jaxft.data.sources."""

import json
import logging
import sys

import pytest

from jaxft.config.schema import SourceConfig
from jaxft.data import sources as sources_mod
from jaxft.data.sources import DataError, Example, expand_sources, keyed_sources, read_source


def _write(path, data: bytes | str):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _tsv(tmp_path, body, **kw):
    p = _write(tmp_path / "d.tsv", body)
    return SourceConfig(type="tsv", path=str(p), src_lang="en", tgt_lang="de", name="en-de", **kw)


# ------------------------------------------------------------------ expansion


def test_expand_directions_substitutes_paths_and_names(tmp_path):
    src = SourceConfig(type="text", src_path="data/{split}.{src}-{tgt}.{src}",
                       tgt_path="/abs/{src}-{tgt}.{tgt}", directions=("en-de", "eng_Latn-zho_Hant", "zh-Hant-en"))
    out = expand_sources([src], tmp_path, split="train")
    assert [(s.src_lang, s.tgt_lang, s.name) for s in out] == [
        ("en", "de", "en-de"), ("eng_Latn", "zho_Hant", "eng_Latn-zho_Hant"), ("zh-Hant", "en", "zh-Hant-en")]
    assert out[0].src_path == str(tmp_path / "data" / "train.en-de.en")
    assert out[0].tgt_path == "/abs/en-de.de" and out[0].directions == ()
    # zh-Hant|pt-BR or zh-Hant-PT|br (Breton): refuse to guess.
    with pytest.raises(DataError, match=r"directions\[0\]: direction 'zh-Hant-pt-BR' is ambiguous"):
        expand_sources([SourceConfig(path="x.tsv", directions=("zh-Hant-pt-BR",))], tmp_path)


def test_expand_default_name_is_file_stem_and_duplicates_are_errors(tmp_path):
    lm = SourceConfig(type="text", task="lm", path="mono/yo_news.txt")
    assert expand_sources([lm], tmp_path)[0].name == "yo_news"
    with pytest.raises(DataError, match=r"data.dev\[1\].*'yo_news'.*data.dev\[0\]"):
        expand_sources([lm, lm], tmp_path, section="data.dev")


@pytest.mark.parametrize(
    "src,key",
    [
        (SourceConfig(path="x.tsv", directions=("en-de", "en-xx")), r"data.train\[0\].directions\[1\]"),
        (SourceConfig(path="x.tsv", src_lang="en", tgt_lang="klingon"), r"data.train\[0\].tgt_lang"),
        (SourceConfig(path="x.tsv", src_lang="qq", tgt_lang="de"), r"data.train\[0\].src_lang"),
    ],
)
def test_unknown_language_code_error_names_the_key(tmp_path, src, key):
    with pytest.raises(DataError, match=key) as e:
        expand_sources([SourceConfig(path="ok.tsv", src_lang="en", tgt_lang="de"), src][1:], tmp_path)
    assert "\n" not in str(e.value)


def test_translation_needs_languages_and_text_needs_paths(tmp_path):
    with pytest.raises(DataError, match=r"data.train\[0\]: translation needs src_lang"):
        expand_sources([SourceConfig(path="x.tsv")], tmp_path)
    with pytest.raises(DataError, match=r"data.train\[0\]: type text needs"):
        expand_sources([SourceConfig(type="text", src_path="a", src_lang="en", tgt_lang="de")], tmp_path)


# ------------------------------------------------------------------------ TSV


def test_tsv_header_columns_bom_and_whitespace(tmp_path):
    body = "\ufeffid\tEnglish\tGerman\n1\t  Hello \t\ufeffHallo\r\n\ufeff2\tcat\t Katze \n\n"
    exs, stats = read_source(_tsv(tmp_path, body, src_field="English", tgt_field="German"))
    assert exs == [Example("Hello", "Hallo", "en", "de", "translation"), Example("cat", "Katze", "en", "de", "translation")]
    assert stats.examples == 2 and stats.skipped == {"blank": 1}


def test_tsv_default_columns_are_first_two_and_max_examples(tmp_path):
    body = "a\tb\n" + "".join(f"s{i}\tt{i}\n" for i in range(10))
    exs, _ = read_source(_tsv(tmp_path, body, max_examples=3))
    assert [(e.src, e.tgt) for e in exs] == [("s0", "t0"), ("s1", "t1"), ("s2", "t2")]


def test_tsv_without_header_uses_column_numbers(tmp_path):
    exs, _ = read_source(_tsv(tmp_path, "x\ty\tz\n", header=False, src_field="2", tgt_field="0"))
    assert (exs[0].src, exs[0].tgt) == ("z", "x")


BAD_TSV = (
    b"en\tde\n"
    b"good\tgut\n"
    b"too\tmany\tcolumns\n"  # line 3
    b"\xff\xfe broken\tkaputt\n"  # line 4: invalid UTF-8
    b"only one column\n"  # line 5
    b"\tempty source\n"  # line 6
    b"\n"  # line 7: blank, not an error
    b"fine\tgut\n"
)


def test_tsv_malformed_lines_are_counted_skips(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxft.data"):
        exs, stats = read_source(_tsv(tmp_path, BAD_TSV), key="data.train[0]")
    assert [(e.src, e.tgt) for e in exs] == [("good", "gut"), ("fine", "gut")]
    assert stats.skipped == {"columns": 2, "utf8": 1, "empty": 1, "blank": 1}
    assert stats.records == 7 and stats.examples == 2
    logged = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(logged) == 3  # only the first 3 per file
    assert f"{tmp_path / 'd.tsv'}:3: wrong number of columns" in logged[0]
    assert ":4: invalid UTF-8" in logged[1]


@pytest.mark.parametrize("line,reason", [(3, "wrong number of columns"), (4, "invalid UTF-8"),
                                         (6, "empty source or target")])
def test_tsv_malformed_line_with_bad_lines_error(tmp_path, line, reason):
    lines = BAD_TSV.split(b"\n")
    body = b"\n".join(lines[:2] + [lines[line - 1]]) + b"\n"
    with pytest.raises(DataError) as e:
        read_source(_tsv(tmp_path, body), key="data.train[2]", bad_lines="error")
    msg = str(e.value)
    assert f"{tmp_path / 'd.tsv'}:3: {reason}" in msg and "data.train[2]" in msg and "\n" not in msg


def test_tsv_missing_column_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"column 'Yoruba' not in header \['English', 'German'\].*data.dev\[0\].tgt_field"):
        read_source(_tsv(tmp_path, "English\tGerman\na\tb\n", tgt_field="Yoruba"), key="data.dev[0]")


@pytest.mark.parametrize("body", ["", "\n\n  \n", "en\tde\n"])
def test_empty_file_is_an_error(tmp_path, body):
    with pytest.raises(DataError, match=r"d.tsv: file is empty.*data.train\[0\]"):
        read_source(_tsv(tmp_path, body), key="data.train[0]")


def test_missing_file_is_an_error(tmp_path):
    src = SourceConfig(path=str(tmp_path / "nope.tsv"), src_lang="en", tgt_lang="de", name="x")
    with pytest.raises(DataError, match=r"nope.tsv: file does not exist \(data.train\[0\]\)"):
        read_source(src, key="data.train[0]")


def test_all_lines_bad_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"no usable examples.*columns"):
        read_source(_tsv(tmp_path, "a\tb\n1\t2\t3\n"))


# ---------------------------------------------------------------------- JSONL


def _jsonl(tmp_path, records, **kw):
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    p = _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    return SourceConfig(type="jsonl", path=str(p), name="d", **kw)


def test_jsonl_translation_default_fields_and_nested(tmp_path):
    src = _jsonl(tmp_path, [{"src": " Hi ", "tgt": "Hallo"}, "{broken", [1, 2], {"src": "x"},
                            {"src": "a", "tgt": 3}], src_lang="en", tgt_lang="de")
    exs, stats = read_source(src)
    assert [(e.src, e.tgt) for e in exs] == [("Hi", "Hallo")]
    assert stats.skipped == {"json": 2, "field": 2}
    nested = _jsonl(tmp_path, [{"translation": {"en": "Hi", "de": "Hallo"}}], src_lang="en", tgt_lang="de")
    assert read_source(nested)[0][0].tgt == "Hallo"


def test_jsonl_prompt_xp3_and_alpaca(tmp_path):
    exs, _ = read_source(_jsonl(tmp_path, [{"inputs": "Q?", "targets": "A."}], task="prompt"))
    assert (exs[0].src, exs[0].tgt, exs[0].task) == ("Q?", "A.", "prompt")
    alpaca = [{"instruction": "Translate.", "input": "cat", "output": "Katze"},
              {"instruction": "Say hi.", "input": "", "output": "hi"}]
    exs, _ = read_source(_jsonl(tmp_path, alpaca, task="prompt"))
    assert [(e.src, e.tgt) for e in exs] == [("Translate.\n\ncat", "Katze"), ("Say hi.", "hi")]


def test_jsonl_missing_field_in_first_record_is_an_error(tmp_path):
    src = _jsonl(tmp_path, [{"en": "a", "de": "b"}], src_lang="en", tgt_lang="de", src_field="source")
    with pytest.raises(DataError, match=r"d.jsonl:1: record lacks .*keys: \['de', 'en'\].*data.train\[0\].src_field"):
        read_source(src, key="data.train[0]")


def test_jsonl_bad_json_with_bad_lines_error(tmp_path):
    src = _jsonl(tmp_path, [{"src": "a", "tgt": "b"}, "{nope"], src_lang="en", tgt_lang="de")
    with pytest.raises(DataError, match=r"d.jsonl:2: not a JSON object"):
        read_source(src, bad_lines="error")


# ----------------------------------------------------------------------- text


def test_text_pairs_and_line_count_mismatch(tmp_path):
    _write(tmp_path / "a.en", "one\n\ntwo\nthree\n")
    _write(tmp_path / "a.de", b"eins\n\n\xc3\x28\ndrei\n")
    src = SourceConfig(type="text", src_path=str(tmp_path / "a.en"), tgt_path=str(tmp_path / "a.de"),
                       src_lang="en", tgt_lang="de", name="p")
    exs, stats = read_source(src)
    assert [(e.src, e.tgt) for e in exs] == [("one", "eins"), ("three", "drei")]
    assert stats.skipped == {"blank": 1, "utf8": 1}
    _write(tmp_path / "a.de", "eins\nzwei\n")
    with pytest.raises(DataError, match=r"a.en: has 4 lines but .*a.de has 2"):
        read_source(src)


def test_monolingual_text_for_lm(tmp_path):
    _write(tmp_path / "yo.txt", "Ẹ kú àárọ̀\n\nÒjò ń rọ̀\n")
    src = expand_sources([SourceConfig(type="text", task="lm", path="yo.txt", tgt_lang="yo")], tmp_path)[0]
    exs, _ = read_source(src)
    assert [(e.src, e.tgt, e.task) for e in exs] == [("", "Ẹ kú àárọ̀", "lm"), ("", "Òjò ń rọ̀", "lm")]


# ----------------------------------------------------------------------- TFDS


def _make_tiny_tfds(data_dir):
    """A real array_record TFDS dataset, written without tensorflow."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class JaxftTinyTranslation(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            feats = tfds.features.FeaturesDict({"en": tfds.features.Text(), "yo": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=feats)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                yield i, {"en": f"good morning {i}", "yo": f"ẹ kú àárọ̀ {i}" if i != 3 else " "}

    JaxftTinyTranslation(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_array_record_source(tmp_path):
    _make_tiny_tfds(tmp_path / "tfds")
    src = SourceConfig(type="tfds", tfds_name="jaxft_tiny_translation", tfds_split="train",
                       tfds_data_dir=str(tmp_path / "tfds"), src_lang="en", tgt_lang="yo")
    src = expand_sources([src], tmp_path)[0]
    exs, stats = read_source(src)
    assert sorted((e.src, e.tgt) for e in exs) == [(f"good morning {i}", f"ẹ kú àárọ̀ {i}") for i in (0, 1, 2, 4, 5)]
    assert stats.skipped == {"empty": 1} and src.name == "en-yo"


def test_tfds_reader_with_fake_data_source(tmp_path, monkeypatch):
    """The `data_source` interface: len() and [i] -> dict of bytes (no files)."""
    calls = {}

    class FakeTfds:
        @staticmethod
        def data_source(name, split, data_dir):
            calls.update(name=name, split=split, data_dir=data_dir)
            return [{"inputs": b"Q1", "targets": b"A1"}, {"inputs": b"\xff", "targets": b"A2"}]

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", FakeTfds)
    src = SourceConfig(type="tfds", task="prompt", tfds_name="xp3x/{split}", tfds_split="validation", name="x")
    src = expand_sources([src], tmp_path, split="dev")[0]
    exs, stats = read_source(src)
    assert calls == {"name": "xp3x/dev", "split": "validation", "data_dir": None}
    assert [(e.src, e.tgt) for e in exs] == [("Q1", "A1")] and stats.skipped == {"utf8": 1}


def test_tfds_missing_dataset_is_one_line_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    src = SourceConfig(type="tfds", tfds_name="jaxft_does_not_exist", tfds_data_dir=str(tmp_path),
                       src_lang="en", tgt_lang="de", name="x")
    with pytest.raises(DataError, match=r"tfds:jaxft_does_not_exist\[train\]: cannot open.*\(data.train\[0\]\)"):
        read_source(src, key="data.train[0]")


# ---------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_menyo20k_dev_tsv(shared_data):
    src = SourceConfig(type="tsv", path="menyo20k/{split}.tsv", src_lang="en", tgt_lang="yo")
    (key, src), = keyed_sources([src], shared_data, section="data.dev", split="dev")
    exs, stats = read_source(src, key=key)
    # 3397 pairs; one has a tab inside a quoted English field: counted skip, not an error.
    assert stats.records == 3397 and stats.skipped == {"columns": 1} and len(exs) == 3396
    assert all(e.src == e.src.strip() and e.tgt == e.tgt.strip() and "\ufeff" not in e.src + e.tgt for e in exs)
    assert exs[0].src.startswith("We prepare the saddle") and exs[0].tgt.startswith("A di gàárì")
    train = SourceConfig(type="tsv", path=str(shared_data / "menyo20k/train.tsv"), src_lang="en", tgt_lang="yo", name="t")
    exs, _ = read_source(train)
    assert exs[0].tgt.startswith("Ìd") and not any(e.tgt.startswith("\ufeff") for e in exs)  # BOM stripped


def test_module_docstring_documents_every_reason():
    for reason in sources_mod.REASONS:
        assert f"``{reason}``" in sources_mod.__doc__
