"""Hidden-state features (the RDS baseline): the L2-normalized mean last-layer hidden state of each row."""

from __future__ import annotations

import torch

from rose_pl.features.module import CheckpointFeatureModule


class HiddenStateModule(CheckpointFeatureModule):
    """Mean over a row's tokens of the last hidden layer, L2-normalized, for `Trainer.predict` (no gradients)."""

    def __init__(self, checkpoint: str, model: str | None = None, dtype: str = "float32",
                 attn_implementation: str | None = "eager"):
        """
        Args:
            checkpoint: Warmup checkpoint whose adapter is applied (an epoch folder or `folder:epoch`).
            model: Base model; by default the one recorded in the checkpoint manifest.
            dtype: Weights dtype of the base model.
            attn_implementation: Attention kernel passed to transformers.
        """
        super().__init__(checkpoint, model, dtype, attn_implementation)
        self.save_hyperparameters()

    def feature_dim(self) -> int:
        """Width of the features (the hidden size): they need no projection."""
        self.configure_model()
        return int(self.model.config.hidden_size)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        if "input_ids" not in batch:
            raise ValueError("HiddenStateModule needs SFT batches (data kind 'sft' or 'preference_sft')")
        with torch.no_grad():
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True)
            hidden = out.hidden_states[-1].float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            return {"index": batch["index"], "features": torch.nn.functional.normalize(mean, dim=-1)}
