"""Sources of structured records, read in place through their own random access: TFDS
``data_source``, ArrayRecord shards of JSON objects, Parquet files (through a cached Arrow
file), Hugging Face datasets (see each class).  Records are checked when read
(``Source.checked_up_front`` False): a bad record is ``Skipped`` (counted by the pipeline) or,
with ``data.bad_lines: error``, a ``DataError`` naming ``file:index`` (``dataset:index``; the
index within the file, from 0).  The first well-formed record is checked when the source is
opened, so a field mapping that fits no record fails at once.  ``max_examples`` keeps the
first that many records.  File sources take ``path`` as one file, a folder (its files of the
format's suffix) or a glob, in sorted order.
"""

from __future__ import annotations

import bisect
import glob
import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from jaxft.config.schema import SourceConfig
from jaxft.data.index import _digest, cache_root
from jaxft.data.readers import (DataError, Example, Skipped, Source, clean, decode, missing_fields_error,
                                record_texts)

log = logging.getLogger(__name__)

ARROW_BATCH_ROWS = 65536  # rows per record batch of a converted Parquet source
ARROW_VERSION = 1
_FIRST_CHECKED = 64  # the first well-formed record among these is checked against the field mapping


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class RecordSource(Source):
    """A ``Source`` over any ``len()`` / ``[i]`` sequence of dict-like records.

    Subclasses reading files set ``files`` and ``counts`` (records per file) in ``setup``, so
    that errors name ``file:index`` within the file."""

    checked_up_front = False
    reopen_per_process = True  # records are opened again in each process (open file handles)

    def __init__(self, config: SourceConfig, key: str, bad_lines: str = "skip", label: str | None = None, *,
                 index_dir: str | None = None):
        super().__init__(config, key, bad_lines)
        self.label = label or config.path  # "tfds:name[split]", a path: error messages say `label:index`
        self.index_dir = index_dir
        self.files: tuple[str, ...] = ()
        self.counts: tuple[int, ...] = ()
        self._records: Any = None
        self._pid: int | None = None
        self.setup()
        self.starts = tuple(itertools.accumulate((0, *self.counts)))[:-1]
        n = sum(self.counts) if self.files else len(self.records)
        self.n = n if config.max_examples is None else min(n, config.max_examples)
        if self.n == 0:
            raise self.fail(self.label, "dataset split is empty" if not self.files else "has no records")
        self._check_first()
        self.stats.records = self.stats.examples = self.n

    def setup(self) -> None:
        """Find the files, build caches: everything ``open`` needs (runs once, in ``__init__``)."""

    def open(self) -> Any:
        """The underlying ``len()`` / ``[i]`` records (opened once per process)."""
        raise NotImplementedError

    @property
    def records(self) -> Any:
        if self._records is None or (self.reopen_per_process and self._pid != os.getpid()):
            self._records = self.open()
            self._pid = os.getpid()
        return self._records

    def record(self, i: int) -> Any:
        """Record ``i`` as a dict-like, or the reason it is bad (a key of ``REASONS``)."""
        return self.records[i]

    def _check_first(self) -> None:
        for i in range(min(self.n, _FIRST_CHECKED)):
            rec = self.record(i)
            if isinstance(rec, str):
                continue
            if record_texts(self.config, rec) == "field":
                raise missing_fields_error(self.key, self.where(i), rec, self.config.task)
            return

    def __len__(self) -> int:
        return self.n

    def _file(self, i: int) -> tuple[str, int]:
        """(file or label, index in it) of record ``i``."""
        if len(self.files) < 2:
            return self.label, i
        f = bisect.bisect_right(self.starts, i) - 1
        return self.files[f], i - self.starts[f]

    def where(self, i: int) -> str:
        return "%s:%d" % self._file(i)

    def __getitem__(self, i: int) -> Example | Skipped:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"{self.label}: record {i} out of range [0, {self.n})")
        rec, where, file = self.record(i), self.where(i), self._file(i)[0]
        if isinstance(rec, str):
            return self.bad(where, rec, file, count=False)
        return self.from_record(rec, where, file)

    def from_record(self, rec: Any, where: str, file: str) -> Example | Skipped:
        texts = record_texts(self.config, rec)
        out = self.example(*texts, where) if isinstance(texts, tuple) else texts
        return self.bad(where, out, file, count=False) if isinstance(out, str) else out

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if self.reopen_per_process:
            state["_records"] = state["_pid"] = None
        return state

    def find_files(self, suffix: str) -> tuple[str, ...]:
        """``path``: one file, a folder (its ``*suffix`` files) or a glob, in sorted order."""
        path, p = self.config.path, Path(self.config.path)
        if p.is_dir():
            found = [str(f) for f in p.iterdir() if f.name.endswith(suffix)]
        elif p.is_file() or glob.has_magic(path):
            found = [path] if p.is_file() else glob.glob(path, recursive=True)
        else:
            raise self.fail(path, "does not exist")
        files = sorted(f for f in found if Path(f).is_file())
        if not files:
            raise self.fail(path, f"folder has no *{suffix} files" if p.is_dir() else "matches no files")
        if len(files) == 1:
            self.label = files[0]
        return tuple(files)


class TfdsSource(RecordSource):
    """``tfds.data_source(tfds_name, split=tfds_split, data_dir=tfds_data_dir)``."""

    def __init__(self, config: SourceConfig, key: str, bad_lines: str = "skip", **_: Any):
        super().__init__(config, key, bad_lines, f"tfds:{config.tfds_name}[{config.tfds_split}]")

    def open(self) -> Any:
        import tensorflow_datasets as tfds  # heavy import; only when used

        s = self.config
        try:
            return tfds.data_source(s.tfds_name, split=s.tfds_split, data_dir=s.tfds_data_dir)
        except Exception as e:  # noqa: BLE001 - tfds raises many types; report one line
            raise self.fail(self.label, f"cannot open: {_first_line(e)}") from None


# ---------------------------------------------------------------- ArrayRecord


class ArrayRecordSource(RecordSource):
    """``.array_record`` shards of UTF-8 JSON objects (``jaxft data prepare`` writes them), read with
    grain's ``ArrayRecordDataSource``; fields as for JSONL."""


    def setup(self) -> None:
        from array_record.python.array_record_module import ArrayRecordReader

        self.files = self.find_files(".array_record")
        counts = []
        for f in self.files:
            reader = ArrayRecordReader(f)
            if not reader.ok():  # its own message is about sizes, not the format: say what it is not
                raise self.fail(f, "not an ArrayRecord file (or a damaged one)")
            try:
                counts.append(reader.num_records())
            finally:
                reader.close()
        self.counts = tuple(counts)

    def open(self) -> Any:
        import grain

        shards = [f"{f}[0:{n}]" for f, n in zip(self.files, self.counts) if n]
        return grain.sources.ArrayRecordDataSource(shards) if shards else []

    def record(self, i: int) -> Any:
        text = decode(self.records[i])
        if text is None:
            return "utf8"
        try:
            rec = json.loads(clean(text))
        except (json.JSONDecodeError, RecursionError):
            return "json"
        return rec if isinstance(rec, dict) else "json"


# -------------------------------------------------------------------- Parquet


class _Row(Mapping):
    """Row ``j`` of an Arrow record batch as a read-only mapping; a column is converted to
    Python only when asked for (a multi-way dataset may have hundreds)."""

    def __init__(self, batch: Any, j: int):
        self.batch, self.j = batch, j

    def __getitem__(self, name: str) -> Any:
        k = self.batch.schema.get_field_index(name)
        if k < 0:
            raise KeyError(name)
        return self.batch.column(k)[self.j].as_py()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.batch.schema.get_field_index(name) >= 0

    def __iter__(self) -> Iterator[str]:
        return iter(self.batch.schema.names)

    def __len__(self) -> int:
        return self.batch.num_columns


class _ArrowRows:
    """``[i]`` of a memory-mapped Arrow IPC file of ``rows``-row record batches."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.reader = pa.ipc.open_file(pa.memory_map(str(path)))
        self.rows = int(self.reader.schema.metadata[b"jaxft.batch_rows"])
        self._batch: tuple[int, Any] = (-1, None)

    def __getitem__(self, i: int) -> _Row:
        b, j = divmod(int(i), self.rows)
        if self._batch[0] != b:
            self._batch = (b, self.reader.get_batch(b))
        return _Row(self._batch[1], j)


class ParquetSource(RecordSource):
    """``.parquet`` files.  Random access into compressed row groups is too slow for shuffled
    reads, so the files are converted once, streaming, to an uncompressed Arrow IPC file in the
    cache folder (``jaxft.data.index.cache_root``: ``<first file>.<path hash>.<key hash>.arrow``,
    the key hashing each file's real path, size and mtime; an older conversion of the same path
    is removed) in batches of ``ARROW_BATCH_ROWS`` rows, read memory-mapped: row ``i`` is row
    ``i % n`` of batch ``i // n``.  All columns are kept (nested ones too); a record converts
    only the columns the field mapping reads."""

    def setup(self) -> None:
        import pyarrow.parquet as pq

        self.files = self.find_files(".parquet")
        counts = []
        for f in self.files:
            try:
                counts.append(pq.ParquetFile(f).metadata.num_rows)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types; one line
                raise self.fail(f, f"not a Parquet file ({_first_line(e)})") from None
        self.counts = tuple(counts)
        stats = [os.stat(f) for f in self.files]
        key_obj = {"version": ARROW_VERSION, "batch_rows": ARROW_BATCH_ROWS,
                   "files": [[os.path.realpath(f), st.st_size, st.st_mtime_ns] for f, st in zip(self.files, stats)]}
        root = cache_root(self.index_dir)
        stem = f"{Path(self.files[0]).name}.{_digest(os.path.realpath(self.config.path))}"
        self.arrow_path = root / f"{stem}.{_digest(key_obj)}.arrow"
        if not self.arrow_path.is_file():
            self._convert(root, stem)

    def _convert(self, root: Path, stem: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{stem}.", suffix=".partial")
            os.close(fd)
        except OSError as e:
            raise DataError(f"{root}: cannot write the Arrow conversion of {self.config.path} ({e.strerror}; "
                            f"set data.index_dir or $JAXFT_CACHE to a writable folder)") from None
        t0 = time.time()
        try:
            schema = pq.ParquetFile(self.files[0]).schema_arrow
            schema = schema.with_metadata({**(schema.metadata or {}), b"jaxft.batch_rows": b"%d" % ARROW_BATCH_ROWS})
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for batch in _rebatch(self._batches(schema), ARROW_BATCH_ROWS):
                    writer.write_batch(batch)
            for old in set(root.glob(f"{stem}.*.arrow")) - {self.arrow_path}:  # earlier versions of these files
                old.unlink(missing_ok=True)
            os.replace(tmp, self.arrow_path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        log.info("%s: converted %d rows of %d Parquet file(s) in %.1f s -> %s", self.name, sum(self.counts),
                 len(self.files), time.time() - t0, self.arrow_path)

    def _batches(self, schema: Any) -> Iterator[Any]:
        """The record batches of every file, in order, as ``schema`` (constant memory)."""
        import pyarrow.parquet as pq

        for f in self.files:
            pf = pq.ParquetFile(f)
            same = pf.schema_arrow.equals(schema, check_metadata=False)
            for batch in pf.iter_batches(batch_size=ARROW_BATCH_ROWS):
                if not same:
                    try:
                        batch = batch.cast(schema)
                    except Exception:  # noqa: BLE001 - ArrowInvalid / NotImplemented / ValueError
                        raise self.fail(f, f"columns differ from those of {self.files[0]}: "
                                           f"{pf.schema_arrow.names} vs {schema.names}") from None
                yield batch

    def open(self) -> Any:
        try:
            rows = _ArrowRows(self.arrow_path)
            if rows.reader.num_record_batches != -(-sum(self.counts) // rows.rows):
                raise ValueError(f"not the {sum(self.counts)} rows of {self.config.path}")
        except (OSError, KeyError, TypeError, ValueError) as e:  # removed or damaged cache file
            raise self.fail(str(self.arrow_path), f"cannot read this Arrow conversion of {self.config.path} "
                                                  f"({_first_line(e)}); delete it to rebuild it") from None
        return rows


def _rebatch(batches: Iterator[Any], rows: int) -> Iterator[Any]:
    """``batches`` as record batches of exactly ``rows`` rows (the last may be shorter)."""
    import pyarrow as pa

    pending: list[Any] = []
    n = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        n += batch.num_rows
        while n >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows).combine_chunks().to_batches()[0]
            pending, n = table.slice(rows).to_batches(), n - rows
    if n:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


# ------------------------------------------------------- Hugging Face datasets


class HfSource(RecordSource):
    """A Hugging Face ``datasets.Dataset``: ``path``, a folder written by ``save_to_disk`` (of a
    ``DatasetDict``: its ``hf_split``), or ``hf_name`` (a hub id, a local dataset folder or a
    builder; ``hf:`` prefix optional) loaded with ``load_dataset(hf_name, hf_config,
    split=hf_split)``.  Needs ``pip install 'jaxft[hf]'``.  Datasets are memory-mapped Arrow
    files and pickle as their file names, so a pickled source carries its opened dataset
    (worker processes do not load it again)."""

    reopen_per_process = False

    def __init__(self, config: SourceConfig, key: str, bad_lines: str = "skip", **kw: Any):
        s = config
        if s.path is not None:
            label = f"{s.path}[{s.hf_split}]" if (Path(s.path) / "dataset_dict.json").is_file() else s.path
        else:
            label = f"hf:{s.hf_name.removeprefix('hf:')}{'/' + s.hf_config if s.hf_config else ''}[{s.hf_split}]"
        super().__init__(config, key, bad_lines, label, **kw)

    def open(self) -> Any:
        try:
            import datasets
        except ImportError:
            raise self.fail(self.label, "type hf needs the `datasets` package: pip install 'jaxft[hf]'") from None
        s, path = self.config, self.config.path
        if path is None:
            name = s.hf_name.removeprefix("hf:")
            try:
                return datasets.load_dataset(name, s.hf_config, split=s.hf_split)
            except Exception as e:  # noqa: BLE001 - not found, offline, no such split/config: one line
                raise self.fail(self.label, f"cannot load {name!r} (check {self.key}.hf_name / hf_config / "
                                            f"hf_split): {_first_line(e)}") from None
        if not Path(path).is_dir():
            raise self.fail(path, "does not exist" if not Path(path).exists() else
                            "is not a folder (type hf: a folder written by Dataset.save_to_disk)")
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # noqa: BLE001 - FileNotFoundError / ValueError / json errors
            raise self.fail(path, f"not a folder written by Dataset.save_to_disk ({_first_line(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if s.hf_split not in ds:
                raise self.fail(path, f"has no split {s.hf_split!r} (splits: {sorted(ds)}); set {self.key}.hf_split")
            ds = ds[s.hf_split]
        return ds


RECORD_SOURCES: dict[str, type[Source]] = {"tfds": TfdsSource, "arrayrecord": ArrayRecordSource,
                                           "parquet": ParquetSource, "hf": HfSource}
