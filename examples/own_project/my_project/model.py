"""The project's own LightningModule: a causal LM with a LoRA adapter, trained with its own loop and optimizer."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


class MyLM(pl.LightningModule):
    """Nothing here comes from rose_pl: any module holding a peft model works with rose_pl's WarmupCheckpoint."""

    def __init__(self, model: str, lr: float = 1e-3, rank: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.net = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                                  LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))

    def training_step(self, batch, batch_idx):
        logits = self.net(input_ids=batch["ids"], attention_mask=batch["mask"]).logits[:, :-1]
        target = batch["target"][:, 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=self.hparams.lr)
