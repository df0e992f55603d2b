"""`make demo`: generate a multilingual corpus, train a tokenizer and two tiny
models on many directions at once (a LLaMA-style decoder, and an mT5-style
encoder-decoder with target-language tags mixed with span corruption), print
dev loss per direction before and after.  Offline, ~3-4 minutes on 2 CPU cores."""

from __future__ import annotations

import time
from pathlib import Path

import jaxft
from jaxft.config.loader import load_config
from jaxft.demo.corpus import build_corpus
from jaxft.train.loop import TrainResult, dev_table, train

CONFIGS = Path(jaxft.__file__).resolve().parents[1] / "configs" / "experiments"
PARTS = (("decoder", "demo_decoder.yaml", "Decoder-only (LLaMA-style) model"),
         ("seq2seq", "demo_seq2seq.yaml", "Encoder-decoder (mT5-style, <2xx> tags + span corruption) model"))


def run_part(out: Path, name: str, config_name: str, overrides: tuple[str, ...] = ()) -> TrainResult:
    # The config is copied next to the corpus so its relative data paths
    # resolve there, and the run's outputs keep the exact config that ran.
    config = out / config_name
    config.write_text((CONFIGS / config_name).read_text(encoding="utf-8"), encoding="utf-8")
    return train(load_config(config, (f"run_dir={out / name}",) + tuple(overrides)), base_dir=out)


def run_demo(out: Path, parts: tuple[str, ...] = ("decoder", "seq2seq")) -> None:
    out = Path(out)
    t0 = time.perf_counter()
    manifest = build_corpus(out / "corpus")
    print(f"corpus: {out / 'corpus'} ({', '.join(manifest['languages'])}; "
          f"{manifest['counts']['train']} parallel lines per language)")
    results = []
    for name, config_name, title in PARTS:
        if name in parts:
            results.append((title, run_part(out, name, config_name)))
    for title, result in results:
        print(f"\n{title}, dev loss (nats/target token) per direction:")
        print(dev_table(result))
        print(f"outputs: {result.run_dir.resolve()} (config.yaml, metrics.jsonl, tb/, checkpoints/, tokenizer.model)")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
