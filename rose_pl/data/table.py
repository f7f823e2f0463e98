"""The pool as selection, reports and baselines see it: row identity from the token cache's columns, and the rows
themselves read from the source only where they are shown or written.

`PoolTable` never holds the pool as Python objects: ids, source datasets and drops are the cache's arrays;
texts stream from the source in batches (BM25), and a few rows are read by index (a report's top examples, the
selected rows written in the pool's own format).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from rose_pl.data.cache import TokenCache


class StringColumn:
    """Strings stored back to back (utf-8) with their offsets: a million ids in a few MB, read by index."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    @classmethod
    def of(cls, strings: Sequence[str]) -> "StringColumn":
        encoded = [s.encode("utf-8") for s in strings]
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
        return cls(blob, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return bytes(self.blob[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8")

    def take(self, indices: Sequence[int]) -> list[str]:
        return [self[int(i)] for i in indices]

    def tolist(self) -> list[str]:
        return self.take(range(len(self)))

    def __eq__(self, other) -> bool:
        if not isinstance(other, StringColumn):
            return NotImplemented
        return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.blob, other.blob)


class PoolTable:
    """The pool's rows: identity (ids, source datasets, drops) as arrays, content from its source where needed."""

    def __init__(self, ids: StringColumn, dataset_codes: np.ndarray, dataset_names: list[str], source=None,
                 dropped: np.ndarray | None = None, spec=None):
        """`source`: the pool's `rose_pl.data.sources.Source` (opened from `spec` on first use when None)."""
        self.ids, self.dataset_codes, self.dataset_names = ids, np.asarray(dataset_codes), list(dataset_names)
        self._source, self._spec = source, spec
        self.dropped = np.zeros(len(ids), dtype=bool) if dropped is None else np.asarray(dropped, dtype=bool)

    @classmethod
    def from_cache(cls, cache: TokenCache, source=None) -> "PoolTable":
        """The pool of a token cache: its ids, datasets and drops; its source as the cache records it."""
        from rose_pl.config import DatasetSpec

        recorded = cache.meta["source"]
        spec = DatasetSpec(**{k: recorded.get(k) for k in ("path", "split", "subset", "revision", "columns")})
        return cls(StringColumn(cache._array("ids.bin", np.uint8), cache._array("ids_offsets.npy")),
                   cache.dataset_codes, cache.dataset_names(), source, cache.dropped, spec)

    @property
    def source(self):
        if self._source is None:
            from rose_pl.data.sources import open_source

            self._source = open_source(self._spec)
        return self._source

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def num_rows(self) -> int:
        return len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def datasets(self, indices: Sequence[int]) -> list[str]:
        return [self.dataset_names[c] for c in self.dataset_codes[np.asarray(indices, dtype=np.int64)]]

    def __iter__(self):
        """Every row as an InstructionExample, streamed from the source in order (never all held at once; ids as
        the cache has them, repeats renamed)."""
        from rose_pl.data.formats import InstructionExample, instruction_from_row, rename_columns, stem_of

        source, stem, ids = self.source, stem_of(self.source.spec), self.ids
        for batch in source.batches(size=1024):
            for i, where, row in batch:
                example = instruction_from_row(source.name, stem, where, i, rename_columns(row, source.spec.columns))
                yield InstructionExample(example.dataset, ids[i], example.messages, example.raw, example.where)

    def texts(self, indices: Sequence[int] | None = None, size: int = 4096) -> Iterator[list[str]]:
        """Plain texts (all turns, roles dropped) in batches: of every row in order, or of `indices`."""
        from rose_pl.data.formats import instruction_from_row, rename_columns, stem_of

        source, stem = self.source, stem_of(self.source.spec)
        if indices is not None:
            rows = source.take(indices)
            yield [instruction_from_row(source.name, stem, None, int(i), rename_columns(r, source.spec.columns)).text
                   for i, r in zip(indices, rows)]
            return
        for batch in source.batches(size=size):
            yield [instruction_from_row(source.name, stem, where, i, rename_columns(r, source.spec.columns)).text
                   for i, where, r in batch]

    def write_rows(self, indices: Sequence[int], folder: Path, scores: Sequence[float] | None) -> Path:
        """The rows at `indices` (in that order) in the pool's own format, in `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        return self.source.write_selection(indices, folder, self.ids, scores)


def pool_identity(data, duplicate_ids: str = "error") -> PoolTable:
    """A PoolTable read from a dataset without a token cache (`rose-pl score` / `select` alone): every row is
    validated and its id and source dataset kept (ids renamed as a run's cache renames them)."""
    from rose_pl.data.formats import iter_instructions, unique_id
    from rose_pl.data.sources import open_source

    source = open_source(data)
    seen: dict = {}
    renamed: list[str] = []
    ids, names, codes = [], {}, []
    for batch in iter_instructions(source.spec):
        for _, example in batch:
            id_ = unique_id(example.id, seen, example.where, source.name, duplicate_ids, renamed)
            seen[id_] = example.where
            ids.append(id_)
            codes.append(names.setdefault(example.dataset, len(names)))
    return PoolTable(StringColumn.of(ids), np.asarray(codes, dtype=np.uint32), list(names), source)
