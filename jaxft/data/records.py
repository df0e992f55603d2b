"""Sources of structured records, read in place through their own random access: TFDS
``data_source`` (ArrayRecord).  Records are checked when read (``Source.checked_up_front`` is
False): a bad record is ``Skipped`` (counted by the pipeline) or, with ``data.bad_lines:
error``, a ``DataError`` naming ``dataset:index``.  The first record is checked when the
source is opened, so a field mapping that fits no record fails at once."""

from __future__ import annotations

from typing import Any

from jaxft.config.schema import SourceConfig
from jaxft.data.readers import Example, Skipped, Source, missing_fields_error, record_texts


class RecordSource(Source):
    """A ``Source`` over any ``len()`` / ``[i]`` sequence of dict-like records."""

    checked_up_front = False

    def __init__(self, config: SourceConfig, key: str, bad_lines: str, label: str):
        super().__init__(config, key, bad_lines)
        self.label = label  # "tfds:name[split]", the file or dataset: error messages say `label:index`
        self._records: Any = None
        self.n = len(self.records)
        if self.n == 0:
            raise self.fail(label, "dataset split is empty")
        if record_texts(config, self.records[0]) == "field":
            raise missing_fields_error(key, f"{label}:0", self.records[0])
        self.stats.records = self.stats.examples = self.n

    def open(self) -> Any:
        """The underlying ``len()`` / ``[i]`` records (opened once per process)."""
        raise NotImplementedError

    @property
    def records(self) -> Any:
        if self._records is None:
            self._records = self.open()
        return self._records

    def __len__(self) -> int:
        return self.n

    def where(self, i: int) -> str:
        return f"{self.label}:{i}"

    def __getitem__(self, i: int) -> Example | Skipped:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"{self.label}: record {i} out of range [0, {self.n})")
        return self.from_record(self.records[i], f"{self.label}:{i}", self.label)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_records"] = None
        return state


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
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise self.fail(self.label, f"cannot open: {first_line}") from None


RECORD_SOURCES: dict[str, type[Source]] = {"tfds": TfdsSource}
