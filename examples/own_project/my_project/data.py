"""The project's own data: JSONL rows {"prompt", "answer"[, "task"]}, its own key names (ids, mask, target)."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import AutoTokenizer


class PromptAnswerRows(Dataset):
    """Token ids of prompt + answer, the loss on the answer only."""

    def __init__(self, path: str, tokenizer: str, max_length: int = 128):
        self.rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        self.tok = AutoTokenizer.from_pretrained(tokenizer)
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        prompt = self.tok(self.rows[i]["prompt"] + "\n", add_special_tokens=False)["input_ids"]
        answer = self.tok(self.rows[i]["answer"], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        ids = (prompt + answer)[: self.max_length]
        target = ([-100] * len(prompt) + answer)[: self.max_length]
        return {"ids": torch.tensor(ids), "target": torch.tensor(target)}

    @property
    def tasks(self) -> list[str]:
        return [row.get("task", "all") for row in self.rows]


def pad(items: list[dict], pad_id: int = 0) -> dict:
    """Right-padded batch in the project's own key names."""
    length = max(len(x["ids"]) for x in items)
    ids = torch.full((len(items), length), pad_id)
    target = torch.full((len(items), length), -100)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["ids"])
        ids[i, :n], target[i, :n], mask[i, :n] = x["ids"], x["target"], 1
    return {"ids": ids, "mask": mask, "target": target}


class MyData(pl.LightningDataModule):
    def __init__(self, path: str, tokenizer: str, batch_size: int = 4, shuffle: bool = True):
        super().__init__()
        self.path, self.tokenizer, self.batch_size, self.shuffle = path, tokenizer, batch_size, shuffle
        self.rows: PromptAnswerRows | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.rows is None:
            self.rows = PromptAnswerRows(self.path, self.tokenizer)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.rows, batch_size=self.batch_size, shuffle=self.shuffle, collate_fn=pad,
                          generator=torch.Generator().manual_seed(0))

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.rows, batch_size=self.batch_size, collate_fn=pad)
