"""Checkpoints: one orbax CheckpointManager per folder, with separate items

    params   the trainable parameters
    rest     the frozen parameters and other variables (absent when a PEFT run
             stores only what trains: the base is rebuilt from the config)
    train    step, optimizer state and the update mask: what only training needs
    data     the data iterator state (all processes' slots, gathered)
    config   the resolved config
    meta     small JSON facts about the run (the dev loss before training)

so inference restores `params` (+ `rest`) and never builds an optimizer.

A train state with stacked layers (`model.scan_layers`) also restores checkpoints whose layers
are stored one by one (written before stacked storage, or by an unrolled run of the same model):
they are read per layer and stacked.

Training resumes from the newest step that restores cleanly: an unreadable
newest checkpoint is moved to `unreadable_checkpoints/` (never deleted) and the
previous one is used.  When none restores, that is an error naming them and
nothing is moved (`jaxft train --restart` sets them aside and starts over).  A
read-only Checkpointer (inference, exports, `init_from: run:`) skips unreadable
steps with a warning and changes nothing on disk.

The folder may be a URL (``gs://bucket/run/checkpoints``): orbax writes there from every process
(tensorstore for arrays; on GCS a step is committed by its ``commit_success`` marker instead of a
rename).  Setting a step aside there is a copy + delete (`jaxft.paths.move`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxft.config.schema import CheckpointConfig
from jaxft.models.scan import holds_stacks, per_layer_abstract, restack_like
from jaxft.paths import absolute, makedirs, move

log = logging.getLogger(__name__)

ITEMS = ("params", "rest", "train", "data", "config", "meta")
OLD_ITEM = "state"  # jaxft 0.1 stored the whole train state as one item


class CheckpointFormatError(ValueError):
    pass


class UnreadableCheckpoints(ValueError):
    """Checkpoints exist but none can be restored."""


def gather_json(local: dict[str, Any]) -> dict[str, Any]:
    """Merge a JSON-able dict from every process (keys must not collide)."""
    if jax.process_count() == 1:
        return dict(local)
    raw = np.frombuffer(json.dumps(local, sort_keys=True).encode(), dtype=np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int32))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: raw.size] = raw
    everything = multihost_utils.process_allgather(padded)
    merged: dict[str, Any] = {}
    for size, buf in zip(np.asarray(sizes).reshape(-1), np.asarray(everything)):
        merged.update(json.loads(bytes(buf[: int(size)]).decode()))
    return merged


class Checkpointer:
    def __init__(self, directory: Path, cfg: CheckpointConfig | None = None, *, read_only: bool = False):
        cfg = cfg or CheckpointConfig()
        self.directory = absolute(directory)  # a URL stays as it is
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save and not read_only,
            create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        if self.read_only and not self.directory.is_dir():
            return []
        return sorted(self.manager.all_steps())

    def save(self, step: int, items: dict[str, Any], data_state: dict[str, Any], config: dict[str, Any],
             meta: dict[str, Any] | None = None) -> None:
        """`items`: pytrees by item name (`params`, `train`, and `rest` unless it is rebuilt)."""
        if self.read_only:
            raise RuntimeError(f"{self.directory}: opened read-only")
        # orbax refuses empty trees (a full finetuning run has no frozen `rest`): they are not stored
        args = {k: ocp.args.StandardSave(v) for k, v in items.items() if v is not None and jax.tree.leaves(v)}
        args.update(data=ocp.args.JsonSave(gather_json(data_state)), config=ocp.args.JsonSave(config),
                    meta=ocp.args.JsonSave(meta or {}))
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def read_config(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def check_format(self, step: int) -> None:
        step_dir = self.directory / str(step)
        if (step_dir / OLD_ITEM).is_dir() and not (step_dir / "params").is_dir():
            raise CheckpointFormatError(
                f"{step_dir}: written by jaxft 0.1 (one 'state' item); this version stores params and "
                "optimizer state as separate items and cannot read it: retrain, or load it with jaxft 0.1 "
                "and export the model (`jaxft convert`)")

    def restore_latest(self, targets: dict[str, Any], *, restart: bool = False
                       ) -> tuple[int, dict[str, Any]] | None:
        """(step, {item: value}) of the newest checkpoint whose `targets` items (abstract
        pytrees by item name; `data` and `meta` are always restored, as JSON) restore, or
        None when there is no checkpoint.

        Training (not read-only): unreadable steps newer than the one restored are
        moved to `unreadable_checkpoints/` (never deleted) so they can be written
        again.  When checkpoints exist but none restores, that is an
        `UnreadableCheckpoints` error and nothing is moved, unless `restart`: then
        they are all set aside and None is returned (train from scratch).  Read-only:
        unreadable steps are skipped with a warning; none readable is the same error."""
        failed: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            self.check_format(step)
            try:
                out = self._restore(step, targets)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                log.warning("checkpoint %s/%d cannot be restored (%s); trying the previous one",
                            self.directory, step, why)
                failed.append((step, why))
                continue
            if not self.read_only:
                for bad, _ in failed:
                    self._set_aside(bad)
            return step, out
        if not failed:
            return None
        if restart and not self.read_only:
            for bad, _ in failed:
                self._set_aside(bad)
            return None
        steps = ", ".join(str(s) for s, _ in failed)
        hint = "" if self.read_only else "; nothing was moved; `jaxft train --restart` sets them aside and starts over"
        raise UnreadableCheckpoints(f"{self.directory}: no checkpoint can be restored (steps {steps}; "
                                    f"newest: {failed[0][1]}){hint}")

    def restore_step(self, step: int, targets: dict[str, Any]) -> dict[str, Any]:
        """{item: value} of checkpoint `step` (as `restore_latest`, without falling back)."""
        self.check_format(step)
        return self._restore(step, targets)

    def _restore(self, step: int, targets: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._restore_as(step, targets)
        except Exception as e:
            stacked = [k for k, v in targets.items() if jax.tree.leaves(v) and holds_stacks(v)]
            if not stacked:
                raise
            first = e
        # stacked storage (`model.scan_layers`) restores a checkpoint written with per-layer paths
        # (before stacked storage, or by an unrolled run of the same model) and stacks it here
        try:
            out = self._restore_as(step, {k: per_layer_abstract(v) if k in stacked else v
                                          for k, v in targets.items()})
        except Exception:  # noqa: BLE001 - not that layout either: the first error is the one to report
            raise first from None
        log.warning("checkpoint %s/%d stores its layers one by one; stacked on restore (the next save "
                    "writes the stacked layout)", self.directory, step)
        return {**out, **{k: restack_like(out[k], targets[k]) for k in stacked}}

    def _restore_as(self, step: int, targets: dict[str, Any]) -> dict[str, Any]:
        args = {k: ocp.args.StandardRestore(v) for k, v in targets.items() if jax.tree.leaves(v)}
        args.update(data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        empty = {k: v for k, v in targets.items() if not jax.tree.leaves(v)}  # never stored
        return {**empty, **{k: out[k] for k in (*args,)}}

    def _set_aside(self, step: int) -> None:
        """Move an unreadable step out of the manager's folder (kept for
        inspection, never deleted) so training can write that step again."""
        if jax.process_index() == 0:
            aside = self.directory.parent / "unreadable_checkpoints" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            makedirs(aside.parent)
            move(self.directory / str(step), aside)
            log.warning("moved the unreadable checkpoint to %s", aside)
        multihost_utils.sync_global_devices(f"jaxft:set_aside:{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
