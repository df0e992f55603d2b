"""Encoder-decoder models train in the same trainer: loss and per-direction dev
loss fall, language tokens and monolingual objectives flow through, and resume
is exact."""

from pathlib import Path

import pytest
import yaml

from jaxft.config.loader import load_config
from jaxft.data.tokenizer import Tokenizer
from jaxft.demo.corpus import build_corpus
from jaxft.train.loop import train

DIRECTIONS = ["eng_Latn-deu_Latn", "deu_Latn-eng_Latn", "eng_Latn-rus_Cyrl"]
TINY = {"vocab_size": 640, "d_model": 32, "n_layers": 2, "n_decoder_layers": 2, "n_heads": 4, "mlp_dim": 64,
        "dtype": "float32"}


def write_config(tmp: Path, name: str, preset: str, lang_tokens: str, extra_train=(), steps=6) -> Path:
    corpus = tmp / "corpus"
    if not (corpus / "MANIFEST.json").exists():
        build_corpus(corpus, n_train=120, n_dev=8, n_test=8, languages=["eng_Latn", "deu_Latn", "rus_Cyrl"])
    text = {"type": "text", "src_path": "corpus/train.{src}", "tgt_path": "corpus/train.{tgt}",
            "directions": DIRECTIONS}
    cfg = {
        "run_dir": str(tmp / name),
        "model": {"preset": preset, **TINY},
        "data": {"tokenizer": {"train_vocab_size": 640}, "train": [text, *extra_train],
                 "dev": [{**text, "src_path": "corpus/dev.{src}", "tgt_path": "corpus/dev.{tgt}",
                          "directions": DIRECTIONS[:2]}],
                 "seq_len": 48, "encoder_seq_len": 64, "lang_tokens": lang_tokens},
        "optimizer": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": steps, "global_batch": 8, "log_every": 1, "dev_batches": 1, "progress_bar": False},
        "checkpoint": {"every": 3, "keep": 2, "async_save": False},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def test_mbart_style_with_language_codes_trains(tmp_path):
    path = write_config(tmp_path, "mbart", "tiny-mbart", "lang_code")
    result = train(load_config(path), base_dir=tmp_path)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert losses[-1] < losses[0]
    assert all(result.dev_after[d] < result.dev_before[d] for d in result.dev_after)
    tok = Tokenizer.load(result.run_dir / "tokenizer.model")
    for code in ("eng_Latn", "deu_Latn", "rus_Cyrl"):  # added to the trained tokenizer automatically
        assert tok.piece_id(code) is not None


def test_t5_with_tags_and_span_corruption_resumes_exactly(tmp_path):
    mono = {"type": "text", "task": "span_corruption", "path": "corpus/train.deu_Latn", "src_lang": "deu_Latn",
            "name": "deu-span"}
    path = write_config(tmp_path, "t5", "tiny-mt5", "t5_tag", extra_train=[mono])
    full = train(load_config(path), base_dir=tmp_path)
    assert full.losses[6] < full.losses[1]
    tok = Tokenizer.load(full.run_dir / "tokenizer.model")
    assert tok.piece_id("<2deu_Latn>") is not None and tok.piece_id("<extra_id_0>") is not None
    path2 = write_config(tmp_path, "t5b", "tiny-mt5", "t5_tag", extra_train=[mono])
    cfg2 = load_config(path2)
    train(cfg2, base_dir=tmp_path, stop_after=3)
    resumed = train(cfg2, base_dir=tmp_path)
    for step in (4, 5, 6):
        assert resumed.losses[step] == pytest.approx(full.losses[step], abs=0, rel=0), step
