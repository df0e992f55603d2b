"""Record sources (ArrayRecord, Parquet, Hugging Face datasets) and `jaxft data prepare`.
All data is built locally in tmp_path; the Hugging Face hub is never contacted."""

from __future__ import annotations

import json
import pickle
import re
import sys

import pytest
import yaml

from jaxft.cli import main
from jaxft.config.loader import load_config
from jaxft.config.schema import DataConfig, SourceConfig
from jaxft.data import records
from jaxft.data.prepare import prepare
from jaxft.data.sources import DataError, Example, Skipped, keyed_sources, open_source, read_source
from jaxft.outputs import OutputError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _pairs(exs):
    return [(e.src, e.tgt) for e in exs]


def _view(exs):
    return [(e.src, e.tgt, e.src_lang, e.tgt_lang, e.task) for e in exs]


def _one(src: SourceConfig, tmp_path, section="data.train"):
    (key, src), = keyed_sources([src], tmp_path, section=section)
    return key, src


# --------------------------------------------------------------- ArrayRecord


def _write_array_record(path, recs):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in recs:
        writer.write(r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode())
    writer.close()
    return path


BAD_AR = [{"src": "Hello", "tgt": "Bawo"}, b"{not json", "x".encode(), b"[1, 2]",
          b'{"src": "caf\xe9"}', {"src": "Thanks", "tgt": " "}, {"src": " Bye ", "tgt": "O dabo", "id": 7}]


def test_arrayrecord_values_and_bad_records(tmp_path):
    path = _write_array_record(tmp_path / "d.array_record", BAD_AR)
    key, src = _one(SourceConfig(type="arrayrecord", path=str(path), src_lang="en", tgt_lang="yo"), tmp_path)
    exs, stats = read_source(src, key=key)
    assert _pairs(exs) == [("Hello", "Bawo"), ("Bye", "O dabo")]  # src/tgt by default, as JSONL
    assert exs[1].where == f"{path}:6" and exs[0].src_lang == "en"
    assert stats.records == 7 and stats.skipped == {"json": 3, "utf8": 1, "empty": 1}
    source = open_source(src, key=key)
    assert isinstance(source[1], Skipped) and source[1].reason == "json" and source[4].reason == "utf8"
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: not a JSON object \(data.train\[0\];"):
        read_source(src, key=key, bad_lines="error")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: invalid UTF-8 "):
        open_source(src, key=key, bad_lines="error")[4]


def test_arrayrecord_folder_glob_fields_and_max_examples(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_array_record(shards / "part-00001.array_record", [{"en": f"b{i}", "de": f"B{i}"} for i in range(2)])
    _write_array_record(shards / "part-00000.array_record", [{"en": f"a{i}", "de": f"A{i}"} for i in range(3)])
    (shards / "notes.txt").write_text("not a shard")
    for path in (shards, shards / "part-*.array_record"):
        src = SourceConfig(type="arrayrecord", path=str(path), src_lang="en", tgt_lang="de",
                           src_field="en", tgt_field="de")
        exs, _ = read_source(src)
        assert _pairs(exs) == [("a0", "A0"), ("a1", "A1"), ("a2", "A2"), ("b0", "B0"), ("b1", "B1")]
        assert exs[4].where == f"{shards / 'part-00001.array_record'}:1"  # file:index within the file
    src = SourceConfig(type="arrayrecord", path=str(shards), src_lang="en", tgt_lang="de", src_field="en",
                       tgt_field="de", max_examples=4)
    assert len(open_source(src)) == 4
    with pytest.raises(DataError, match=r"record lacks the configured src/tgt fields \(keys: \['de', 'en'\]\)"):
        open_source(SourceConfig(type="arrayrecord", path=str(shards), src_lang="en", tgt_lang="de"))


@pytest.mark.parametrize("make,msg", [
    (lambda p: p / "missing.array_record", "does not exist"),
    (lambda p: p, "folder has no *.array_record files"),
    (lambda p: p / "nothing-*.array_record", "matches no files"),
    (lambda p: (p / "x.array_record").write_text("plain text") and p / "x.array_record", "not an ArrayRecord file"),
])
def test_arrayrecord_bad_paths_are_one_line_errors(tmp_path, make, msg):
    path = make(tmp_path)
    src = SourceConfig(type="arrayrecord", path=str(path), src_lang="en", tgt_lang="de", name="x")
    with pytest.raises(DataError, match=rf"^{re.escape(f'{path}: {msg}')}.*\(data.train\[2\]\)$") as e:
        open_source(src, key="data.train[2]")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------- Parquet


def _write_parquet(path, columns, **kw):
    pq.write_table(pa.table(columns), path, **kw)
    return path


def test_parquet_values_cache_reuse_and_rebuild(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "ARROW_BATCH_ROWS", 4)  # several batches, one short
    cache = tmp_path / "cache"
    path = _write_parquet(tmp_path / "d.parquet", {"en": [f"e{i}" for i in range(10)],
                                                    "yo": [f"y{i}" if i != 5 else None for i in range(10)],
                                                    "n": list(range(10))}, row_group_size=3)
    src = SourceConfig(type="parquet", path=str(path), src_lang="en", tgt_lang="yo", name="p")
    exs, stats = read_source(src, index_dir=str(cache))
    assert _pairs(exs) == [(f"e{i}", f"y{i}") for i in range(10) if i != 5]  # columns named by the languages
    assert stats.skipped == {"field": 1} and exs[5].where == f"{path}:6"
    converted = list(cache.glob("d.parquet.*.arrow"))
    assert len(converted) == 1
    first = converted[0].stat().st_mtime_ns

    def no_conversion(*_):
        raise AssertionError("converted again")

    with monkeypatch.context() as m:
        m.setattr(records.ParquetSource, "_convert", no_conversion)
        source = open_source(src, index_dir=str(cache))
        assert source[9] == Example("e9", "y9", "en", "yo", "translation")
    assert converted[0].stat().st_mtime_ns == first and list(cache.glob("d.parquet.*.arrow")) == converted

    _write_parquet(path, {"en": ["new"], "yo": ["titun"]})  # changed: converted again, the old file removed
    assert _pairs(read_source(src, index_dir=str(cache))[0]) == [("new", "titun")]
    again = list(cache.glob("d.parquet.*.arrow"))
    assert len(again) == 1 and again != converted


def test_parquet_folder_of_files_and_nested_translation_column(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    rows = [{"de": f"d{i}", "en": f"e{i}"} for i in range(5)]
    _write_parquet(folder / "a.parquet", {"translation": rows[:3], "id": [0, 1, 2]})
    _write_parquet(folder / "b.parquet", {"translation": rows[3:], "id": [3, 4]})
    src = SourceConfig(type="parquet", path=str(folder), src_lang="en", tgt_lang="de", name="wmt")
    exs, _ = read_source(src)
    assert _pairs(exs) == [(f"e{i}", f"d{i}") for i in range(5)]
    assert exs[3].where == f"{folder / 'b.parquet'}:0"
    _write_parquet(folder / "c.parquet", {"other": [1]})
    with pytest.raises(DataError, match=r"c.parquet: columns differ from those of .*a.parquet"):
        open_source(src)


def test_parquet_not_a_parquet_file(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: not a Parquet file .*\(data.dev\[0\]\)$"):
        open_source(SourceConfig(type="parquet", path=str(path), src_lang="en", tgt_lang="de", name="x"),
                    key="data.dev[0]")


# ------------------------------------------------------ Hugging Face datasets


@pytest.fixture
def hf(monkeypatch, tmp_path):
    """`datasets`, offline, with its cache in tmp_path."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets


def test_hf_save_to_disk_dataset_and_dataset_dict(hf, tmp_path):
    ds = hf.Dataset.from_dict({"src": ["Hello", "Thanks", "Bye"], "tgt": ["Bawo", "", "O dabo"]})
    ds.save_to_disk(str(tmp_path / "one"))
    src = SourceConfig(type="hf", path=str(tmp_path / "one"), src_lang="en", tgt_lang="yo",
                       src_field="src", tgt_field="tgt")
    key, src = _one(src, tmp_path)
    exs, stats = read_source(src, key=key)
    assert _pairs(exs) == [("Hello", "Bawo"), ("Bye", "O dabo")] and stats.skipped == {"empty": 1}
    one = re.escape(str(tmp_path / "one"))
    with pytest.raises(DataError, match=rf"^{one}:1: empty source or target text \(data.train\[0\];"):
        read_source(src, key=key, bad_lines="error")

    dd = hf.DatasetDict({"train": ds, "validation": hf.Dataset.from_dict({"src": ["Yes"], "tgt": ["Bẹẹni"]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    dev = SourceConfig(type="hf", path=str(tmp_path / "dict"), hf_split="validation", src_lang="en", tgt_lang="yo",
                       src_field="src", tgt_field="tgt")
    exs, _ = read_source(dev)
    assert _pairs(exs) == [("Yes", "Bẹẹni")] and exs[0].where == f"{tmp_path / 'dict'}[validation]:0"
    with pytest.raises(DataError, match=r"has no split 'test' \(splits: \['train', 'validation'\]\); "
                                        r"set data.dev\[0\].hf_split"):
        open_source(SourceConfig(type="hf", path=str(tmp_path / "dict"), hf_split="test", src_lang="en",
                                 tgt_lang="yo"), key="data.dev[0]")
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}: not a folder written by Dataset.save_to"):
        open_source(SourceConfig(type="hf", path=str(tmp_path), src_lang="en", tgt_lang="yo", name="x"))
    with pytest.raises(DataError, match=r"missing: does not exist"):
        open_source(SourceConfig(type="hf", path=str(tmp_path / "missing"), src_lang="en", tgt_lang="yo", name="x"))


def test_hf_name_loads_a_local_folder_with_load_dataset(hf, tmp_path):
    folder = tmp_path / "local_ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"inputs": f"Q{i}", "targets": f"A{i}"})
                                                  for i in range(3)) + "\n")
    src = SourceConfig(type="hf", task="prompt", hf_name=f"hf:{folder}", hf_split="train")
    (key, src), = keyed_sources([src], tmp_path)
    assert src.name == "local_ds"
    exs, _ = read_source(src, key=key)
    assert _pairs(exs) == [(f"Q{i}", f"A{i}") for i in range(3)]
    with pytest.raises(DataError, match=r"Unknown split"):
        read_source(SourceConfig(type="hf", task="prompt", hf_name=str(folder), hf_split="test", name="x"))


def test_hf_missing_hub_dataset_and_missing_package_are_one_line_errors(hf, tmp_path, monkeypatch):
    src = SourceConfig(type="hf", hf_name="hf:jaxft-nobody/no-such-dataset", hf_config="xx", src_lang="en",
                       tgt_lang="de")
    with pytest.raises(DataError) as e:
        open_source(src, key="data.train[1]")
    msg = str(e.value)
    assert msg.startswith("hf:jaxft-nobody/no-such-dataset/xx[train]: cannot load 'jaxft-nobody/no-such-dataset' "
                          "(check data.train[1].hf_name / hf_config / hf_split)")
    assert "\n" not in msg and msg.endswith("(data.train[1])")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match=r"needs the `datasets` package: pip install 'jaxft\[hf\]'"):
        open_source(src)


# --------------------------------------------------- multi-way (FLORES-style)


FLORES = {"id": [1, 2], "sentence_eng_Latn": ["Hello", "Water"], "sentence_fra_Latn": ["Bonjour", "Eau"],
          "sentence_deu_Latn": ["Hallo", "Wasser"]}


def _directions(src, tmp_path):
    out = []
    for key, s in keyed_sources([src], tmp_path):
        exs, _ = read_source(s, key=key)
        out.append((s.name, [(e.src_lang, e.src, e.tgt_lang, e.tgt) for e in exs]))
    return out


def test_multiway_columns_give_one_direction_each_hf_and_parquet(hf, tmp_path):
    hf.Dataset.from_dict(FLORES).save_to_disk(str(tmp_path / "flores"))
    src = SourceConfig(type="hf", path=str(tmp_path / "flores"), name="flores",
                       directions=("eng_Latn-fra_Latn", "fra_Latn-deu_Latn"),
                       src_field="sentence_{src}", tgt_field="sentence_{tgt}")
    expected = [("flores/eng_Latn-fra_Latn", [("eng_Latn", "Hello", "fra_Latn", "Bonjour"),
                                              ("eng_Latn", "Water", "fra_Latn", "Eau")]),
                ("flores/fra_Latn-deu_Latn", [("fra_Latn", "Bonjour", "deu_Latn", "Hallo"),
                                              ("fra_Latn", "Eau", "deu_Latn", "Wasser")])]
    assert _directions(src, tmp_path) == expected

    # no fields set: translation records default to the columns named by the language codes
    _write_parquet(tmp_path / "flores.parquet", {k.removeprefix("sentence_"): v for k, v in FLORES.items()})
    src = SourceConfig(type="parquet", path=str(tmp_path / "flores.parquet"), name="flores",
                       directions=("eng_Latn-fra_Latn", "fra_Latn-deu_Latn"))
    assert _directions(src, tmp_path) == expected


# ------------------------------------------------------------------ pickling


def test_sources_pickle_and_reopen(hf, tmp_path):
    ar = _write_array_record(tmp_path / "d.array_record", BAD_AR)
    pq_path = _write_parquet(tmp_path / "d.parquet", {"src": ["a", "b", "c"], "tgt": ["A", "B", "C"]})
    hf.Dataset.from_dict({"src": ["a", "b"], "tgt": ["A", "B"]}).save_to_disk(str(tmp_path / "ds"))
    configs = [SourceConfig(type="arrayrecord", path=str(ar), src_lang="en", tgt_lang="yo"),
               SourceConfig(type="parquet", path=str(pq_path), src_lang="en", tgt_lang="yo", src_field="src",
                            tgt_field="tgt"),
               SourceConfig(type="hf", path=str(tmp_path / "ds"), src_lang="en", tgt_lang="yo", src_field="src",
                            tgt_field="tgt")]
    for cfg in configs:
        src = open_source(cfg, key="data.train[0]")
        fresh = pickle.loads(pickle.dumps(src))  # before any read
        used = [src[i] for i in range(len(src))]
        blob = pickle.dumps(src)  # after reads: no open handle travels, nor the records
        assert len(blob) < 20_000, (cfg.type, len(blob))
        again = pickle.loads(blob)
        assert [again[i] for i in range(len(src))] == used == [fresh[i] for i in range(len(src))]
        assert [again.where(i) for i in range(len(src))] == [src.where(i) for i in range(len(src))]


# ------------------------------------------------------------ data prepare


def _prepare_inputs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "en-de.tsv").write_text("src\ttgt\nHello\tHallo\nbad line without tab\n\nThanks\tDanke\n"
                                    "one\ttwo\tthree\nBye\tTschüss\n", encoding="utf-8")
    lines = [json.dumps({"src": "Good morning", "tgt": "Ẹ kú àárọ̀"}, ensure_ascii=False), "{oops",
             json.dumps({"src": "Water", "tgt": "Omi"}), json.dumps({"src": "Empty", "tgt": ""})]
    (data / "en-yo.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (data / "yo.txt").write_text("Òjò ń rọ̀\n\nẸ kú àárọ̀\n", encoding="utf-8")
    return data


def _prepare_config(data) -> DataConfig:
    return DataConfig(
        train=(SourceConfig(type="tsv", path=str(data / "en-de.tsv"), src_lang="en", tgt_lang="de", weight=2.0),
               SourceConfig(type="jsonl", path=str(data / "{src}-{tgt}.jsonl"), name="mix",
                            directions=("en-yo",)),
               SourceConfig(type="text", task="lm", path=str(data / "yo.txt"))),
        dev=(SourceConfig(type="jsonl", path=str(data / "en-yo.jsonl"), src_lang="en", tgt_lang="yo"),))


def test_prepare_writes_shards_manifest_and_sources(tmp_path):
    data = _prepare_inputs(tmp_path)
    cfg = _prepare_config(data)
    out = tmp_path / "prepared"
    manifest = prepare(cfg, tmp_path, out, shard_size=2)
    counts = {(d["split"], d["name"]): (d["records"], d["examples"], d["skipped"], d["shards"])
              for d in manifest["directions"]}
    assert counts == {
        ("train", "en-de"): (6, 3, {"blank": 1, "columns": 2}, 2),
        ("train", "mix/en-yo"): (4, 2, {"empty": 1, "json": 1}, 1),
        ("train", "yo"): (3, 2, {"blank": 1}, 1),
        ("dev", "en-yo"): (4, 2, {"empty": 1, "json": 1}, 1),
    }
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in (out / "train" / "en-de").iterdir()) == ["part-00000.array_record",
                                                                           "part-00001.array_record"]
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(out / "train" / "en-de" / "part-00000.array_record"))
    assert json.loads(reader.read([0])[0]) == {"src": "Hello", "tgt": "Hallo", "src_lang": "en", "tgt_lang": "de"}
    assert "group_size:1," in reader.writer_options_string()
    reader.close()

    written = yaml.safe_load((out / "sources.yaml").read_text())["data"]
    assert [s["name"] for s in written["train"]] == ["en-de", "mix/en-yo", "yo"]
    assert written["train"][0]["weight"] == 2.0 and written["train"][2]["task"] == "lm"
    for split, sources in (("train", cfg.train), ("dev", cfg.dev)):
        originals = keyed_sources(sources, tmp_path, section=f"data.{split}", split=split)
        copies = keyed_sources([SourceConfig(**s) for s in written[split]], tmp_path, section=f"data.{split}")
        assert len(originals) == len(copies)
        for (_, a), (_, b) in zip(originals, copies):
            assert b.type == "arrayrecord" and (a.name, a.src_lang, a.tgt_lang, a.task) == (
                b.name, b.src_lang, b.tgt_lang, b.task)
            exs_a, _ = read_source(a)
            exs_b, stats_b = read_source(b)
            assert _view(exs_a) == _view(exs_b) and stats_b.skipped == {}

    before = {p: p.read_bytes() for p in data.iterdir()}
    with pytest.raises(OutputError, match=r"already exists; choose a new path or pass --overwrite"):
        prepare(cfg, tmp_path, out)
    with pytest.raises(OutputError, match=r"contains an input of this command"):
        prepare(cfg, tmp_path, data, overwrite=True)
    with pytest.raises(OutputError, match=r"is an input of this command"):
        prepare(cfg, tmp_path, data / "en-yo.jsonl", overwrite=True)
    assert {p: p.read_bytes() for p in data.iterdir()} == before


def test_prepare_overwrite_replaces_a_prepared_folder(tmp_path):
    data = _prepare_inputs(tmp_path)
    cfg = _prepare_config(data)
    prepare(cfg, tmp_path, tmp_path / "out")
    cfg = DataConfig(train=cfg.train[:1])
    manifest = prepare(cfg, tmp_path, tmp_path / "out", overwrite=True)
    assert [d["name"] for d in manifest["directions"]] == ["en-de"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "sources.yaml", "train"]


def test_prepare_errors_before_writing(tmp_path):
    data = _prepare_inputs(tmp_path)
    cfg = DataConfig(train=(SourceConfig(type="tsv", path=str(data / "en-de.tsv"), src_lang="en", tgt_lang="de"),
                            SourceConfig(type="tsv", path=str(data / "missing.tsv"), src_lang="en", tgt_lang="yo")))
    with pytest.raises(DataError, match=r"missing.tsv: file does not exist \(data.train\[1\]\)"):
        prepare(cfg, tmp_path, tmp_path / "out")
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())
    with pytest.raises(DataError, match=r"no sources to prepare"):
        prepare(DataConfig(), tmp_path, tmp_path / "out")


def test_cli_data_prepare(tmp_path, capsys):
    _prepare_inputs(tmp_path)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"data": {
        "bad_lines": "skip",
        "train": [{"type": "tsv", "path": "data/en-de.tsv", "src_lang": "en", "tgt_lang": "de"}],
        "dev": [{"type": "jsonl", "path": "data/en-yo.jsonl", "src_lang": "en", "tgt_lang": "yo"}]}}))
    out = tmp_path / "prepared"
    assert main(["data", "prepare", str(config), "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["split", "direction", "records", "examples", "skipped"]
    assert table[1].split() == ["train", "en-de", "6", "3", "blank=1", "columns=2"]
    assert table[2].split() == ["dev", "en-yo", "4", "2", "empty=1", "json=1"]
    assert table[3] == f"wrote {out} (sources to train on: {out}/sources.yaml)"

    # the written sources.yaml works as a `base:` overlay
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"base": [str(out / "sources.yaml")]}))
    cfg = load_config(run)
    assert [s.type for s in cfg.data.train + cfg.data.dev] == ["arrayrecord", "arrayrecord"]
    assert _pairs(read_source(keyed_sources(cfg.data.train, tmp_path)[0][1])[0]) == [
        ("Hello", "Hallo"), ("Thanks", "Danke"), ("Bye", "Tschüss")]

    assert main(["data", "prepare", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0] == f"jaxft: --out {out}: already exists; choose a new path or pass --overwrite"
    assert main(["data", "prepare", str(config), "--out", str(out / "x"), "--set", "data.bad_lines=error"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "en-de.tsv:3: wrong number of columns (data.train[0]" in err[0]
    assert not (out / "x").exists() and not (out / ".x.partial").exists()
