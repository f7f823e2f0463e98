"""Samplers: a seeded, DDP-aware length-grouped order for training and a length-sorted order for predict."""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler

from rose_pl.errors import ConfigError


def padding_fraction(lengths: Sequence[int], batches: Iterable[Sequence[int]]) -> float:
    """Share of the padded token slots in `batches` (lists of indices into `lengths`) that are padding."""
    real = slots = 0
    for batch in batches:
        if len(batch):
            batch_lengths = [lengths[i] for i in batch]
            real += sum(batch_lengths)
            slots += max(batch_lengths) * len(batch)
    return 1.0 - real / slots if slots else 0.0


class LengthGroupedSampler(DistributedSampler):
    """Batches of similar length, one global order shared by all replicas.

    The order: a permutation seeded by `seed + epoch`, cut into megabatches of
    `batch_size * num_replicas * megabatch_factor` rows, each sorted by length (longest first); the full global
    batches (`batch_size * num_replicas` rows) are then shuffled with the same generator, the batch holding the
    longest row moved first (an out-of-memory shows in the first step), and a partial last batch kept last.
    Rank r takes positions r, r + W, r + 2W, ... (W = num_replicas), so the union of the ranks' j-th batches
    is the j-th batch of one process run with batch size `batch_size * W` and the same seed.

    Subclassing DistributedSampler keeps Lightning from replacing this sampler under DDP.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        megabatch_factor: int = 32,
        drop_last: bool = False,
    ):
        problems = []
        for name, value in (("batch_size", batch_size), ("num_replicas", num_replicas),
                            ("megabatch_factor", megabatch_factor)):
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name}: {value!r} is not a positive integer")
        if isinstance(num_replicas, int) and not (isinstance(rank, int) and 0 <= rank < max(num_replicas, 1)):
            problems.append(f"rank: {rank!r} is not in [0, {num_replicas})")
        if problems:
            raise ConfigError(problems)
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.lengths = torch.as_tensor(np.asarray(lengths, dtype=np.int64))
        self.batch_size = batch_size
        self.megabatch_factor = megabatch_factor
        n, world = len(self.lengths), num_replicas
        if drop_last:
            # Only full global batches: every rank steps the same number of times and batches stay aligned.
            self.total_size = (n // (batch_size * world)) * batch_size * world
        else:
            self.total_size = -(-n // world) * world
        self.num_samples = self.total_size // world

    def global_order(self) -> list[int]:
        """The order of all replicas together for the current epoch, padded to `total_size`."""
        n = len(self.lengths)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        megabatch = self.batch_size * self.num_replicas * self.megabatch_factor
        chunks = []
        for start in range(0, n, megabatch):
            chunk = perm[start : start + megabatch]
            chunks.append(chunk[torch.sort(self.lengths[chunk], descending=True, stable=True).indices])
        order = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)

        global_batch = self.batch_size * self.num_replicas
        num_full = n // global_batch
        full = order[: num_full * global_batch].view(num_full, global_batch)
        tail = order[num_full * global_batch :]
        if self.shuffle and num_full > 1:
            full = full[torch.randperm(num_full, generator=generator)]
            # Rows are sorted within a batch, so column 0 holds each batch's longest row.
            longest = int(torch.argmax(self.lengths[full[:, 0]]))
            full[[0, longest]] = full[[longest, 0]]
        order = full.reshape(-1).tolist()
        if not self.drop_last:
            order += tail.tolist()
            while len(order) < self.total_size:  # repeat the start, as DistributedSampler does
                order += order[: self.total_size - len(order)]
        return order[: self.total_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_order()[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class LengthSortedSampler(Sampler[int]):
    """Indices by length, longest first, ties by index: a deterministic order for predict.

    `indices` restricts the order to those dataset positions (a resumed run skips finished rows).
    Lightning wraps this sampler for distributed predict.
    """

    def __init__(self, lengths: Sequence[int], indices: Iterable[int] | None = None):
        lengths = np.asarray(lengths, dtype=np.int64)
        if indices is None:
            positions = np.arange(len(lengths))
        else:
            positions = np.unique(np.fromiter(indices, dtype=np.int64) if not isinstance(indices, np.ndarray)
                                  else indices.astype(np.int64))
        bad = positions[(positions < 0) | (positions >= len(lengths))]
        if bad.size:
            raise ConfigError(f"indices out of range [0, {len(lengths)}): {bad[:10].tolist()}")
        # Longest first, ties by index: numpy, so a million rows sort in milliseconds without Python objects.
        self.order = positions[np.lexsort((positions, -lengths[positions]))]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order.tolist())

    def __len__(self) -> int:
        return len(self.order)


class TokenBudgetBatches(Sampler[list[int]]):
    """Rows in the given order (longest first) cut into batches of at most `max_rows` rows and, with a token budget,
    of rows x their longest row x `per_row` (2 for pairs: both sides run in one pass) within `max_tokens`. Batch j
    goes to rank j % num_replicas, so ranks get an even share of the work; the sampler is sharded already (Lightning
    passes a sampler that yields lists through unchanged). Held as numpy arrays: 8 bytes a row."""

    def __init__(self, lengths: Sequence[int], order: Sequence[int], max_tokens: int | None, max_rows: int,
                 num_replicas: int = 1, rank: int = 0, per_row: int = 1):
        problems = []
        for name, value in (("max_rows", max_rows), ("num_replicas", num_replicas)) + (
                (("max_tokens", max_tokens),) if max_tokens is not None else ()):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name}: {value!r} is not a positive integer")
        if problems:
            raise ConfigError(problems)
        self.order = np.asarray(order, dtype=np.int64)
        n = len(self.order)
        if max_tokens is None:
            starts = list(range(0, n, max_rows))
        else:
            lengths = np.asarray(lengths, dtype=np.int64)[self.order].tolist()
            starts, count, longest = [], 0, 0
            for position, length in enumerate(lengths):
                if count and (per_row * (count + 1) * max(longest, length) > max_tokens or count >= max_rows):
                    count, longest = 0, 0
                if count == 0:
                    starts.append(position)
                count, longest = count + 1, max(longest, length)
        bounds = starts + [n] if n else [0]
        while len(bounds) - 1 < num_replicas and any(b - a > 1 for a, b in zip(bounds, bounds[1:])):
            # every rank needs a batch: halve the largest
            j = max(range(len(bounds) - 1), key=lambda k: bounds[k + 1] - bounds[k])
            bounds.insert(j + 1, (bounds[j] + bounds[j + 1]) // 2)
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.mine = np.arange(rank, len(bounds) - 1, num_replicas)
        self.num_rows = int(sum(bounds[j + 1] - bounds[j] for j in self.mine.tolist()))
        """Rows of this rank."""
        self.total_rows = n
        """Rows of all ranks together."""

    def __iter__(self) -> Iterator[list[int]]:
        for j in self.mine.tolist():
            yield self.order[self.bounds[j]:self.bounds[j + 1]].tolist()

    def __len__(self) -> int:
        return len(self.mine)
