"""The project's own loss for the validation side: summed (not averaged) answer-token loss per sample."""

from __future__ import annotations

import torch

from rose_pl import Objective, PerSampleLoss


class SummedAnswerLoss(Objective):
    """Per-sample sum of the answer tokens' cross-entropy: long answers weigh more than under a token mean."""

    batch_kind = "sft"

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> PerSampleLoss:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=-100,
                                                   reduction="none")
        return PerSampleLoss(losses.sum(1))
