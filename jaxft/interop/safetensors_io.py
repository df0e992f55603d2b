"""Streaming safetensors reading and sharded writing (HF layout), numpy only.

`CheckpointReader.get` maps one tensor's bytes read-only and returns a numpy view of them
(bfloat16 / float8 as ``ml_dtypes`` types): no torch at runtime, no copy when reading,
and at most the tensors in flight held by the process.  Writing follows
``transformers``' layout: ``model.safetensors``, or
``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np

from jaxft.config.errors import FileFormatError, read_json

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# prefault a mapped tensor in one call (Linux) instead of a page fault per 4 KiB page read
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
# safetensors dtype names numpy (with ml_dtypes) can view in place
_DTYPES = {"BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8), "I16": np.dtype(np.int16),
           "U16": np.dtype(np.uint16), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
           "I32": np.dtype(np.int32), "U32": np.dtype(np.uint32), "F32": np.dtype(np.float32),
           "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "U64": np.dtype(np.uint64),
           "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}


class CheckpointReader:
    """Name -> file index over a single or sharded safetensors checkpoint.  A file that is
    not a readable safetensors file (truncated, corrupt) raises a one-line ``FileFormatError``
    naming it."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._headers: dict[Path, tuple[int, dict]] = {}
        index = self.directory / INDEX
        if index.is_file():
            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise FileFormatError(f"{index}: no 'weight_map' object (tensor name -> file name)")
            self.files = {name: self.directory / f for name, f in weight_map.items()}
            for file in sorted(set(self.files.values())):
                if not file.is_file():
                    raise FileNotFoundError(f"{file}: listed in {index} but missing")
        elif (self.directory / SINGLE).is_file():
            with _open(self.directory / SINGLE) as f:
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
        """One tensor (the streaming unit): a read-only array over a memory map of its own bytes
        in the file, so reading copies nothing; whoever keeps it copies it once (a device
        transfer does).  The map closes when the last array over it is dropped, so the process
        holds only the tensors in flight, not the file.  A dtype numpy cannot view is read by
        ``safetensors`` instead."""
        if name not in self.files:
            raise KeyError(f"{self.directory}: checkpoint has no tensor {name!r}")
        path = self.files[name]
        start, entries = self._header(path)
        entry = entries.get(name)
        if entry is None:
            raise FileFormatError(f"{path}: has no tensor {name!r} (the index says it does)")
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            return self._get_copy(path, name)
        shape = tuple(entry["shape"])
        begin, end = (start + o for o in entry["data_offsets"])
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize:
            raise FileFormatError(f"{path}: tensor {name!r} holds {end - begin} bytes, but {entry['dtype']} "
                                  f"{list(shape)} needs {count * dtype.itemsize}")
        if count == 0:
            return np.zeros(shape, dtype)
        lead = begin % mmap.ALLOCATIONGRANULARITY
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), end - begin + lead, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ,
                               offset=begin - lead)
        return np.frombuffer(mapped, dtype, count, offset=lead).reshape(shape)

    def _header(self, path: Path) -> tuple[int, dict]:
        """(offset of the data, {name: header entry}) of one file, read once; ``safe_open``
        validates the file first, so a truncated or corrupt one fails with its one-line reason."""
        if path not in self._headers:
            with _open(path):
                pass
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n).decode("utf-8"))
            self._headers[path] = (8 + n, {k: v for k, v in header.items() if k != "__metadata__"})
        return self._headers[path]

    def _get_copy(self, path: Path, name: str) -> np.ndarray:
        with _open(path) as f:
            try:
                return f.get_tensor(name)
            except Exception as e:  # noqa: BLE001 - SafetensorError and friends: one line naming the file
                raise FileFormatError(f"{path}: cannot read tensor {name!r}: {_first_line(e)}") from None


def load_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file (``safetensors.numpy.load_file`` with one-line
    errors naming the file)."""
    with _open(Path(path)) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Any]:
    """``safe_open`` (numpy); a file it refuses raises a one-line error saying why."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="numpy")
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError is a plain Exception
        raise FileFormatError(f"{path}: {diagnose(path) or 'not a valid safetensors file'} "
                              f"({_first_line(e)})") from None
    with handle as f:
        yield f


def diagnose(path: str | Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (truncated header or data), or None."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated or not a safetensors file: {size} bytes, shorter than the 8-byte header size"
        n = struct.unpack("<Q", head)[0]
        if size < 8 + n:
            return (f"truncated or not a safetensors file: the header should be {n} bytes "
                    f"but only {size - 8} follow")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return "not a safetensors file (the header is not JSON)"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
            and isinstance(v["data_offsets"][1], int)] if isinstance(header, dict) else []
    if ends and size < 8 + n + max(ends):
        return f"truncated: the header says the file is {8 + n + max(ends)} bytes but it has {size}"
    return None


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


_CODES = {dtype: code for code, dtype in _DTYPES.items()}
# the order of safetensors' Dtype enum (its files lay tensors out by it, descending, then by name)
_RANK = {code: i for i, code in enumerate(["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
                                           "I32", "U32", "F32", "F64", "I64", "U64"])}


Spec = tuple  # (name, shape, numpy dtype) of a tensor to write


def write_file(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """One safetensors file (`write_stream` of arrays at hand)."""
    write_stream(path, [(k, tuple(np.shape(v)), np.asarray(v).dtype) for k, v in tensors.items()],
                 tensors.__getitem__, metadata)


def write_stream(path: str | Path, specs: Sequence[Spec], produce: Callable[[str], np.ndarray],
                 metadata: dict[str, str] | None = None) -> None:
    """One safetensors file whose header is written from ``specs`` first, then each tensor's bytes
    as ``produce(name)`` returns it: the host holds one tensor at a time (the library's
    ``save_file`` serialises a whole file into one bytes object first).  The layout is the
    library's: a header padded to 8 bytes, then the tensors by dtype (widest first, its enum
    order) and name, so every tensor is aligned.  A produced array whose shape or dtype is not
    the planned one is an error naming the file and tensor; a failed write leaves no file."""
    path = Path(path)
    for name, _, dtype in specs:
        if np.dtype(dtype) not in _CODES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {np.dtype(dtype)}, which safetensors cannot store")
    order = sorted(specs, key=lambda spec: (-_RANK[_CODES[np.dtype(spec[2])]], spec[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dtype in order:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape, dtype in order:
                arr = np.asarray(produce(name))
                if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
                    raise ValueError(f"{path}: tensor {name!r} came out {arr.dtype}{list(arr.shape)}, "
                                     f"planned {np.dtype(dtype)}{list(shape)}")
                if arr.size:
                    f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
                del arr
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def shard_plan(specs: Sequence[Spec], max_shard_size: int | str = "2GB") -> list[list[Spec]]:
    """``specs`` cut into shards in order, as transformers does: a new shard starts when the
    current one would exceed ``max_shard_size`` (a tensor larger than that gets its own)."""
    limit = parse_size(max_shard_size)
    shards: list[list[Spec]] = []
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * np.dtype(spec[2]).itemsize
        if not shards or (shards[-1] and size + nbytes > limit):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def stream_order(specs: Sequence[Spec], max_shard_size: int | str = "2GB") -> list[str]:
    """The order in which `write_sharded_stream` calls ``produce`` (processes that only take part
    in gathering the tensors must follow it)."""
    return [spec[0] for shard in shard_plan(specs, max_shard_size)
            for spec in sorted(shard, key=lambda spec: (-_RANK[_CODES[np.dtype(spec[2])]], spec[0]))]


def write_sharded_stream(specs: Sequence[Spec], produce: Callable[[str], np.ndarray], out_dir: str | Path,
                         max_shard_size: int | str = "2GB") -> list[str]:
    """An HF checkpoint folder (one file, or shards plus the index) of tensors known by ``specs``
    up front and produced one at a time (`write_stream`).  The folder's previous checkpoint files
    are replaced only once every new shard is complete.  Returns the written file names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = shard_plan(specs, max_shard_size)
    tmp = [out_dir / f".shard-{i:05d}.tmp" for i in range(len(shards))]
    try:
        for path, shard in zip(tmp, shards):
            write_stream(path, shard, produce, metadata={"format": "pt"})
    except BaseException:
        for path in tmp:
            path.unlink(missing_ok=True)
        raise
    return _publish(out_dir, [[spec[0] for spec in shard] for shard in shards],
                    sum(math.prod(spec[1]) * np.dtype(spec[2]).itemsize for spec in specs))


def write_sharded(tensors: Iterable[tuple[str, np.ndarray]], out_dir: str | Path,
                  max_shard_size: int | str = "2GB") -> list[str]:
    """Write ``(name, array)`` pairs as they come, holding one shard's arrays at a time; a new
    shard starts when the current one would exceed ``max_shard_size``.  Returns the written
    file names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = []
    buf: dict[str, np.ndarray] = {}
    size = total = 0

    def flush() -> None:
        nonlocal buf, size
        if buf:
            write_file(out_dir / f".shard-{len(shards):05d}.tmp", buf, metadata={"format": "pt"})
            shards.append(list(buf))
        buf, size = {}, 0

    try:
        for name, arr in tensors:
            arr = np.asarray(arr)
            if buf and size + arr.nbytes > limit:
                flush()
            buf[name] = arr
            size += arr.nbytes
            total += arr.nbytes
        flush()
    except BaseException:
        for path in out_dir.glob(".shard-*.tmp"):
            path.unlink(missing_ok=True)
        raise
    return _publish(out_dir, shards, total)


def _publish(out_dir: Path, shards: list[list[str]], total: int) -> list[str]:
    """The written ``.shard-*.tmp`` files renamed into place (the old checkpoint's files removed
    first), plus the index for more than one shard."""
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
