"""`IndexedData`: any map-style Dataset, DataLoader or LightningDataModule, ready for rose_pl's feature callbacks.

Your data needs nothing of rose_pl. Wrapped, its predict batches carry each row's index (`"index"`, the row's
position in the dataset: stores are written by it), it has a fingerprint (stored with the features, so a store of
other data is refused instead of resumed) and optional task ids (for task means), and it leaves out the rows a
resumed store has already written (`skip_indices`). Batch keys can be renamed to rose_pl's (`input_ids`,
`attention_mask`, `labels`; `chosen_*`, `rejected_*` for pairs) and a batch transform can reshape anything else;
a missing `attention_mask` means no padding. See `rose_pl.features.protocols` for the contract it implements.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from typing import Any, Callable, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from rose_pl.errors import ConfigError

log = logging.getLogger(__name__)


def _update(digest, value: Any) -> None:
    """Feed a row (tensors, arrays, numbers, strings, lists and dicts of them) into a digest, type by type."""
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        digest.update(f"A{value.dtype}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        digest.update(b"D")
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _update(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _update(digest, item)
    elif isinstance(value, (str, int, float, bool)) or value is None:
        digest.update(f"{type(value).__name__}:{value!r}".encode())
    else:
        digest.update(pickle.dumps(value, protocol=4))


def rows_fingerprint(dataset: Dataset) -> str:
    """sha256 of every row of a map-style dataset, in index order (reads each row once)."""
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        _update(digest, dataset[i])
    return digest.hexdigest()[:16]


class _WithIndex(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return i, self.dataset[i]


class IndexedData(L.LightningDataModule):
    """A Dataset, DataLoader or LightningDataModule as the feature callbacks need it (rows indexed, fingerprinted)."""

    def __init__(
        self,
        data: Dataset | DataLoader | L.LightningDataModule,
        batch_size: int | None = None,
        collate_fn: Callable[[list], Any] | None = None,
        fingerprint: str | None = None,
        task_ids: Sequence[str] | None = None,
        keys: dict[str, str] | None = None,
        batch_transform: Callable[[dict], dict] | None = None,
        num_workers: int = 0,
    ):
        """
        Args:
            data: A map-style Dataset (`len` and `[i]`), a DataLoader over one (its batch size and collate_fn are
                reused), or a LightningDataModule (its `predict_dataloader()`, else `val_dataloader()`).
            batch_size: Rows per batch (default: the DataLoader's, else 8).
            collate_fn: Turns a list of rows into a batch dict (default: the DataLoader's, else torch's
                default_collate).
            fingerprint: A digest of the rows and of whatever changes them; None: computed by reading every row once.
            task_ids: The task of each row (task means need them); None: no tasks.
            keys: Renames of batch keys to rose_pl's, e.g. {"ids": "input_ids", "target": "labels"}.
            batch_transform: Called on each batch dict after collation and renaming (add or reshape keys).
            num_workers: DataLoader workers.
        """
        super().__init__()
        problems = []
        if not isinstance(data, (Dataset, DataLoader, L.LightningDataModule)) and not (
                hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            problems.append(f"data: {type(data).__name__} is not a map-style Dataset, a DataLoader or a "
                            "LightningDataModule")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            problems.append(f"batch_size: {batch_size!r} is not a positive integer")
        if problems:
            raise ConfigError(problems)
        self.data, self._batch_size, self._collate = data, batch_size, collate_fn
        self._fingerprint, self._task_ids = fingerprint, list(task_ids) if task_ids is not None else None
        self.keys, self.batch_transform, self.num_workers = dict(keys or {}), batch_transform, num_workers
        self.dataset: Dataset | None = None
        self.skip_indices: set[int] | None = None
        """Rows `predict_dataloader` leaves out (a writer sets it to the rows already written)."""

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        data, loader = self.data, None
        if isinstance(data, L.LightningDataModule):
            data.setup("predict")
            loader = data.predict_dataloader() if _defines(data, "predict_dataloader") else data.val_dataloader()
        elif isinstance(data, DataLoader):
            loader = data
        if loader is not None:
            if not isinstance(loader, DataLoader):
                raise ConfigError(f"{type(self.data).__name__} gave {type(loader).__name__}, not one DataLoader")
            data = loader.dataset
            self._batch_size = self._batch_size or loader.batch_size
            if self._collate is None and loader.collate_fn is not default_collate:
                self._collate = loader.collate_fn
        if isinstance(data, torch.utils.data.IterableDataset) or not hasattr(data, "__len__"):
            raise ConfigError(f"{type(data).__name__} is iterable-style: features are written by row index, which "
                              "needs a map-style dataset (len and [i])")
        self.dataset = data
        if self._task_ids is not None and len(self._task_ids) != len(data):
            raise ConfigError(f"task_ids: {len(self._task_ids)} for a dataset of {len(data)} rows")

    @property
    def num_examples(self) -> int:
        self.setup()
        return len(self.dataset)

    @property
    def task_ids(self) -> list[str] | None:
        return self._task_ids

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self.setup()
            log.info("fingerprinting %d rows of %s (pass fingerprint= to skip this)", len(self.dataset),
                     type(self.dataset).__name__)
            self._fingerprint = rows_fingerprint(self.dataset)
        return self._fingerprint

    @property
    def predict_indices(self) -> list[int]:
        """The rows predict_dataloader yields (all but the skipped ones), in order."""
        self.setup()
        skip = self.skip_indices or set()
        return [i for i in range(len(self.dataset)) if i not in skip]

    def _collate_indexed(self, items: list) -> dict:
        indices = [i for i, _ in items]
        batch = (self._collate or default_collate)([row for _, row in items])
        if not isinstance(batch, dict):
            raise ConfigError(f"the collate function returned a {type(batch).__name__}; feature modules need a dict "
                              "of tensors (give collate_fn, or a batch_transform that makes one)")
        batch = {self.keys.get(k, k): v for k, v in batch.items()}
        if self.batch_transform is not None:
            batch = self.batch_transform(batch)
        batch["index"] = torch.tensor(indices, dtype=torch.long)
        return batch

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(_WithIndex(self.dataset), batch_size=self._batch_size or 8, sampler=self.predict_indices,
                          collate_fn=self._collate_indexed, num_workers=self.num_workers)


def _defines(dm: L.LightningDataModule, hook: str) -> bool:
    return getattr(type(dm), hook) is not getattr(L.LightningDataModule, hook)
