"""Streaming safetensors reading and sharded writing (HF layout), numpy only.

``safetensors.safe_open(..., framework="numpy")`` reads one tensor at a time
(bfloat16 comes back as ``ml_dtypes.bfloat16``), so no torch at runtime and at
most one tensor in host memory per read.  Writing follows
``transformers``' layout: ``model.safetensors``, or
``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointReader:
    """Name -> file index over a single or sharded safetensors checkpoint."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.directory / f for name, f in weight_map.items()}
        elif (self.directory / SINGLE).is_file():
            with safe_open(self.directory / SINGLE, framework="numpy") as f:
                self.files = {name: self.directory / SINGLE for name in f.keys()}
        else:
            found = sorted(p.name for p in self.directory.glob("*.bin"))
            hint = f" (found {found[0]}: PyTorch .bin checkpoints are not supported, re-save with " \
                   "safe_serialization=True)" if found else ""
            raise FileNotFoundError(f"{self.directory}: no {SINGLE} or {INDEX}{hint}")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def keys(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> np.ndarray:
        """One tensor, read in full (the streaming unit)."""
        if name not in self.files:
            raise KeyError(f"{self.directory}: checkpoint has no tensor {name!r}")
        with self._safe_open(self.files[name], framework="numpy") as f:
            return f.get_tensor(name)


def parse_size(size: int | str) -> int:
    """``"2GB"`` / ``"500MB"`` / ``"10KB"`` / ``1000`` -> bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (e.g. '2GB', '500MB', 1000000)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def write_sharded(tensors: Iterable[tuple[str, np.ndarray]], out_dir: str | Path,
                  max_shard_size: int | str = "2GB") -> list[str]:
    """Write ``(name, array)`` pairs as they come; a new shard starts when the current one
    would exceed ``max_shard_size``.  Returns the written file names."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = []
    buf: dict[str, np.ndarray] = {}
    size = total = 0

    def flush() -> None:
        nonlocal buf, size
        if buf:
            save_file(buf, str(out_dir / f".shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            shards.append(list(buf))
        buf, size = {}, 0

    for name, arr in tensors:
        arr = np.ascontiguousarray(arr)
        if buf and size + arr.nbytes > limit:
            flush()
        buf[name] = arr
        size += arr.nbytes
        total += arr.nbytes
    flush()
    for stale in [SINGLE, INDEX, *(p.name for p in out_dir.glob("model-*-of-*.safetensors"))]:
        if (out_dir / stale).exists():
            os.remove(out_dir / stale)
    if len(shards) == 1:
        os.replace(out_dir / ".shard-00000.tmp", out_dir / SINGLE)
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for i, (keys, fname) in enumerate(zip(shards, names)):
        os.replace(out_dir / f".shard-{i:05d}.tmp", out_dir / fname)
        weight_map.update(dict.fromkeys(keys, fname))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names
