"""Shared helpers for trainer tests: a tiny corpus and config written to a tmp dir."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import yaml

from jaxft.demo.corpus import build_corpus
from jaxft.outputs import read_jsonl as _read_jsonl

LANGS = ("eng_Latn", "deu_Latn", "rus_Cyrl")


def write_run_config(tmp: Path, *, steps: int = 6, extra: dict | None = None, name: str = "run") -> Path:
    """A tiny decoder-only experiment over a generated 3-language corpus."""
    corpus = tmp / "corpus"
    if not (corpus / "MANIFEST.json").exists():
        build_corpus(corpus, n_train=120, n_dev=8, n_test=8, languages=list(LANGS))
    directions = ["eng_Latn-deu_Latn", "deu_Latn-eng_Latn", "eng_Latn-rus_Cyrl"]
    cfg = {
        "run_dir": str(tmp / name),
        "model": {"preset": "tiny-llama", "vocab_size": 512, "d_model": 32, "n_layers": 2, "n_heads": 4,
                  "n_kv_heads": 2, "mlp_dim": 64, "dtype": "float32"},
        "data": {
            "tokenizer": {"train_vocab_size": 512},
            "train": [{"type": "text", "src_path": "corpus/train.{src}", "tgt_path": "corpus/train.{tgt}",
                       "directions": directions}],
            "dev": [{"type": "text", "src_path": "corpus/dev.{src}", "tgt_path": "corpus/dev.{tgt}",
                     "directions": directions[:2]}],
            "seq_len": 64,
        },
        "optimizer": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.01},
        "train": {"steps": steps, "global_batch": 8, "log_every": 1, "dev_batches": 1, "progress_bar": False},
        "checkpoint": {"every": 2, "keep": 3, "async_save": False},
    }
    for key, value in (extra or {}).items():
        section, _, leaf = key.partition(".")
        cfg.setdefault(section, {})[leaf] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


class SleepHook:
    """A train-loop hook that sleeps after every step: slows a run down for tests that kill it."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_start(self, run, state):
        pass

    def after_step(self, run, step, state, metrics):
        import time

        time.sleep(self.seconds)

    def on_end(self, run, state, end):
        pass

    def close(self, run):
        pass


def train_slowly(config_path: str, seconds: float) -> None:
    """`jaxft train CONFIG` with a SleepHook (run as a subprocess by kill tests)."""
    from jaxft.config.loader import load_config
    from jaxft.train.loop import train

    path = Path(config_path)
    train(load_config(path), base_dir=path.resolve().parent, hooks=[SleepHook(seconds)])


class SignalHook(SleepHook):
    """Sends `sig` to this process after step `at` (an in-process preemption)."""

    def __init__(self, at: int, sig):
        super().__init__(0.0)
        self.at, self.sig = at, sig

    def after_step(self, run, step, state, metrics):
        import os

        if step == self.at:
            os.kill(os.getpid(), self.sig)


def cli_train_slowly(config_path: str, seconds: float, *extra: str, start_delay: float = 0.0) -> int:
    """`jaxft train CONFIG` through the CLI, with a SleepHook after every step; `start_delay`
    seconds of sleep at the end of the run's set-up (after its checkpoint and tokenizer barriers,
    before the first step), as a process slowed down by a busy machine would have."""
    import jaxft.eval.during_training as during_training
    import jaxft.train.loop as loop
    from jaxft.cli import main

    plain, plain_setup = during_training.train, loop.setup

    def slow_train(cfg, **kw):
        return plain(cfg, **{**kw, "hooks": [*kw.get("hooks", ()), SleepHook(seconds)]})

    def late_setup(*args, **kw):
        run = plain_setup(*args, **kw)
        time.sleep(start_delay)
        return run

    loop.setup = late_setup

    during_training.train = slow_train
    return main(["train", config_path, *extra])


def read_jsonl(path) -> list[dict]:
    """A run's .jsonl file, every line a JSON object (else the test fails naming the line)."""
    return _read_jsonl(path, strict=True)


def save_tiny_hf_llama(folder: Path, layers: int = 2) -> Path:
    """A random transformers LLaMA of `write_run_config`'s shapes (vocabulary 512, d_model 32),
    saved as safetensors: what `model.init_from: hf:<folder>` reads (needs torch + transformers)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def free_port() -> int:
    """A free local TCP port (for a multi-process test's coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
