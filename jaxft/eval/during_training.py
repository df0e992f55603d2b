"""Evaluation during training, as a train-loop hook: every `eval.every` steps
(and at the last step) decode the dev directions, log BLEU / chrF / chrF++ per
direction (and the accuracies of answer-choice sources, exact match / chrF of generation
sources), and keep the best checkpoint by `eval.best_metric` in `<run_dir>/best` (besides
the last N).

The hook lives here, above `jaxft.train`, because it decodes and scores;
`train_and_evaluate` is `train` with this hook added when `eval.every` is set
(what `jaxft train` runs)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from jaxft.config.errors import read_json
from jaxft.config.schema import CheckpointConfig, Config, to_dict
from jaxft.eval.types import SplitModel
from jaxft.outputs import atomic_write_text
from jaxft.runs.checkpoint import Checkpointer
from jaxft.train.hooks import Hook
from jaxft.train.loop import TrainResult, train

log = logging.getLogger(__name__)
# what eval.best_metric averages over, where it is not the translation directions
_MEASURED = {"acc": "answer-choice source", "acc_norm": "answer-choice source", "em": "generation source",
             "gen_chrf": "generation source"}


class EvalHook(Hook):
    evaluates = True

    def on_start(self, run, state):
        best_file = run.dirs.best_json
        self.best = read_json(best_file, "best.json").get("value") if best_file.exists() else None
        self.ckpt = Checkpointer(run.dirs.best, CheckpointConfig(keep=1, async_save=False))

    def after_step(self, run, step, state, metrics):
        if step % run.cfg.eval.every == 0 or step == run.cfg.train.steps:
            self.evaluate(run, step, state)

    def evaluate(self, run, step: int, state) -> dict:
        from jaxft.eval.translate import Translator, evaluate

        cfg = run.cfg
        # the train state as it is: stacked layers (`model.scan_layers`) decode and score by a scan
        # over the stored arrays, with no unstacked copy of the parameters
        model = SplitModel(run.graphdef, (state.params, state.rest))
        report = evaluate(Translator(model, run.tokenizer, cfg.model, cfg.data), cfg, base_dir=run.base_dir)
        per_direction = {d: {"bleu": s.bleu, "chrf": s.chrf, "chrfpp": s.chrfpp} for d, s in report.scores.items()}
        averages = report.averages()
        extra = {k: v for k, v in (("choices", report.choices), ("generations", report.generations)) if v}
        run.writer.write(step, {"scores": per_direction, "average": averages, **extra}, kind="eval")
        value = averages.get(cfg.eval.best_metric)
        if value is None:
            raise ValueError(f"eval.best_metric: {cfg.eval.best_metric} has no value: the dev split has no "
                             f"{_MEASURED.get(cfg.eval.best_metric, 'translation direction')}")
        log.info("eval step %d: %s %.2f (best %s)", step, cfg.eval.best_metric, value, self.best)
        if self.best is None or value > self.best:
            self.best = value
            self.ckpt.save(step, run.checkpoint_items(state), run.pipeline.get_state(), to_dict(cfg), run.meta)
            self.ckpt.wait()
            if run.is_main:
                atomic_write_text(run.dirs.best_json, json.dumps({"step": step, "metric": cfg.eval.best_metric,
                                                                  "value": value}))
        report.write(run.dirs.eval_report(step))
        return averages

    def close(self, run):
        if hasattr(self, "ckpt"):
            self.ckpt.close()


def train_and_evaluate(cfg: Config, *, base_dir: Path, stop_after: int | None = None,
                       hooks: Sequence[Hook] = (), restart: bool = False) -> TrainResult:
    """`jaxft.train.loop.train`, evaluating during training when `eval.every` is set."""
    extra = [EvalHook()] if cfg.eval.every else []
    return train(cfg, base_dir=base_dir, stop_after=stop_after, hooks=[*extra, *hooks], restart=restart)
