"""Deciding whether a run dir can be resumed with the given config.

A run dir remembers its config in every checkpoint.  Keys that only change
bookkeeping (logging, checkpoint cadence, the mesh - orbax reshards on
restore - and the number of steps) may differ on resume; any other change
(model shape, data, optimizer, batch, seeds) would silently produce a
different run, so it is refused with a one-line error and nothing is written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from jaxft.config.schema import Config, to_dict

log = logging.getLogger(__name__)

SAFE_TO_CHANGE = ("run_dir", "mesh.", "checkpoint.", "eval.", "train.steps", "train.log_every",
                  "train.dev_every", "train.dev_batches", "train.progress_bar")


class ResumeError(ValueError):
    pass


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def incompatible_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    a, b = flatten(saved), flatten(current)
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


def check_compatible(ckpt, cfg: Config, run_dir: Path) -> None:
    steps = ckpt.steps()
    if not steps:
        return
    saved = None
    for step in reversed(steps):
        try:
            saved = ckpt.read_config(step)
            break
        except Exception:  # noqa: BLE001 - unreadable checkpoints are handled by restore
            continue
    if saved is None:
        return
    diffs = incompatible_keys(saved, to_dict(cfg))
    if diffs:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:4])
        more = f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise ResumeError(f"{run_dir}: cannot resume, the config differs from the run's checkpoints in "
                          f"{shown}{more}; use a new run_dir or the original config")


def write_config(cfg: Config, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
