"""Where rows come from: JSONL / JSON files, Parquet files or folders, `save_to_disk` folders, Hugging Face hub datasets.

A `Source` gives rows as dicts, in batches, each with where it is (a JSONL line, a JSON entry, a row index) for
error messages, and some rows by index (`take`), without ever holding the whole dataset as Python objects:

| format | opened with | read | selected rows written as |
|---|---|---|---|
| `.jsonl` | a line index (byte offsets, 16 bytes a row) | line by line, from any row | the original lines, unchanged (`selected.jsonl`) |
| `.json` (a list) | json, whole (small files) | from the list | JSONL (`selected.jsonl`) |
| `.parquet` file or folder | pyarrow.dataset | streamed record batches | Parquet (`selected.parquet`) |
| `save_to_disk` folder | datasets.load_from_disk (memory-mapped Arrow) | slices | a `save_to_disk` folder (`selected/`) |
| hub id (`org/name`) | datasets.load_dataset(id, subset, split, revision) | slices | Parquet (`selected.parquet`) |

Written selections keep every column of the source and add `rose_pl_index` (the row's index in the source),
`rose_pl_id` and `rose_pl_score` where the format has columns; JSONL rows are written unchanged (the sidecar
selection.json has their indices, ids and scores).
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from rose_pl.config import Dataset, DatasetSpec, dataset_spec
from rose_pl.errors import DataFormatError
from rose_pl.files import atomic_dir, atomic_write, file_digest

log = logging.getLogger(__name__)

Row = tuple[int, Any, Any]
"""(row index in the source, where it is for messages, the row as read)."""

SELECTED_COLUMNS = ("rose_pl_index", "rose_pl_id", "rose_pl_score")


class Source(ABC):
    """Rows of one dataset, by index and in batches."""

    format: str = ""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def batches(self, start: int = 0, stop: int | None = None, size: int = 1024) -> Iterator[list[Row]]:
        """Rows [start, stop) in order, `size` at a time."""

    @abstractmethod
    def take(self, indices: Sequence[int]) -> list[Any]:
        """The rows at `indices`, in that order."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A digest of the dataset's content."""

    @abstractmethod
    def write_selection(self, indices: Sequence[int], folder: Path, ids: Sequence[str],
                        scores: Sequence[float] | None) -> Path:
        """The rows at `indices` (in that order) in the source's own format, in `folder`; returns the written path."""

    def where(self, index: int) -> Any:
        return f"row {index}"

    def rows(self, size: int = 1024) -> Iterator[Row]:
        for batch in self.batches(size=size):
            yield from batch


def load_json(path: Path) -> Any:
    """A JSON file, refusing repeated keys (JSON keeps only the last one: a repeated prompt would lose a row)."""
    def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
        # json.loads keeps the last of repeated keys; a repeated prompt would lose a row without a word.
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise DataFormatError(path, f"key {_short(key)}", "duplicate key (JSON keeps only the last one)")
            out[key] = value
        return out

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(path, None, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, e.lineno, f"malformed JSON: {e.msg} at column {e.colno}") from None


def _short(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


# ---- JSON lines ------------------------------------------------------------------------------------------
class JsonlSource(Source):
    """A JSONL file, indexed once by the byte offset and line number of each non-blank line."""

    format = "jsonl"

    def __init__(self, spec: DatasetSpec):
        super().__init__(spec)
        self.path = Path(spec.path)
        offsets, lines = [], []
        position = 0
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(position)
                    lines.append(number)
                position += len(line)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lines = np.asarray(lines, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, index: int) -> int:
        return int(self.lines[index])

    def _parse(self, raw: bytes, line: int) -> Any:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataFormatError(self.path, line, f"not valid UTF-8 ({e.reason})") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(self.path, line, f"malformed JSON: {e.msg} at column {e.colno}") from None

    def raw_lines(self, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
        if start >= stop:
            return
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[start]))
            i = start
            while i < stop:
                line = f.readline()
                if line.strip():
                    yield i, line
                    i += 1

    def batches(self, start: int = 0, stop: int | None = None, size: int = 1024) -> Iterator[list[Row]]:
        stop = len(self) if stop is None else stop
        batch: list[Row] = []
        for i, raw in self.raw_lines(start, stop):
            line = int(self.lines[i])
            batch.append((i, line, self._parse(raw, line)))
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _raw(self, indices: Sequence[int]) -> dict[int, bytes]:
        out = {}
        with open(self.path, "rb") as f:
            for i in sorted(set(int(i) for i in indices)):
                f.seek(int(self.offsets[i]))
                out[i] = f.readline()
        return out

    def take(self, indices: Sequence[int]) -> list[Any]:
        raw = self._raw(indices)
        return [self._parse(raw[int(i)], int(self.lines[i])) for i in indices]

    def fingerprint(self) -> str:
        return file_digest(self.path)

    def write_selection(self, indices, folder, ids, scores) -> Path:
        raw = self._raw(indices)
        out = folder / "selected.jsonl"

        def write(f) -> None:  # the pool's own lines, byte for byte (a last line without a newline gets one)
            for i in indices:
                line = raw[int(i)]
                f.write(line if line.endswith(b"\n") else line + b"\n")

        atomic_write(out, write)
        return out


# ---- a JSON list -----------------------------------------------------------------------------------------
class JsonListSource(Source):
    """A JSON file holding a list of rows (read whole: such files are small)."""

    format = "json"

    def __init__(self, spec: DatasetSpec):
        super().__init__(spec)
        self.path = Path(spec.path)
        data = load_json(self.path)
        if not isinstance(data, list):
            raise DataFormatError(self.path, None, f"expected a JSON list of rows, got {type(data).__name__}")
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def where(self, index: int) -> str:
        return f"entry {index}"

    def batches(self, start: int = 0, stop: int | None = None, size: int = 1024) -> Iterator[list[Row]]:
        stop = len(self) if stop is None else stop
        for s in range(start, stop, size):
            yield [(i, f"entry {i}", self.data[i]) for i in range(s, min(s + size, stop))]

    def take(self, indices: Sequence[int]) -> list[Any]:
        return [self.data[int(i)] for i in indices]

    def fingerprint(self) -> str:
        return file_digest(self.path)

    def write_selection(self, indices, folder, ids, scores) -> Path:
        out = folder / "selected.jsonl"
        text = "".join(json.dumps(self.data[int(i)], ensure_ascii=False) + "\n" for i in indices)
        atomic_write(out, lambda f: f.write(text.encode("utf-8")))
        return out


# ---- Parquet ---------------------------------------------------------------------------------------------
def _selected_columns(indices, ids, scores) -> dict[str, list]:
    columns = {"rose_pl_index": [int(i) for i in indices], "rose_pl_id": [str(ids[int(i)]) for i in indices]}
    if scores is not None:
        columns["rose_pl_score"] = [float(scores[int(i)]) for i in indices]
    return columns


class ParquetSource(Source):
    """A Parquet file, or a folder of them (one dataset, files in name order), read through pyarrow.dataset."""

    format = "parquet"

    def __init__(self, spec: DatasetSpec):
        import pyarrow.dataset as ds

        super().__init__(spec)
        self.path = Path(spec.path)
        self.files = [self.path] if self.path.is_file() else sorted(self.path.rglob("*.parquet"))
        self.dataset = ds.dataset([str(f) for f in self.files], format="parquet")
        self._len = self.dataset.count_rows()

    def __len__(self) -> int:
        return self._len

    def batches(self, start: int = 0, stop: int | None = None, size: int = 1024) -> Iterator[list[Row]]:
        stop = len(self) if stop is None else stop
        if start == 0 and stop == len(self):
            index = 0
            for record_batch in self.dataset.to_batches(batch_size=size):
                rows = record_batch.to_pylist()
                yield [(index + j, f"row {index + j}", row) for j, row in enumerate(rows)]
                index += len(rows)
            return
        for s in range(start, stop, size):
            rows = self.take(range(s, min(s + size, stop)))
            yield [(s + j, f"row {s + j}", row) for j, row in enumerate(rows)]

    def take(self, indices: Sequence[int]) -> list[Any]:
        import pyarrow as pa

        return self.dataset.take(pa.array(np.asarray(indices, dtype=np.int64))).to_pylist()

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f"{f.relative_to(self.path) if self.path.is_dir() else f.name}:{file_digest(f)}".encode())
        return digest.hexdigest()[:16]

    def write_selection(self, indices, folder, ids, scores) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = self.dataset.take(pa.array(np.asarray(indices, dtype=np.int64)))
        for name, values in _selected_columns(indices, ids, scores).items():
            table = table.append_column(name, pa.array(values))
        out = folder / "selected.parquet"
        atomic_write(out, lambda f: pq.write_table(table, f))
        return out


# ---- Hugging Face datasets (save_to_disk folders, the hub) -----------------------------------------------
class HFSource(Source):
    """A `datasets.Dataset`: a `save_to_disk` folder (memory-mapped, no copy) or a hub dataset (downloaded and cached
    by `datasets` as it always does)."""

    def __init__(self, spec: DatasetSpec, local: bool):
        import datasets

        super().__init__(spec)
        self.local = local
        self.format = "arrow" if local else "hub"
        try:
            if local:
                data = datasets.load_from_disk(spec.path)
            else:
                data = datasets.load_dataset(spec.path, name=spec.subset, split=spec.split or "train",
                                             revision=spec.revision)
        except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
            where = "a saved dataset folder" if local else "a dataset on the hub (or in the local cache)"
            raise DataFormatError(spec.name, None, f"cannot be opened as {where}: {type(e).__name__}: "
                                                   f"{str(e).splitlines()[0] if str(e) else ''}") from None
        if isinstance(data, datasets.DatasetDict):
            split = spec.split or ("train" if "train" in data else None)
            if split not in data:
                raise DataFormatError(spec.name, None, f"holds splits {sorted(data)}: choose one with split")
            data = data[split]
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def batches(self, start: int = 0, stop: int | None = None, size: int = 1024) -> Iterator[list[Row]]:
        stop = len(self) if stop is None else stop
        for s in range(start, stop, size):
            columns = self.data[s:min(s + size, stop)]
            names = list(columns)
            count = len(columns[names[0]]) if names else 0
            yield [(s + j, f"row {s + j}", {n: columns[n][j] for n in names}) for j in range(count)]

    def take(self, indices: Sequence[int]) -> list[Any]:
        return self.data.select([int(i) for i in indices]).to_list()

    def fingerprint(self) -> str:
        return str(self.data._fingerprint)

    def write_selection(self, indices, folder, ids, scores) -> Path:
        chosen = self.data.select([int(i) for i in indices])
        for name, values in _selected_columns(indices, ids, scores).items():
            chosen = chosen.add_column(name, values)
        if self.local:
            out = folder / "selected"
            with atomic_dir(out) as tmp:
                chosen.save_to_disk(str(tmp))
            return out
        out = folder / "selected.parquet"
        atomic_write(out, lambda f: chosen.to_parquet(f))
        return out


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def open_source(data: Dataset) -> Source:
    """The Source of a path, hub id or DatasetSpec (see the module docstring); a DataFormatError says what it is not."""
    spec = dataset_spec(data)
    path = Path(spec.path).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return JsonlSource(spec)
        if suffix == ".json":
            return JsonListSource(spec)
        if suffix == ".parquet":
            return ParquetSource(spec)
        raise DataFormatError(path, None, f"unknown extension {suffix!r}: expected .jsonl, .json or .parquet (or a "
                                          "Parquet folder, a save_to_disk folder or a hub id)")
    if path.is_dir():
        if _is_saved_dataset(path):
            return HFSource(spec, local=True)
        if any(path.rglob("*.parquet")):
            return ParquetSource(spec)
        raise DataFormatError(path, None, "is a directory, but neither a save_to_disk dataset (dataset_info.json) nor "
                                          "a folder of .parquet files; expected one of those, or a .jsonl/.json file")
    looks_local = spec.path.startswith((".", "/", "~")) or Path(spec.path).suffix.lower() in (".jsonl", ".json",
                                                                                             ".parquet")
    if looks_local or spec.path.count("/") > 1:
        raise DataFormatError(path, None, "no such file")
    return HFSource(spec, local=False)


def data_fingerprint(data: Dataset) -> str:
    """A digest of a dataset's content: a local file's bytes (any form, the ROSE JSON object included), or the
    source's own fingerprint (Parquet files, saved and hub datasets)."""
    spec = dataset_spec(data)
    path = Path(spec.path).expanduser()
    return file_digest(path) if path.is_file() else open_source(spec).fingerprint()
