"""Right padding into the batch dicts of docs/architecture.md ("Batches")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rose_pl.data.chat import IGNORE_INDEX
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
class SFTCollator:
    """Features {input_ids, labels, index} -> {input_ids, attention_mask, labels, index}, right-padded."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        _check(self.pad_token_id, self.pad_to_multiple_of)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(f["input_ids"]) for f in features]
        length = _padded_length(lengths, self.pad_to_multiple_of)
        input_ids = _pad([f["input_ids"] for f in features], length, self.pad_token_id)
        attention_mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": _pad([f["labels"] for f in features], length, IGNORE_INDEX),
            "index": torch.tensor([int(f["index"]) for f in features], dtype=torch.long),
        }


@dataclass(frozen=True)
class PreferenceCollator:
    """Features {chosen_/rejected_ input_ids, labels, index} -> the preference batch, right-padded.

    Both sides are padded to one common length so an objective can concatenate them into one forward pass.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        _check(self.pad_token_id, self.pad_to_multiple_of)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        lengths = {s: [len(f[f"{s}_input_ids"]) for f in features] for s in ("chosen", "rejected")}
        length = _padded_length(lengths["chosen"] + lengths["rejected"], self.pad_to_multiple_of)
        batch = {}
        for side in ("chosen", "rejected"):
            batch[f"{side}_input_ids"] = _pad([f[f"{side}_input_ids"] for f in features], length, self.pad_token_id)
            lens = torch.tensor(lengths[side])
            batch[f"{side}_attention_mask"] = (torch.arange(length)[None, :] < lens[:, None]).long()
            batch[f"{side}_labels"] = _pad([f[f"{side}_labels"] for f in features], length, IGNORE_INDEX)
        batch["index"] = torch.tensor([int(f["index"]) for f in features], dtype=torch.long)
        return batch
