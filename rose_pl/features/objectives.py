"""The per-sample objective classes: what loss each sample's gradient is of (the losses are in training/losses.py).

An objective maps `(model, batch) -> PerSampleLoss`: one loss per sample, computed from one or more
rows of a single forward pass. It is the one extension point of the gradient stage: `GradientFeatureModule`
takes one (a class path in YAML, an object in Python) and everything downstream (per-sample gradients,
projection, the store, scoring) ignores which objective produced the loss. To add one, subclass `Objective`:
declare the batch kind it needs and implement `__call__` (and `metadata` if it has settings); then name it
in YAML (`objective: {class_path: my_package.MyObjective}`) or register a `GradientMethod` that uses it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from rose_pl.data.encoding import IGNORE_INDEX
from rose_pl.errors import ConfigError
from rose_pl.training.losses import dpo_loss, sequence_logprobs, sft_loss_per_sample

_PAIR_KEYS = ("input_ids", "attention_mask", "labels")
_PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}


@dataclass(frozen=True)
class PerSampleLoss:
    """Losses of `S` samples computed from `R` rows of one forward pass.

    `row_to_sample[r]` is the sample that row `r` of the model input belongs to; None means rows
    and samples coincide. Rows must not interact (no batch norm, dropout off) for per-sample
    gradients to be exact.
    """

    losses: torch.Tensor
    row_to_sample: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return self.losses.shape[0]


BatchKind = Literal["sft", "preference"]


class Objective(ABC):
    """Maps `(model, batch)` to per-sample losses; subclass it to add an objective.

    `batch_kind` names the batches it needs: "sft" (`input_ids, attention_mask, labels`, from instruction rows
    or a preference set's SFT view) or "preference" (`chosen_*` and `rejected_*`). `metadata()` is stored with
    the features it produces, so features of different objectives (or settings) never mix.
    """

    batch_kind: ClassVar[BatchKind] = "sft"

    @abstractmethod
    def __call__(self, model, batch: dict[str, torch.Tensor]) -> PerSampleLoss: ...

    def metadata(self) -> dict:
        """What defines this objective's gradients (its class and settings)."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", **self.settings()}

    def settings(self) -> dict:
        """Settings that change the gradients (override when there are any)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


class SFTObjective(Objective):
    """Per-sample token-mean SFT loss on an SFT batch (the LESS/ROSE training-gradient objective)."""

    batch_kind = "sft"

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> PerSampleLoss:
        return PerSampleLoss(sft_loss_per_sample(model, batch))


def _right_pad(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(t, (0, length - t.shape[1]), value=value)


def concat_pairs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows of a preference batch as one right-padded `(2N, T)` batch."""
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    return {
        key: torch.cat(
            [_right_pad(batch[f"{side}_{key}"], length, _PAD_VALUES[key]) for side in ("chosen", "rejected")]
        )
        for key in _PAIR_KEYS
    }


class DPOObjective(Objective):
    """Per-sample DPO loss on a preference batch (the ROSE validation objective).

    Chosen and rejected responses run in one forward pass (rows `0..N-1` chosen, `N..2N-1`
    rejected). The reference policy is the same peft model with its adapter disabled, evaluated
    without grad, so no second copy of the model is held. Reference log-probs precomputed by the
    caller can be passed in the batch as `reference_chosen_logps` / `reference_rejected_logps`.

    `reference="none"` skips the reference and uses `-(logp_chosen - logp_rejected)`: its
    gradient differs from the DPO gradient only by the positive per-sample factor
    `beta * sigmoid(-beta * margin)`, so L2-normalized gradient features are identical (and beta
    is irrelevant). Its loss values are not DPO losses.
    """

    batch_kind = "preference"

    def __init__(self, beta: float = 0.1, reference: Literal["adapter_disabled", "none"] = "adapter_disabled"):
        """
        Args:
            beta: DPO temperature.
            reference: where reference log-probs come from: the adapter-disabled model, or none at all.
        """
        problems = []
        if reference not in ("adapter_disabled", "none"):
            problems.append(f"DPOObjective: reference must be 'adapter_disabled' or 'none', got {reference!r}")
        if not beta > 0:
            problems.append(f"DPOObjective: beta must be positive, got {beta}")
        if problems:
            raise ConfigError(problems)
        self.beta = float(beta)
        self.reference = reference

    def policy_logps(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs `(chosen (N,), rejected (N,))` under the current model, one forward."""
        pairs = concat_pairs(batch)
        logps = sequence_logprobs(model, pairs["input_ids"], pairs["attention_mask"], pairs["labels"])
        n = batch["chosen_input_ids"].shape[0]
        return logps[:n], logps[n:]

    def reference_logps(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs: from the batch if precomputed, else the adapter-disabled model."""
        if "reference_chosen_logps" in batch and "reference_rejected_logps" in batch:
            return batch["reference_chosen_logps"].float(), batch["reference_rejected_logps"].float()
        disable_adapter = getattr(model, "disable_adapter", None)
        if disable_adapter is None:
            raise ValueError(
                f"DPOObjective(reference='adapter_disabled') needs a peft model with disable_adapter(), "
                f"got {type(model).__name__}; pass reference_*_logps in the batch or use reference='none'"
            )
        with torch.no_grad(), disable_adapter():
            return self.policy_logps(model, batch)

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> PerSampleLoss:
        n = batch["chosen_input_ids"].shape[0]
        rows = torch.arange(n, device=batch["chosen_input_ids"].device).repeat(2)
        if self.reference == "none":
            chosen, rejected = self.policy_logps(model, batch)
            return PerSampleLoss(-(chosen - rejected), rows)
        # Reference first: it runs without grad, so gradient hooks ignore it in any case.
        ref_chosen, ref_rejected = self.reference_logps(model, batch)
        chosen, rejected = self.policy_logps(model, batch)
        return PerSampleLoss(dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta), rows)

    def settings(self) -> dict:
        return {"beta": self.beta, "reference": self.reference}
