"""The safetensors reader maps tensors in place: the same values as ``safetensors``' own reader,
no writable alias of the file, and old arrays unaffected when the file is replaced."""

from __future__ import annotations

import json
import os
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from jaxft.config.errors import FileFormatError
from jaxft.interop.safetensors_io import CheckpointReader, write_file, write_sharded


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a.bf16": rng.normal(size=(33, 7)).astype(ml_dtypes.bfloat16),
        "b.f32": rng.normal(size=(5, 4, 3)).astype(np.float32),
        "c.f16": rng.normal(size=(9,)).astype(np.float16),
        "d.i64": rng.integers(-2**40, 2**40, size=(6,)),
        "e.bool": rng.random((3, 5)) > 0.5,
        "f.u8": rng.integers(0, 255, size=(3,), dtype=np.uint8),  # odd length: later offsets unaligned
        "h.scalar": np.asarray(3.5, np.float32),
        "i.empty": np.zeros((0, 4), np.float32),
        "j.big": rng.normal(size=(300, 257)).astype(np.float32),  # spans several pages
    }


@pytest.mark.parametrize("shard_size", ["1GB", 2000], ids=["single", "sharded"])
def test_reader_returns_the_stored_values(tmp_path, shard_size):
    want = tensors()
    files = write_sharded(want.items(), tmp_path, max_shard_size=shard_size)
    assert (len(files) > 1) == (shard_size == 2000)
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.keys()) == sorted(want)
    for name, ref in want.items():
        got = reader.get(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert got.tobytes() == np.ascontiguousarray(ref).tobytes(), name
        with safe_open(str(reader.files[name]), framework="numpy") as f:  # the library's own reading
            assert got.tobytes() == f.get_tensor(name).tobytes(), name


def write_raw(path, entries: dict[str, np.ndarray], dtypes: dict[str, str]) -> None:
    """A safetensors file written by hand (``safetensors.numpy`` cannot write float8)."""
    header, offset, blobs = {}, 0, []
    for name, arr in entries.items():
        blob = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtypes[name], "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


@pytest.mark.parametrize("writer", ["by hand", "write_file"])
def test_float8_tensors_are_viewed_as_ml_dtypes(tmp_path, writer):
    rng = np.random.default_rng(1)
    want = {"x": rng.normal(size=(3, 5)).astype(ml_dtypes.float8_e4m3fn),
            "y": rng.normal(size=(7,)).astype(ml_dtypes.float8_e5m2)}
    if writer == "by hand":
        write_raw(tmp_path / "model.safetensors", want, {"x": "F8_E4M3", "y": "F8_E5M2"})
    else:
        write_file(tmp_path / "model.safetensors", want)
    reader = CheckpointReader(tmp_path)
    for name, ref in want.items():
        got = reader.get(name)
        assert got.dtype == ref.dtype and got.tobytes() == ref.tobytes()


def test_written_files_are_laid_out_as_safetensors_lays_them_out(tmp_path):
    """The streaming writer's file holds what ``safetensors.numpy.save_file`` writes for the same
    tensors: the same header entries (dtypes, shapes, offsets) and the same data bytes, 8-byte aligned."""
    from safetensors.numpy import save_file

    want = tensors()
    write_file(tmp_path / "ours.safetensors", want, metadata={"format": "pt"})
    save_file(want, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})

    def parse(path):
        raw = path.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        return n, json.loads(raw[8:8 + n]), raw[8 + n:]

    (n_ours, ours, data_ours), (_, theirs, data_theirs) = (parse(tmp_path / f) for f in ("ours.safetensors", "theirs.safetensors"))
    assert ours == theirs and data_ours == data_theirs and n_ours % 8 == 0


def test_a_dtype_safetensors_cannot_store_is_refused_with_the_tensor_name(tmp_path):
    with pytest.raises(ValueError, match="'z'.*complex64"):
        write_file(tmp_path / "x.safetensors", {"z": np.zeros(2, np.complex64)})


def test_mapped_arrays_are_read_only_and_outlive_a_replaced_file(tmp_path):
    """Nothing can write through an array into the checkpoint, and a device copy or a held array
    keeps its values when the file is rewritten (export writes a new file and renames it over)."""
    want = tensors()
    write_sharded(want.items(), tmp_path)
    arr = CheckpointReader(tmp_path).get("j.big")
    with pytest.raises(ValueError):
        arr[0, 0] = 1.0
    on_device = jax.device_put(arr)
    write_sharded([(k, np.zeros_like(v)) for k, v in want.items()], tmp_path)  # same names, new file
    assert np.array_equal(arr, want["j.big"]) and np.array_equal(np.asarray(on_device), want["j.big"])
    assert not CheckpointReader(tmp_path).get("j.big").any()


def test_a_tensor_whose_bytes_do_not_match_its_shape_names_the_file(tmp_path):
    """A hand-edited header (shape says 4 floats, offsets hold 3) fails with one line naming the
    file and the tensor, whichever reader notices first."""
    write_raw(tmp_path / "model.safetensors", {"w": np.zeros(3, np.float32)}, {"w": "F32"})
    raw = (tmp_path / "model.safetensors").read_bytes().replace(b'"shape": [3]', b'"shape": [4]')
    (tmp_path / "model.safetensors").write_bytes(raw)
    with pytest.raises(FileFormatError, match="model.safetensors") as e:
        CheckpointReader(tmp_path).get("w")
    assert "\n" not in str(e.value)


def test_a_missing_tensor_of_an_index_names_the_file(tmp_path):
    write_sharded(tensors().items(), tmp_path, max_shard_size=2000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost"] = next(iter(index["weight_map"].values()))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileFormatError, match="has no tensor 'ghost'"):
        CheckpointReader(tmp_path).get("ghost")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")


def specs_of(arrays: dict[str, np.ndarray]) -> list[tuple]:
    return [(k, tuple(v.shape), v.dtype) for k, v in arrays.items()]


@pytest.mark.parametrize("shard_size", ["1GB", 2000], ids=["single", "sharded"])
def test_streamed_checkpoint_equals_the_buffered_one(tmp_path, shard_size):
    """Headers first, tensors produced one at a time, in `stream_order`: the same files, byte for
    byte, as writing the arrays at hand."""
    from jaxft.interop.safetensors_io import stream_order, write_sharded_stream

    want = tensors()
    calls = []

    def produce(name):
        calls.append(name)
        return want[name]

    names = write_sharded_stream(specs_of(want), produce, tmp_path / "stream", shard_size)
    assert names == write_sharded(want.items(), tmp_path / "buffered", shard_size)
    assert calls == stream_order(specs_of(want), shard_size) and sorted(calls) == sorted(want)
    for f in sorted((tmp_path / "buffered").iterdir()):
        assert (tmp_path / "stream" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("failure", ["wrong shape", "raises"])
def test_a_failed_stream_keeps_the_previous_checkpoint(tmp_path, failure):
    from jaxft.interop.safetensors_io import write_sharded_stream

    old = tensors()
    write_sharded(old.items(), tmp_path, max_shard_size=2000)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def produce(name):
        if name == "j.big":
            if failure == "raises":
                raise RuntimeError("device gone")
            return np.zeros((2, 2), np.float32)
        return old[name]

    with pytest.raises((ValueError, RuntimeError), match="j.big.*planned float32\\[300, 257\\]|device gone"):
        write_sharded_stream(specs_of(old), produce, tmp_path, max_shard_size=2000)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary files either
