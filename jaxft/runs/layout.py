"""Where everything of a run lives, in one place.

    <run_dir>/config.yaml              the resolved config the run was started with
    <run_dir>/tokenizer.model          a tokenizer the run trained (when it trained one)
    <run_dir>/checkpoints/<step>/      params, rest (frozen part, when stored), train
                                       (step, optimizer state, mask), data, config
    <run_dir>/best/<step>/             the best checkpoint by `eval.best_metric` (+ best.json)
    <run_dir>/metrics.jsonl, tb/       metrics (process 0)
    <run_dir>/params.json              parameter counts: params, trainable, updated (what the
                                       method changes: LoRA adapters, LT-SFT's K entries), method
    <run_dir>/eval/step_<n>/           evaluation reports during training
    <run_dir>/adapter/, sparse_diff/   what a PEFT run exports at its end
    <run_dir>/unreadable_checkpoints/  checkpoints training could not restore (moved, never deleted)

`root` may be a URL (``gs://bucket/run``): it is then an ``etils.epath.Path`` (`jaxft.paths.as_path`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxft.paths import as_path


@dataclasses.dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", as_path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def params_json(self) -> Path:
        return self.root / "params.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def best_json(self) -> Path:
        return self.best / "best.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def unreadable(self) -> Path:
        return self.root / "unreadable_checkpoints"

    def eval_report(self, step: int) -> Path:
        return self.root / "eval" / f"step_{step}"

    def export(self, what: str) -> Path:
        """`adapter` (LoRA) or `sparse_diff` (LT-SFT)."""
        return self.root / what

    def checkpoint_dir(self, which: str) -> Path:
        """`latest` -> checkpoints/, `best` -> best/."""
        if which not in ("latest", "best"):
            raise ValueError(f"checkpoint: expected 'latest' or 'best', got {which!r}")
        return self.best if which == "best" else self.checkpoints

    def is_run(self) -> bool:
        return self.config.is_file()
