"""`jaxft eval` / `jaxft translate` ergonomics: the test split, sources given by flags, any model
(run dir, jaxft folder, HF folder), target-language tags for HF folders, the progress bar."""

import io
import json
import sys

import numpy as np
import pytest
import yaml

from jaxft.cli import main
from jaxft.config.loader import load_config
from jaxft.config.schema import DecodeConfig
from jaxft.eval.metrics import score_direction
from jaxft.eval.translate import load_translator
from jaxft.train.loop import train

from trainutil import write_run_config

QUICK = ["--set", "eval.decode.strategy=greedy", "--set", "eval.decode.max_len=6", "--max-examples", "3"]
TEST_DIRS = ["eng_Latn-rus_Cyrl"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcli")
    path = write_run_config(tmp, steps=2, name="run")
    raw = yaml.safe_load(path.read_text())
    raw["data"]["test"] = [{"type": "text", "src_path": "corpus/test.{src}", "tgt_path": "corpus/test.{tgt}",
                            "directions": TEST_DIRS}]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = train(load_config(path), base_dir=tmp)
    return tmp, path, result.run_dir


def _report(folder):
    return json.loads((folder / "eval.json").read_text())


def test_test_split_cli_sources_and_any_model_score_alike(run, tmp_path, capsys):
    tmp, config, run_dir = run
    assert load_config(config).data.test[0].src_path == str(tmp / "corpus" / "test.{src}")  # resolved like dev
    argv = ["eval", str(config), "--split", "test", "--checkpoint", "2", "--out", str(tmp_path / "test"), *QUICK]
    assert main(argv) == 0  # step 2: the latest, which the translator below loads
    report = _report(tmp_path / "test")
    assert list(report["directions"]) == TEST_DIRS
    assert report["settings"] == {"model": str(run_dir), "checkpoint": "2", "split": "test",
                                  "tag_style": "prompt"}
    assert "Settings: model" in (tmp_path / "test" / "eval.md").read_text()
    # the same scores by hand: the first 3 test lines through the translator
    translator, _ = load_translator(str(run_dir))
    src = (tmp / "corpus" / "test.eng_Latn").read_text().splitlines()[:3]
    ref = (tmp / "corpus" / "test.rus_Cyrl").read_text().splitlines()[:3]
    hyps = translator.translate(src, "eng_Latn", "rus_Cyrl", DecodeConfig(strategy="greedy", max_len=6), 16)
    want = score_direction(hyps, ref, tgt_lang="rus_Cyrl", direction=TEST_DIRS[0])
    assert report["directions"][TEST_DIRS[0]]["chrf"] == pytest.approx(want.chrf)

    # no CONFIG: the run dir's own config; the direction from flags
    flags = ["--src", str(tmp / "corpus" / "test.eng_Latn"), "--ref", str(tmp / "corpus" / "test.rus_Cyrl"),
             "--src-lang", "eng_Latn", "--tgt-lang", "rus_Cyrl"]
    assert main(["eval", "--model", str(run_dir), *flags, "--out", str(tmp_path / "flags"), *QUICK]) == 0
    got = _report(tmp_path / "flags")
    assert list(got["directions"]) == ["eng_Latn-rus_Cyrl"] and "split" not in got["settings"]
    assert got["settings"]["src"] == str(tmp / "corpus" / "test.eng_Latn")
    assert got["directions"]["eng_Latn-rus_Cyrl"]["chrf"] == pytest.approx(want.chrf)

    # a jaxft folder exported from the run scores the same under the same CONFIG
    assert main(["export", str(run_dir), str(tmp_path / "exported")]) == 0
    assert main(["eval", str(config), "--model", str(tmp_path / "exported"), "--split", "test",
                 "--out", str(tmp_path / "folder"), *QUICK]) == 0
    folder = _report(tmp_path / "folder")
    assert folder["directions"][TEST_DIRS[0]]["chrf"] == pytest.approx(want.chrf)
    assert "checkpoint" not in folder["settings"]

    capsys.readouterr()
    assert main(["eval", "--model", str(run_dir), *flags[:2], *QUICK]) == 2  # --ref without its languages...
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--src-lang" in err[0] and "--tgt-lang" in err[0], err
    assert main(["eval", "--model", str(run_dir), "--checkpoint", "1", *QUICK]) == 2
    assert "steps: 2" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "exported"), "--set", "eval.max_examples=2"]) == 2
    assert "--set needs a CONFIG" in capsys.readouterr().err
    assert main(["eval", "--model", str(run_dir), *flags, "--split", "test"]) == 2
    assert "no split" in capsys.readouterr().err


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal_and_never_on_stdout(run, tmp_path, capsys, monkeypatch):
    _, _, run_dir = run
    lines = tmp_path / "in.txt"
    lines.write_text("Hello world.\nThe cat sits.\nGood morning.\n", encoding="utf-8")
    argv = ["translate", str(run_dir), "--src-lang", "eng_Latn", "--tgt-lang", "deu_Latn", "--input", str(lines),
            "--strategy", "greedy", "--max-len", "5", "--batch-size", "2"]
    for quiet in (False, True):
        fake = FakeTTY()
        monkeypatch.setattr(sys, "stderr", fake)
        assert main(argv + (["--quiet"] if quiet else [])) == 0
        monkeypatch.undo()
        out = capsys.readouterr().out
        assert len(out.splitlines()) == 3 and "sent" not in out and "%" not in out
        bar = fake.getvalue()
        if quiet:
            assert bar == ""
        else:
            assert "/3 [" in bar and "sent" in bar and "target language by prompt" in bar


# ------------------------------------------------------------------ HF T5 folder with <2xx> tags


@pytest.fixture(scope="module")
def t5_dir(run, tmp_path_factory):
    import sentencepiece as spm

    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    tmp, _, _ = run
    out = tmp_path_factory.mktemp("t5")
    corpus = [line for lang in ("eng_Latn", "deu_Latn") for line in
              (tmp / "corpus" / f"train.{lang}").read_text(encoding="utf-8").splitlines()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=300,
                                   model_type="unigram", num_threads=1, minloglevel=2, hard_vocab_limit=False,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   user_defined_symbols=["<2deu_Latn>", "<2eng_Latn>"])
    (out / "spiece.model").write_bytes(buf.getvalue())
    size = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=size + 100, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                num_decoder_layers=1, num_heads=2, relative_attention_num_buckets=8,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(out, safe_serialization=True)
    return out


def test_hf_t5_folder_gets_target_tags_from_flags_or_config(run, t5_dir, tmp_path, capsys):
    tmp, _, _ = run
    plain, _ = load_translator(str(t5_dir))
    tagged, _ = load_translator(str(t5_dir), lang_tokens="t5_tag")
    tag = tagged.tokenizer.piece_id("<2deu_Latn>")
    assert tag is not None and (plain.tag_style, tagged.tag_style) == ("none", "t5_tag")
    seqs_plain, _ = plain.inputs(["Hello world."], "eng_Latn", "deu_Latn", 8)
    seqs_tagged, _ = tagged.inputs(["Hello world."], "eng_Latn", "deu_Latn", 8)
    assert seqs_tagged[0] == [tag] + seqs_plain[0] and tag not in seqs_plain[0]

    # a CONFIG whose data says t5_tag applies it to the HF folder; the report shows it
    cfg = tmp_path / "t5eval.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"lang_tokens": "t5_tag"}}))
    flags = ["--src", str(tmp / "corpus" / "test.eng_Latn"), "--ref", str(tmp / "corpus" / "test.deu_Latn"),
             "--src-lang", "eng_Latn", "--tgt-lang", "deu_Latn"]
    assert main(["eval", str(cfg), "--model", str(t5_dir), *flags, "--out", str(tmp_path / "ev"), *QUICK]) == 0
    settings = _report(tmp_path / "ev")["settings"]
    assert settings["tag_style"] == "t5_tag" and settings["model"] == str(t5_dir) and "checkpoint" not in settings
    assert "tag style `t5_tag`" in (tmp_path / "ev" / "eval.md").read_text()

    # translate: --lang-tokens on the HF folder; the info line names the style
    src = tmp_path / "src.txt"
    src.write_text("Hello world.\nGood morning.\n", encoding="utf-8")
    capsys.readouterr()
    argv = ["translate", str(t5_dir), "--src-lang", "eng_Latn", "--tgt-lang", "deu_Latn", "--input", str(src),
            "--strategy", "greedy", "--max-len", "4"]
    assert main(argv + ["--lang-tokens", "t5_tag"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert captured.err == ""  # stderr is no terminal here: no info line, no progress bar
    fake = FakeTTY()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stderr", fake)
        assert main(argv + ["--lang-tokens", "t5_tag", "--quiet"]) == 0 and fake.getvalue() == ""
        assert main(argv + ["--lang-tokens", "t5_tag"]) == 0
    assert "target language by t5_tag" in fake.getvalue()
    capsys.readouterr()
    want = tagged.translate(["Hello world.", "Good morning."], "eng_Latn", "deu_Latn",
                            DecodeConfig(strategy="greedy", max_len=4))
    assert captured.out.splitlines() == want
    assert np.all([isinstance(x, str) for x in want])


def test_translate_streams_in_chunks_with_the_same_output(run, tmp_path, capsys, monkeypatch):
    """`jaxft translate` holds one chunk of lines, not the corpus: chunks of 2 lines print what one
    chunk of all lines prints."""
    import jaxft.commands.evaluate as evaluate

    _, _, run_dir = run
    lines = tmp_path / "in.txt"
    lines.write_text("Hello world.\nThe cat sits.\nGood morning.\nThe dog runs.\nA red car.\n", encoding="utf-8")
    argv = ["translate", str(run_dir), "--src-lang", "eng_Latn", "--tgt-lang", "deu_Latn", "--input", str(lines),
            "--strategy", "greedy", "--max-len", "5", "--batch-size", "2", "--quiet"]
    assert main(argv) == 0
    whole = capsys.readouterr().out
    monkeypatch.setattr(evaluate, "TRANSLATE_CHUNK", 2)
    assert main(argv) == 0
    assert capsys.readouterr().out == whole and len(whole.splitlines()) == 5
