"""Checkpoints: one orbax CheckpointManager holding the train state, the data
iterator state (all processes' slots, gathered) and the resolved config.

Resume picks the newest step that restores cleanly: a truncated or partial
newest checkpoint is skipped with a warning, never deleted.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxft.config.schema import CheckpointConfig

log = logging.getLogger(__name__)


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
    def __init__(self, directory: Path, cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any], config: dict[str, Any]) -> None:
        data_state = gather_json(data_state)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)), force=True)

    def read_config(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, data_state) of the newest checkpoint that restores, or None."""
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore()))
                return step, out["state"], out["data"]
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
                log.warning("checkpoint %s/%d cannot be restored (%s: %s); trying the previous one",
                            self.directory, step, type(e).__name__, str(e).splitlines()[0][:200])
                self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        """Move an unreadable step out of the manager's folder (kept for
        inspection, never deleted) so training can write that step again."""
        if jax.process_index() == 0:
            aside = self.directory.parent / "unreadable_checkpoints" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), aside)
            log.warning("moved the unreadable checkpoint to %s", aside)
        multihost_utils.sync_global_devices(f"jaxft:set_aside:{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
