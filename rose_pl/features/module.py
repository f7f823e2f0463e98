"""Predict-time LightningModules: batch -> per-sample features, for any causal LM.

The model comes from anywhere (`BaseFeatureModule`): an `nn.Module` already built (a plain Hugging Face model or a
peft model), a hub id / local folder / embedded name, optionally with a checkpoint on top: a rose_pl warmup epoch,
a Hugging Face Trainer checkpoint folder (as LESS and ROSE write them), a peft adapter folder, or a full model
folder (`rose_pl.training.sources`). Which parameters get gradients is an argument (`parameters`: name patterns);
by default the trainable ones of plain `nn.Linear` layers (the LoRA matrices of a peft model).

`GradientFeatureModule` takes an objective (what loss each sample's gradient is of) and an optional transform
(what the gradient becomes: `AdamDirection` for the training side). Both are injected: a class path in YAML,
an object in Python. The per-sample blocks go to `self.gradient_sink` (set by a sink callback such as
`ProjectionCallback`, `ExactScoreWriter` or `TaskMeanWriter`) as soon as each is ready; without a sink,
`predict_step` returns the raw per-sample gradients, which is handy in other projects. What a sink callback needs
of a module is the `FeatureModule` protocol (`rose_pl.features.protocols`).

| side | objective | transform | data kind |
|---|---|---|---|
| ROSE/LESS training | `SFTObjective()` | `AdamDirection()` | sft (the pool) |
| ROSE validation | `DPOObjective(beta)` | none | preference |
| LESS validation | `SFTObjective()` | none | preference_sft |
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from typing import Union

import lightning.pytorch as pl
import torch
from torch import nn

from rose_pl.errors import CheckpointError, ConfigError
from rose_pl.features.objectives import Objective, SFTObjective
from rose_pl.features.transforms import GradientTransform
from rose_pl.hub import load_causal_lm
from rose_pl.training.sources import CheckpointSource, check_adapter_fits, checkpoint_source

log = logging.getLogger(__name__)

_ID_ELEMENTS = 4096  # elements at each end of a parameter that identify the weights (all of a LoRA matrix)


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def weights_id(model: nn.Module, names: list[str]) -> str:
    """A short digest of the named parameters' values (small ones whole, large ones by their ends): features of
    other weights never pass for these, wherever the checkpoint folder was copied."""
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in sorted(names):
        flat = params[name].detach().reshape(-1)
        ends = flat if flat.numel() <= 2 * _ID_ELEMENTS else torch.cat([flat[:_ID_ELEMENTS], flat[-_ID_ELEMENTS:]])
        digest.update(f"{name}{tuple(params[name].shape)}{params[name].dtype}".encode())
        digest.update(ends.to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


class BaseFeatureModule(pl.LightningModule):
    """Base of the feature modules: a causal LM in eval mode, from any source (see the module docstring)."""

    takes_gradients = False
    """Whether some parameters keep requires_grad (gradient modules) or none does (hidden states)."""

    def __init__(self, model: Union[str, nn.Module, None] = None, checkpoint: str | None = None,
                 dtype: str = "float32", attn_implementation: str | None = "eager",
                 parameters: list[str] | None = None):
        super().__init__()
        self.given = model if isinstance(model, nn.Module) else None
        self.source: CheckpointSource | None = checkpoint_source(checkpoint) if checkpoint is not None else None
        name = model if isinstance(model, str) else None
        problems = []
        if model is not None and not isinstance(model, (str, nn.Module)):
            problems.append(f"model: {model!r} is neither a model name or folder nor an nn.Module")
        if name is None and self.given is None:
            if self.source is None:
                problems.append("give a model (hub id, folder, embedded name or nn.Module), a checkpoint, or both")
            elif self.source.kind == "model":
                name = str(self.source.path)
            elif self.source.base_model:
                name = self.source.base_model
            else:
                problems.append(f"checkpoint {self.source.path} does not record its base model: give model too")
        if parameters is not None and (isinstance(parameters, str) or not all(isinstance(p, str) for p in parameters)):
            problems.append(f"parameters: {parameters!r} is not a list of name patterns")
        if problems:
            raise ConfigError(problems)
        self.base_model_name = name
        self.model = None
        self._trained: list[str] = []
        self._weights_id: str | None = None

    # ---- the model ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if isinstance(self.trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise ConfigError(
                f"trainer.strategy: {type(self.trainer.strategy).__name__} shards parameters; features need every "
                "rank to hold the whole model: use strategy ddp (data parallel) for predict"
            )

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from peft import PeftModel

        adapter = self.source.adapter_dir if self.source is not None else None
        if self.given is not None:
            net = self.given
            if adapter is not None:
                if isinstance(net, PeftModel):
                    raise ConfigError(f"model is a peft model already; checkpoint {adapter} would add a second "
                                      "adapter: pass the base model, or no checkpoint")
                check_adapter_fits(net, adapter, type(net).__name__)
                net = PeftModel.from_pretrained(net, str(adapter), is_trainable=True)
        else:
            net = load_causal_lm(self.base_model_name, self.hparams.dtype, self.hparams.attn_implementation)
            if adapter is not None:
                check_adapter_fits(net, adapter, self.base_model_name)
                net = PeftModel.from_pretrained(net, str(adapter), is_trainable=True)
        net.eval()  # dropout off: a feature is a property of the sample, not of a dropout mask
        self._trained = [n for n, p in net.named_parameters() if p.requires_grad]
        self._weights_id = weights_id(net, self._trained or [n for n, _ in net.named_parameters()])
        chosen = set(self._choose(net)) if self.takes_gradients else set()
        for n, p in net.named_parameters():
            p.requires_grad_(n in chosen)
        self.model = net

    def _choose(self, net: nn.Module) -> list[str]:
        """The parameters whose per-sample gradients are taken (see `parameters`)."""
        patterns = self.hparams.get("parameters")
        names = [n for n, _ in net.named_parameters()]
        if patterns is not None:
            unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
            if unmatched:
                raise ConfigError(f"parameters: {unmatched} match no parameter of the model (e.g. {names[:3]})")
            return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        owner = {f"{m}.{p}" if m else p: module for m, module in net.named_modules()
                 for p, _ in module.named_parameters(recurse=False)}
        linear = [n for n in self._trained if _is_plain_linear(owner[n])]
        skipped = [n for n in self._trained if n not in linear]
        if skipped:
            log.info("gradients of %d trainable parameters of nn.Linear layers; %d trainable parameters of other "
                     "layers (embeddings, norms) are left out (name them in `parameters` to choose): %s",
                     len(linear), len(skipped), ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
        if not linear:
            raise ConfigError(f"the model ({self.base_model_name or type(self.given).__name__}) has no trainable "
                              "nn.Linear parameter: give `parameters` (name patterns) or a checkpoint with an adapter")
        return linear

    def trained_parameter_names(self) -> list[str]:
        """The parameters that were trainable when the model was loaded (those a saved optimizer state covers)."""
        self.configure_model()
        return list(self._trained)

    def optimizer_state(self) -> dict:
        """The optimizer state saved with the checkpoint (for `AdamDirection`), as torch.load returns it."""
        if self.source is None or self.source.optimizer_file is None:
            where = f"checkpoint {self.source.path} ({self.source.kind})" if self.source else "no checkpoint"
            raise CheckpointError(f"AdamDirection needs Adam state, and {where} has none: give "
                                  "AdamDirection(optimizer_state=...), or build it with AdamDirection.from_optimizer("
                                  "optimizer, model) or AdamDirection.from_state_dict(...)")
        return self.source.load_optimizer_state()

    def feature_metadata(self) -> dict:
        """Everything about the module that defines its features (stored beside them, compared on reuse). No path:
        a run folder copied elsewhere keeps its features' identity (the weights' digest)."""
        self.configure_model()
        s = self.source
        return {
            "module": type(self).__name__,
            "model": self.base_model_name or f"<{type(self.given).__name__}>",
            "weights": self._weights_id,
            "checkpoint_kind": s.kind if s else None,
            "checkpoint_epoch": s.epoch if s else None,
            "checkpoint_lr": s.lr if s else None,
            "dtype": self.hparams.dtype,
        }


class GradientFeatureModule(BaseFeatureModule):
    """Per-sample gradients of `objective` for any causal LM, optionally transformed, for `Trainer.predict`."""

    takes_gradients = True

    def __init__(
        self,
        model: Union[str, nn.Module, None] = None,
        objective: Objective | None = None,
        transform: GradientTransform | None = None,
        checkpoint: str | None = None,
        parameters: list[str] | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = "eager",
        compute_dtype: str | None = "float32",
        max_tokens_per_pass: int | None = 4096,
    ):
        """
        Args:
            model: The model: a hub id, local folder or `embedded:...` name (loaded in `dtype`), or an nn.Module
                already built (a plain Hugging Face model or a peft model). None: the base model the checkpoint
                records.
            objective: The per-sample loss whose gradient is taken (default SFTObjective); e.g.
                `{class_path: rose_pl.features.objectives.DPOObjective, init_args: {beta: 0.1}}`.
            transform: Applied to each per-sample gradient before the sink, e.g.
                `{class_path: rose_pl.features.transforms.AdamDirection}` (the training side); None: the raw gradient.
            checkpoint: Weights on top of the model: a rose_pl warmup epoch folder (`out/warmup/checkpoints/epoch-2`
                or `folder:2`), a Hugging Face Trainer checkpoint folder (adapter + optimizer.pt +
                trainer_state.json), a peft adapter folder, or a full model folder. None: the model as given.
            parameters: Name patterns (fnmatch, e.g. `["*lora_*"]`) of the parameters whose gradients are taken;
                None: the trainable parameters of nn.Linear layers (a peft model's LoRA matrices).
            dtype: Weights dtype of a model loaded by name.
            attn_implementation: Attention kernel; eager is the safe choice with padding masks.
            compute_dtype: dtype of the per-sample outer products (results are float32 either way); None keeps
                the activation dtype (bfloat16 under bf16 weights or precision, faster on GPU).
            max_tokens_per_pass: At most this many tokens (rows x padded length; a pair counts both sides) go
                through one forward and backward: a batch of long rows is split into passes, each trimmed to
                its own longest row. Activation memory grows with it (about 2 GB per 1024 tokens for SmolLM2-135M
                on CPU; far more for 8B models); None: the whole batch at once.
        """
        super().__init__(model, checkpoint, dtype, attn_implementation, parameters)
        self.save_hyperparameters(ignore=["model", "objective", "transform"])
        self.hparams["model"] = self.base_model_name
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
        if "index" not in batch:
            raise ConfigError(f"{type(self).__name__}: batches must carry 'index', each row's position in the dataset "
                              f"(they have {sorted(batch)}); wrap the data in rose_pl.IndexedData, or add it")
        with torch.inference_mode(False), torch.enable_grad():
            batch = with_attention_masks({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
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


def with_attention_masks(batch: dict) -> dict:
    """`batch` with an all-ones `[prefix]attention_mask` for every `[prefix]input_ids` that has none (rows without
    padding need no mask)."""
    for key in [k for k in batch if k.endswith("input_ids")]:
        mask = key[: -len("input_ids")] + "attention_mask"
        if mask not in batch and torch.is_tensor(batch[key]):
            batch[mask] = torch.ones_like(batch[key])
    return batch


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
