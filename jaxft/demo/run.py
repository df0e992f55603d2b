"""`make demo`: generate a multilingual corpus, train a tokenizer and a tiny
decoder-only model on many directions at once, print dev loss per direction
before and after training.  Runs offline on 2 CPU cores in a few minutes."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jaxft
from jaxft.config.loader import load_config
from jaxft.demo.corpus import build_corpus
from jaxft.train.loop import dev_table, train

log = logging.getLogger(__name__)
CONFIGS = Path(jaxft.__file__).resolve().parents[1] / "configs"


def run_demo(out: Path, config: Path | None = None, overrides: tuple[str, ...] = ()) -> None:
    out = Path(out)
    t0 = time.perf_counter()
    manifest = build_corpus(out / "corpus")
    langs = ", ".join(manifest["languages"])
    print(f"corpus: {out / 'corpus'} ({langs}; {manifest['counts']['train']} parallel lines per language)")
    # The config is copied next to the corpus so its relative data paths
    # resolve there, and the run's outputs keep the exact config that ran.
    source = config or CONFIGS / "experiments" / "demo_decoder.yaml"
    config = out / source.name
    config.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = load_config(config, (f"run_dir={out / 'decoder'}",) + tuple(overrides))
    result = train(cfg, base_dir=out)
    print()
    print("Decoder-only model, dev loss (nats/target token) per direction:")
    print(dev_table(result))
    print()
    print(f"outputs: run dir {result.run_dir.resolve()} (metrics.jsonl, tb/, checkpoints/, tokenizer.model)")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
