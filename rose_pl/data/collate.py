"""Right padding into the batch dicts of docs/architecture.md ("Batches")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from rose_pl.data.encoding import IGNORE_INDEX
from rose_pl.errors import ConfigError


def _padded_length(lengths: Sequence[int], pad_to_multiple_of: int | None) -> int:
    longest = max(lengths)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return longest


def _pad(rows: Sequence[Any], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        row = torch.as_tensor(row, dtype=torch.long)
        out[i, : row.numel()] = row
    return out


def _check(pad_token_id: int | None, pad_to_multiple_of: int | None) -> None:
    problems = []
    if pad_token_id is None:
        problems.append("pad_token_id is None: load the tokenizer with rose_pl.hub.load_tokenizer")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        problems.append(f"pad_to_multiple_of: {pad_to_multiple_of!r} is not a positive integer")
    if problems:
        raise ConfigError(problems)


@dataclass(frozen=True)
class _PaddingCollator:
    """Pads every `{prefix}input_ids` / `{prefix}labels` of the features to one common length."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    prefixes: ClassVar[tuple[str, ...]] = ("",)

    def __post_init__(self):
        _check(self.pad_token_id, self.pad_to_multiple_of)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        lengths = {p: [len(f[f"{p}input_ids"]) for f in features] for p in self.prefixes}
        length = _padded_length([n for ns in lengths.values() for n in ns], self.pad_to_multiple_of)
        batch = {}
        for p in self.prefixes:
            batch[f"{p}input_ids"] = _pad([f[f"{p}input_ids"] for f in features], length, self.pad_token_id)
            batch[f"{p}attention_mask"] = (torch.arange(length)[None, :] < torch.tensor(lengths[p])[:, None]).long()
            batch[f"{p}labels"] = _pad([f[f"{p}labels"] for f in features], length, IGNORE_INDEX)
        batch["index"] = torch.tensor([int(f["index"]) for f in features], dtype=torch.long)
        return batch


@dataclass(frozen=True)
class SFTCollator(_PaddingCollator):
    """Features {input_ids, labels, index} -> {input_ids, attention_mask, labels, index}, right-padded."""


@dataclass(frozen=True)
class PreferenceCollator(_PaddingCollator):
    """Features {chosen_/rejected_ input_ids, labels, index} -> the preference batch, right-padded.

    Both sides are padded to one common length so an objective can concatenate them into one forward pass.
    """

    prefixes: ClassVar[tuple[str, ...]] = ("chosen_", "rejected_")
