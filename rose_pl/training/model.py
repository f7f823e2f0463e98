"""The LoRA causal-LM LightningModule used for the warmup and for the final fine-tune.

It holds no global state and needs no CLI: `Trainer().fit(LoRACausalLM(model=...), datamodule=...)` works
in any Lightning project. The base model is built in `configure_model`, so strategies that shard
(FSDP) can wrap it as it is created.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict

import lightning.pytorch as pl
import torch

from rose_pl.config import DEFAULT_MODEL, LoRAArgs, OptimArgs, raise_if_problems
from rose_pl.hub import load_causal_lm
from rose_pl.training.losses import sft_loss

log = logging.getLogger(__name__)


def add_lora(base_model, lora: LoRAArgs, init_adapter: str | None = None, trainable: bool = True):
    """Wrap `base_model` with a fresh LoRA adapter, or with the saved adapter in `init_adapter`."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_adapter:
        from rose_pl.training.sources import check_adapter_fits

        check_adapter_fits(base_model, init_adapter, getattr(base_model.config, "_name_or_path", "the base model"))
        return PeftModel.from_pretrained(base_model, init_adapter, is_trainable=trainable)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(base_model, config)


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    """Multiplier of the peak learning rate at optimizer step `step` (linear warmup, then linear or flat)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # LESS/HF start at lr/warmup, not 0, so step 0 does learn
        if schedule == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return fn


class LoRACausalLM(pl.LightningModule):
    """A Hugging Face causal LM with a LoRA adapter, trained with token-mean SFT loss and AdamW."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        lora: LoRAArgs | None = None,
        optim: OptimArgs | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        init_adapter: str | None = None,
        gradient_checkpointing: bool = False,
    ):
        """
        Args:
            model: Base model: a Hugging Face hub id, a local folder, or the embedded default
                `embedded:smollm2-135m-instruct`.
            lora: LoRA adapter settings (ignored when `init_adapter` is given).
            optim: AdamW and learning-rate schedule.
            dtype: Weights dtype of the base model (float32, bfloat16, float16).
            attn_implementation: Attention kernel passed to transformers (eager, sdpa, flash_attention_2);
                None lets transformers choose.
            init_adapter: Start from a saved peft adapter folder instead of a fresh adapter.
            gradient_checkpointing: Trade compute for activation memory.
        """
        super().__init__()
        # Dicts are accepted too: that is how load_from_checkpoint hands saved hyperparameters back.
        self.lora = LoRAArgs(**lora) if isinstance(lora, dict) else (lora or LoRAArgs())
        self.optim = OptimArgs(**optim) if isinstance(optim, dict) else (optim or OptimArgs())
        raise_if_problems(self.lora.validate() + self.optim.validate())
        # Plain values only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["lora", "optim"])
        self.hparams["lora"] = asdict(self.lora)
        self.hparams["optim"] = asdict(self.optim)
        self.model = None
        # Resume checkpoints hold only the adapter (see on_save_checkpoint), not the frozen base.
        self.strict_loading = False

    def configure_model(self) -> None:
        if self.model is not None:
            return
        base = load_causal_lm(self.hparams.model, self.hparams.dtype, self.hparams.attn_implementation)
        if self.hparams.gradient_checkpointing:
            base.gradient_checkpointing_enable()
            base.enable_input_require_grads()
        self.model = add_lora(base, self.lora, self.hparams.init_adapter)
        self.model.train()  # from_pretrained returns eval mode; LoRA dropout must be live when training
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("LoRA parameters: %d trainable", trainable)

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _global_token_count(self, batch) -> torch.Tensor:
        tokens = (batch["labels"][:, 1:] != -100).sum()
        if self.trainer is not None and self.trainer.world_size > 1:
            tokens = self.trainer.strategy.reduce(tokens.float(), reduce_op="sum")
        return tokens

    def training_step(self, batch, batch_idx):
        # DDP averages gradients over ranks; normalizing by the global token count (times world size)
        # makes that average equal to the token mean over the global batch, as on one device.
        world = self.trainer.world_size if self.trainer is not None else 1
        num_tokens = self._global_token_count(batch).float() / world
        loss = sft_loss(self.model, batch, num_tokens=num_tokens)
        self.log("train/loss", loss * 1.0, prog_bar=True, sync_dist=world > 1, batch_size=batch["input_ids"].shape[0])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, rank_zero_only=True,
                 batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = sft_loss(self.model, batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps, weight_decay=self.optim.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total, self.optim.warmup_ratio, self.optim.schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {"model." + n for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def save_adapter(self, path: str) -> None:
        """Save the adapter in peft's format (rank 0 only under DDP)."""
        if self.trainer is None or self.trainer.is_global_zero:
            self.model.save_pretrained(path)
