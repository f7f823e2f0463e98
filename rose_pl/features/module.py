"""Predict-time LightningModules of one warmup checkpoint: batch -> per-sample features.

`GradientFeatureModule` takes an objective (what loss each sample's gradient is of) and an optional transform
(what the gradient becomes: `AdamDirection` for the training side). Both are injected: a class path in YAML,
an object in Python. The per-sample blocks go to `self.gradient_sink` (set by a sink callback such as
`ProjectionCallback`, `ExactScoreWriter` or `TaskMeanWriter`) as soon as each is ready; without a sink,
`predict_step` returns the raw per-sample gradients, which is handy in other projects.

| side | objective | transform | data kind |
|---|---|---|---|
| ROSE/LESS training | `SFTObjective()` | `AdamDirection()` | sft (the pool) |
| ROSE validation | `DPOObjective(beta)` | none | preference |
| LESS validation | `SFTObjective()` | none | preference_sft |
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch

from rose_pl.errors import ConfigError
from rose_pl.features.objectives import Objective, SFTObjective
from rose_pl.features.transforms import GradientTransform
from rose_pl.hub import load_causal_lm
from rose_pl.training.checkpoints import resolve_checkpoint

log = logging.getLogger(__name__)


class CheckpointFeatureModule(pl.LightningModule):
    """Base of the feature modules: the base model with one warmup checkpoint's adapter, in eval mode."""

    def __init__(self, checkpoint: str, model: str | None = None, dtype: str = "float32",
                 attn_implementation: str | None = "eager"):
        super().__init__()
        self.manifest, self.ckpt = resolve_checkpoint(checkpoint)
        self.base_model_name = model or self.manifest.base_model
        self.model = None

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if isinstance(self.trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise ConfigError(
                f"trainer.strategy: {type(self.trainer.strategy).__name__} shards parameters; features need every "
                "rank to hold the whole model: use strategy ddp (data parallel) for predict"
            )

    def _trainable(self) -> bool:
        return False

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from peft import PeftModel

        base = load_causal_lm(self.base_model_name, self.hparams.dtype, self.hparams.attn_implementation)
        self.model = PeftModel.from_pretrained(base, str(self.ckpt.adapter_dir), is_trainable=True)
        self.model.eval()  # dropout off: a feature is a property of the sample, not of a dropout mask
        for p in self.model.parameters():
            if p.requires_grad:
                p.requires_grad_(self._trainable())

    def feature_metadata(self) -> dict:
        """Everything about the module that defines its features (stored beside them, compared on reuse)."""
        return {
            "module": type(self).__name__,
            "model": self.base_model_name,
            "checkpoint": str(self.ckpt.path.resolve()),
            "checkpoint_epoch": self.ckpt.epoch,
            "checkpoint_lr": self.ckpt.lr,
            "dtype": self.hparams.dtype,
        }


class GradientFeatureModule(CheckpointFeatureModule):
    """Per-sample gradients of `objective` at a warmup checkpoint, optionally transformed, for `Trainer.predict`."""

    def __init__(
        self,
        checkpoint: str,
        objective: Objective | None = None,
        transform: GradientTransform | None = None,
        model: str | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = "eager",
        compute_dtype: str | None = "float32",
        max_tokens_per_pass: int | None = 4096,
    ):
        """
        Args:
            checkpoint: Warmup checkpoint: an epoch folder (`out/warmup/checkpoints/epoch-2`) or `folder:2`.
            objective: The per-sample loss whose gradient is taken (default SFTObjective); e.g.
                `{class_path: rose_pl.features.objectives.DPOObjective, init_args: {beta: 0.1}}`.
            transform: Applied to each per-sample gradient before the sink, e.g.
                `{class_path: rose_pl.features.transforms.AdamDirection}` (the training side); None: the raw gradient.
            model: Base model; by default the one recorded in the checkpoint manifest.
            dtype: Weights dtype of the base model.
            attn_implementation: Attention kernel; eager is the safe choice with padding masks.
            compute_dtype: dtype of the per-sample outer products (results are float32 either way); None keeps
                the activation dtype (bfloat16 under bf16 weights or precision, faster on GPU).
            max_tokens_per_pass: At most this many tokens (rows x padded length; a pair counts both sides) go
                through one forward and backward: a batch of long rows is split into passes, each trimmed to
                its own longest row. Activation memory grows with it (about 2 GB per 1024 tokens for SmolLM2-135M
                on CPU; far more for 8B models); None: the whole batch at once.
        """
        super().__init__(checkpoint, model, dtype, attn_implementation)
        self.save_hyperparameters(ignore=["objective", "transform"])
        self.objective = objective if objective is not None else SFTObjective()
        if not isinstance(self.objective, Objective):
            raise ConfigError(f"objective: {self.objective!r} is not an Objective (rose_pl.features.objectives)")
        if transform is not None and not isinstance(transform, GradientTransform):
            raise ConfigError(f"transform: {transform!r} is not a GradientTransform (rose_pl.features.transforms)")
        if compute_dtype is not None and not isinstance(getattr(torch, compute_dtype, None), torch.dtype):
            raise ConfigError(f"compute_dtype: {compute_dtype!r} is not a torch dtype")
        if max_tokens_per_pass is not None and (isinstance(max_tokens_per_pass, bool)
                                                or not isinstance(max_tokens_per_pass, int) or max_tokens_per_pass < 1):
            raise ConfigError(f"max_tokens_per_pass: {max_tokens_per_pass!r} is not a positive integer (or None)")
        self.transform = transform
        self.gradient_sink = None
        self._grads = None

    def _trainable(self) -> bool:
        return True

    def gradient_shapes(self) -> dict[str, torch.Size]:
        """Ordered {parameter name: shape} of the parameters whose per-sample gradients are produced."""
        self.configure_model()
        return {n: p.shape for n, p in self.model.named_parameters() if p.requires_grad}

    def feature_metadata(self) -> dict:
        meta = super().feature_metadata()
        meta["objective"] = self.objective.metadata()
        if self.transform is not None:
            self.transform.setup(self)
            meta["transform"] = self.transform.metadata()
        meta["compute_dtype"] = self.hparams.compute_dtype
        return meta

    def on_predict_start(self) -> None:
        if self.transform is not None:
            self.transform.setup(self)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        from rose_pl.features.per_sample_grads import PerSampleGradients

        preference = "chosen_input_ids" in batch
        if preference != (self.objective.batch_kind == "preference"):
            needs = ("preference batches (data kind 'preference')" if self.objective.batch_kind == "preference"
                     else "SFT batches (data kind 'sft' or 'preference_sft')")
            raise ConfigError(f"objective {self.objective!r} needs {needs}, got {'preference' if preference else 'SFT'} "
                              "batches")
        # Lightning predicts under inference mode; gradients need a normal autograd context and tensors
        # created outside inference mode.
        with torch.inference_mode(False), torch.enable_grad():
            batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
            index = batch.pop("index")
            if self._grads is None:
                compute_dtype = getattr(torch, self.hparams.compute_dtype) if self.hparams.compute_dtype else None
                self._grads = PerSampleGradients(self.model, compute_dtype=compute_dtype)
            sink = self.gradient_sink
            if self.transform is not None:
                if sink is None:
                    raise ConfigError(f"transform {type(self.transform).__name__} needs a gradient sink "
                                      "(add a ProjectionCallback or another sink callback)")
                self.transform.setup(self)
                sink = self.transform.wrap(sink, self.device)
            outs = [self._grads.compute(self.objective, chunk, sink=sink)
                    for chunk in split_rows(batch, self.hparams.max_tokens_per_pass)]
            return {"index": index, "grads" if sink is None else "features": _concat(outs)}


def split_rows(batch: dict, max_tokens: int | None) -> list[dict]:
    """Consecutive rows of a right-padded batch in chunks of at most `max_tokens` tokens (rows x the chunk's
    longest row; a preference pair counts both sides), each trimmed to its longest row. A row longer than the
    budget is a chunk of its own."""
    masks = [batch[k] for k in ("attention_mask", "chosen_attention_mask", "rejected_attention_mask") if k in batch]
    lengths = torch.stack([m.sum(1) for m in masks]).max(0).values.tolist()
    if max_tokens is None or len(lengths) * max(lengths) * len(masks) <= max_tokens:
        return [batch]
    per_row = len(masks)  # a pair's two sides run in one forward pass
    chunks, start = [], 0
    while start < len(lengths):
        end, longest = start + 1, lengths[start]
        while end < len(lengths) and per_row * (end - start + 1) * max(longest, lengths[end]) <= max_tokens:
            longest, end = max(longest, lengths[end]), end + 1
        chunks.append({k: (v[start:end, :longest] if v.dim() == 2 else v[start:end]) if torch.is_tensor(v) else v
                       for k, v in batch.items()})
        start = end
    return chunks


def _concat(outs: list):
    """The per-chunk outputs of a batch as one: tensors stacked by row, dicts of tensors key by key."""
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return torch.cat(outs)
