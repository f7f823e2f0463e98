"""The predict-time LightningModule: batch -> per-sample gradient features of one warmup checkpoint.

Modes
- `sft_adam`: gradient of the sample's token-mean SFT loss, turned into the Adam update direction with
  the checkpoint's saved optimizer state (ROSE/LESS training side).
- `sft`: the plain SFT-loss gradient (LESS's validation side).
- `dpo`: gradient of the DPO loss, policy = warmup adapter, reference = the same model with its adapter
  disabled (ROSE's validation side).
- `dpo_noref`: the DPO gradient's direction without the reference forward passes (equal after L2
  normalization; see tests).
- `hidden`: no gradient: the L2-normalized mean last-layer hidden state (the RDS baseline).

The per-sample blocks go to `self.gradient_sink` (set by `ProjectionCallback`) as soon as each is ready;
without a sink, `predict_step` returns the raw per-sample gradients, which is handy in other projects.
"""

from __future__ import annotations

import logging
from typing import Literal

import lightning.pytorch as pl
import torch

from rose_pl.checkpoints import resolve_checkpoint
from rose_pl.errors import CheckpointError, ConfigError
from rose_pl.hub import load_causal_lm

log = logging.getLogger(__name__)

Mode = Literal["sft_adam", "sft", "dpo", "dpo_noref", "hidden"]
PREFERENCE_MODES = ("dpo", "dpo_noref")


class GradientFeatureModule(pl.LightningModule):
    """Per-sample gradient features of a warmup checkpoint, for `Trainer.predict`."""

    def __init__(
        self,
        checkpoint: str,
        mode: Mode = "sft_adam",
        model: str | None = None,
        beta: float = 0.1,
        dtype: str = "float32",
        attn_implementation: str | None = "eager",
        compute_dtype: str | None = None,
    ):
        """
        Args:
            checkpoint: Warmup checkpoint: an epoch folder (`out/warmup/epoch-2`) or `out/warmup:2`.
            mode: sft_adam (train side), sft (LESS validation side), dpo / dpo_noref (ROSE validation side),
                or hidden (RDS baseline: mean last hidden state).
            model: Base model; by default the one recorded in the checkpoint manifest.
            beta: DPO temperature (mode dpo). It does not change normalized features, but is recorded.
            dtype: Weights dtype of the base model.
            attn_implementation: Attention kernel; eager is the safe choice with padding masks.
            compute_dtype: dtype of the per-sample einsums (None: float32 accumulation). bfloat16 is faster on GPU.
        """
        super().__init__()
        if mode not in Mode.__args__:
            raise ConfigError(f"mode: {mode!r} is not one of {Mode.__args__}")
        if beta <= 0:
            raise ConfigError(f"beta must be positive, got {beta}")
        self.save_hyperparameters()
        self.manifest, self.ckpt = resolve_checkpoint(checkpoint)
        self.base_model_name = model or self.manifest.base_model
        self.model = None
        self.gradient_sink = None
        self._grads = None
        self._adam = None

    # ---- model -------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if isinstance(self.trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise ConfigError(
                f"trainer.strategy: {type(self.trainer.strategy).__name__} shards parameters; gradient features need "
                "every rank to hold the whole model: use strategy ddp (data parallel) for predict"
            )

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from peft import PeftModel

        base = load_causal_lm(self.base_model_name, self.hparams.dtype, self.hparams.attn_implementation)
        self.model = PeftModel.from_pretrained(base, str(self.ckpt.adapter_dir), is_trainable=True)
        self.model.eval()  # dropout off: a feature is a property of the sample, not of a dropout mask
        for p in self.model.parameters():
            if p.requires_grad:
                p.requires_grad_(self.hparams.mode != "hidden")

    def gradient_shapes(self) -> dict[str, torch.Size]:
        """Ordered {parameter name: shape} of the parameters whose per-sample gradients are produced."""
        self.configure_model()
        return {n: p.shape for n, p in self.model.named_parameters() if p.requires_grad}

    def feature_dim(self) -> int | None:
        """Width of the features when they need no projection (hidden mode), else None."""
        self.configure_model()
        return self.model.config.hidden_size if self.hparams.mode == "hidden" else None

    def feature_metadata(self) -> dict:
        """Everything about the module that defines its features (stored beside them, compared on reuse)."""
        meta = {
            "model": self.base_model_name,
            "checkpoint": str(self.ckpt.path.resolve()),
            "checkpoint_epoch": self.ckpt.epoch,
            "checkpoint_lr": self.ckpt.lr,
            "mode": self.hparams.mode,
            "dtype": self.hparams.dtype,
        }
        if self.hparams.mode == "dpo":
            meta["beta"] = self.hparams.beta
        if self.hparams.mode == "sft_adam":
            meta["adam"] = {k: v for k, v in self._load_adam()["hyper"].items()}
        return meta

    def _load_adam(self) -> dict:
        if self._adam is None:
            saved = self.ckpt.load_optimizer_state()
            names = set(self.gradient_shapes())
            missing = sorted(names - set(saved["state"]))
            if missing:
                raise CheckpointError(
                    f"{self.ckpt.path}: optimizer state lacks {len(missing)} adapter parameters, e.g. {missing[0]}"
                )
            self._adam = saved
        return self._adam

    def _adam_state_on(self, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        saved = self._load_adam()
        cached = getattr(self, "_adam_device_state", None)
        if cached is None or cached[0] != device:
            wanted = self.gradient_shapes()
            state = {
                n: (s["exp_avg"].to(device, torch.float32), s["exp_avg_sq"].to(device, torch.float32))
                for n, s in saved["state"].items()
                if n in wanted
            }
            self._adam_device_state = cached = (device, state)
        return cached[1]

    # ---- predict -----------------------------------------------------------------------------------
    def objective(self):
        from rose_pl.objectives import DPOObjective, SFTObjective

        mode = self.hparams.mode
        if mode == "dpo":
            return DPOObjective(beta=self.hparams.beta, reference="adapter_disabled")
        if mode == "dpo_noref":
            return DPOObjective(beta=self.hparams.beta, reference="none")
        return SFTObjective()

    def _sink(self):
        from rose_pl.per_sample_grads import AdamTransformSink

        sink = self.gradient_sink
        if self.hparams.mode == "sft_adam":
            if sink is None:
                raise ConfigError("mode sft_adam needs a gradient sink (add a ProjectionCallback)")
            hyper = self._load_adam()["hyper"]
            b1, b2 = hyper["betas"]
            sink = AdamTransformSink(sink, self._adam_state_on(self.device), beta1=b1, beta2=b2, eps=hyper["eps"])
        return sink

    def _hidden_features(self, batch) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
            )
            hidden = out.hidden_states[-1].float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            return torch.nn.functional.normalize(mean, dim=-1)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        from rose_pl.per_sample_grads import PerSampleGradients

        preference = "chosen_input_ids" in batch
        if preference != (self.hparams.mode in PREFERENCE_MODES):
            needs = "preference batches (data kind 'preference')" if not preference else "SFT batches (data kind 'sft' or 'preference_sft')"
            got = "preference" if preference else "SFT"
            raise ConfigError(f"mode {self.hparams.mode!r} needs {needs}, got {got} batches")
        # Lightning predicts under inference mode; gradients need a normal autograd context and tensors
        # created outside inference mode.
        with torch.inference_mode(False), torch.enable_grad():
            batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
            index = batch.pop("index")
            if self.hparams.mode == "hidden":
                return {"index": index, "features": self._hidden_features(batch)}
            if self._grads is None:
                compute_dtype = getattr(torch, self.hparams.compute_dtype) if self.hparams.compute_dtype else None
                self._grads = PerSampleGradients(self.model, compute_dtype=compute_dtype)
            sink = self._sink()
            out = self._grads.compute(self.objective(), batch, sink=sink)
            if sink is None:
                return {"index": index, "grads": out}
            return {"index": index, "features": out}
