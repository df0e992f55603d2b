"""Evaluation during training: every `eval.every` steps decode the dev
directions, log BLEU / chrF / chrF++ per direction, and keep the best
checkpoint by `eval.best_metric` in `<run_dir>/best` (besides the last N)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flax import nnx

from jaxft.config.schema import CheckpointConfig, Config, to_dict
from jaxft.train.checkpoint import Checkpointer
from jaxft.train.initial import checkpointed_part

log = logging.getLogger(__name__)


class BestKeeper:
    def __init__(self, cfg: Config, run_dir: Path, base_dir: Path, tokenizer, graphdef: nnx.GraphDef):
        self.cfg, self.run_dir, self.base_dir = cfg, run_dir, base_dir
        self.tokenizer, self.graphdef = tokenizer, graphdef
        self.best_file = run_dir / "best" / "best.json"
        self.best = json.loads(self.best_file.read_text())["value"] if self.best_file.exists() else None
        self.ckpt = Checkpointer(run_dir / "best", CheckpointConfig(keep=1, async_save=False))

    def evaluate(self, step: int, state, data_state: dict, writer) -> dict:
        from jaxft.eval.translate import Translator, evaluate

        model = nnx.merge(self.graphdef, state.params, state.rest)
        report = evaluate(Translator(model, self.tokenizer, self.cfg.model, self.cfg.data), self.cfg,
                          base_dir=self.base_dir)
        per_direction = {d: {"bleu": s.bleu, "chrf": s.chrf, "chrfpp": s.chrfpp} for d, s in report.scores.items()}
        averages = report.averages()
        writer.write(step, {"scores": per_direction, "average": averages}, kind="eval")
        value = averages[self.cfg.eval.best_metric]
        log.info("eval step %d: %s %.2f (best %s)", step, self.cfg.eval.best_metric, value, self.best)
        if self.best is None or value > self.best:
            self.best = value
            self.ckpt.save(step, checkpointed_part(state, self.cfg), data_state, to_dict(self.cfg))
            self.ckpt.wait()
            if writer.enabled:
                self.best_file.write_text(json.dumps({"step": step, "metric": self.cfg.eval.best_metric,
                                                      "value": value}))
        report.write(self.run_dir / "eval" / f"step_{step}")
        return averages

    def close(self) -> None:
        self.ckpt.close()
