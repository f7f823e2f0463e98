"""Hidden-state features (the RDS baseline): the L2-normalized mean last-layer hidden state of each row."""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from rose_pl.errors import ConfigError
from rose_pl.features.module import BaseFeatureModule, with_attention_masks


class HiddenStateModule(BaseFeatureModule):
    """Mean over a row's tokens of the last hidden layer, L2-normalized, for `Trainer.predict` (no gradients)."""

    def __init__(self, model: Union[str, nn.Module, None] = None, checkpoint: str | None = None,
                 dtype: str = "float32", attn_implementation: str | None = "eager"):
        """
        Args:
            model: The model (a name or folder, or an nn.Module); None: the base model the checkpoint records.
            checkpoint: Weights on top of it (a rose_pl warmup epoch, a Trainer checkpoint, a peft adapter folder).
            dtype: Weights dtype of a model loaded by name.
            attn_implementation: Attention kernel passed to transformers.
        """
        super().__init__(model, checkpoint, dtype, attn_implementation)
        self.save_hyperparameters(ignore=["model"])
        self.hparams["model"] = self.base_model_name

    def feature_dim(self) -> int:
        """Width of the features (the hidden size): they need no projection."""
        self.configure_model()
        return int(self.model.config.hidden_size)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        if "input_ids" not in batch or "index" not in batch:
            raise ConfigError(f"HiddenStateModule needs SFT batches with 'input_ids' and 'index' (got {sorted(batch)})")
        batch = with_attention_masks(dict(batch))
        with torch.no_grad():
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True)
            hidden = out.hidden_states[-1].float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            return {"index": batch["index"], "features": torch.nn.functional.normalize(mean, dim=-1)}
