"""Deciding whether a run dir can be resumed with the given config.

A run dir remembers its config in every checkpoint.  Keys that only change
bookkeeping (logging, checkpoint cadence, the mesh - orbax reshards on
restore - and the number of steps; the lr schedule keeps its length, see
`fix_schedule_length`) or only memory (`model.remat`, `train.loss_chunk`) may
differ on resume; any other change
(model shape, data, optimizer, batch, seeds) would silently produce a
different run, so it is refused with a one-line error and nothing is written.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax
import yaml

from jaxft.config.schema import Config, SourceConfig, to_dict
from jaxft.outputs import atomic_write_text
from jaxft.paths import makedirs, move

log = logging.getLogger(__name__)

SAFE_TO_CHANGE = ("run_dir", "compile_cache", "mesh.", "checkpoint.", "eval.", "train.steps", "train.log_every",
                  "train.dev_every", "train.dev_batches", "train.progress_bar",
                  # memory only, same numbers up to float summation order: what a resume on a
                  # smaller slice (or after an out-of-memory) needs to change
                  "model.remat", "train.loss_chunk", "train.loss_chunk_mib")


class ResumeError(ValueError):
    pass


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the keys added to the schema since it was written set to their
    defaults (an older run dir resumes as it was: a new key's default keeps old behaviour),
    data sources included."""
    def fill(value: Any, default: Any) -> Any:
        if isinstance(default, dict) and isinstance(value, dict):
            return {**default, **{k: fill(v, default.get(k)) for k, v in value.items()}}
        return value

    out = fill(saved, to_dict(Config()))
    source = to_dict(SourceConfig())
    data = out.get("data") if isinstance(out.get("data"), dict) else {}
    for split in ("train", "dev"):
        if isinstance(data.get(split), list):
            data[split] = [fill(src, source) if isinstance(src, dict) else src for src in data[split]]
    return out


def incompatible_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    a, b = flatten(_with_defaults(saved)), flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, list):
            va = [x for x in va]
        if isinstance(vb, (list, tuple)):
            vb = list(vb)
        if va != vb and not any(key == s or key.startswith(s) for s in SAFE_TO_CHANGE):
            diffs.append((key, va, vb))
    return diffs


def _saved_config(ckpt) -> dict[str, Any] | None:
    for step in reversed(ckpt.steps()):
        try:
            return ckpt.read_config(step)
        except Exception:  # noqa: BLE001 - unreadable checkpoints are handled by restore
            continue
    return None


def fix_schedule_length(cfg: Config, saved: dict[str, Any] | None) -> Config:
    """The lr schedule's length is fixed when a run starts: `optimizer.decay_steps`
    unset -> the run's first `train.steps` (kept in its checkpoints), so raising
    `train.steps` on resume trains on at the schedule's end value instead of
    silently re-timing the steps already scheduled."""
    if cfg.optimizer.decay_steps is not None:
        return cfg
    length = cfg.train.steps
    if saved is not None:
        opt, train = saved.get("optimizer", {}), saved.get("train", {})
        length = opt.get("decay_steps") or train.get("steps") or length
        if length != cfg.train.steps:
            log.info("optimizer.decay_steps: the lr schedule keeps the length the run started with (%d steps)",
                     length)
    return dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, decay_steps=int(length)))


def _unset_length(saved: dict[str, Any]) -> bool:
    """A run written before the schedule length was stored (its length was its train.steps)."""
    return saved.get("optimizer", {}).get("decay_steps") is None


def check_compatible(ckpt, cfg: Config, run_dir: Path) -> Config:
    """`cfg` with its schedule length fixed (`fix_schedule_length`); raises
    ResumeError when the run dir's checkpoints were made with a different run."""
    saved = _saved_config(ckpt)
    cfg = fix_schedule_length(cfg, saved)
    if saved is None:
        return cfg
    saved = {**saved, "optimizer": {**saved.get("optimizer", {}),
                                    "decay_steps": saved.get("train", {}).get("steps") if _unset_length(saved)
                                    else saved["optimizer"]["decay_steps"]}}
    diffs = incompatible_keys(saved, to_dict(cfg))
    if diffs:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:4])
        more = f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise ResumeError(f"{run_dir}: cannot resume, the config differs from the run's checkpoints in "
                          f"{shown}{more}; use a new run_dir or the original config")
    return cfg


def write_config(cfg: Config, run_dir: Path) -> None:
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def set_aside_history(dirs) -> None:
    """`jaxft train --restart`: the metrics of the abandoned attempt move next to its
    unreadable checkpoints (never deleted)."""
    if jax.process_index() == 0 and dirs.metrics.exists():
        aside = dirs.unreadable / f"metrics-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        makedirs(aside.parent)
        move(dirs.metrics, aside)
        log.warning("--restart: moved the old metrics.jsonl to %s", aside)
