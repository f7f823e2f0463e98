"""Held-out preference metrics (accuracy, DPO implicit reward), SFT loss, and the result file of an evaluation.

Everything here is a plain function or class (no LightningModule), so `evaluate.evaluate_model`, the CLI
and notebooks call it directly. The preference metrics are `torchmetrics.Metric`s with summed states, so
they reduce correctly under DDP (and with `merge_state`). Generation and the LLM judge live in
`generation.py` and `judge.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torchmetrics import MeanMetric, Metric, SumMetric

from rose_pl.data.encoding import IGNORE_INDEX
from rose_pl.errors import ConfigError
from rose_pl.files import atomic_write_json, jsonable

LogprobsFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- preference metrics
def _check_pair(*tensors: torch.Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"expected 1-D tensors of one shape (one value per pair), got {sorted(shapes)}")


class PreferenceAccuracy(Metric):
    """Fraction of pairs with log pi(chosen|x) > log pi(rejected|x) (summed response log-probs).

    Ties count as not correct, so a model that scores both responses equally earns no credit.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, chosen_logp: torch.Tensor, rejected_logp: torch.Tensor) -> None:
        _check_pair(chosen_logp, rejected_logp)
        self.correct += (chosen_logp > rejected_logp).sum()
        self.total += chosen_logp.numel()

    def compute(self) -> torch.Tensor:
        return _ratio(self.correct, self.total)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num.double() / den if den > 0 else torch.tensor(math.nan)


class _RewardMetric(Metric):
    """DPO implicit reward r = beta * (log pi - log pi_ref) of both responses of each pair."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, beta: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        if not beta > 0:
            raise ConfigError(f"beta must be > 0, got {beta}")
        self.beta = float(beta)

    def _rewards(self, chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp):
        _check_pair(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
        reward_w = self.beta * (chosen_logp.double() - ref_chosen_logp.double())
        return reward_w, self.beta * (rejected_logp.double() - ref_rejected_logp.double())


class RewardAccuracy(_RewardMetric):
    """Fraction of pairs whose implicit reward of the chosen response beats the rejected one (ties: not correct)."""

    def __init__(self, beta: float = 0.1, **kwargs: Any):
        super().__init__(beta, **kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp) -> None:
        reward_w, reward_l = self._rewards(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
        self.correct += (reward_w > reward_l).sum()
        self.total += reward_w.numel()

    def compute(self) -> torch.Tensor:
        return _ratio(self.correct, self.total)


class RewardMargin(_RewardMetric):
    """Mean over pairs of reward(chosen) - reward(rejected)."""

    def __init__(self, beta: float = 0.1, **kwargs: Any):
        super().__init__(beta, **kwargs)
        self.add_state("margin_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp) -> None:
        reward_w, reward_l = self._rewards(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
        self.margin_sum += (reward_w - reward_l).sum()
        self.total += reward_w.numel()

    def compute(self) -> torch.Tensor:
        return _ratio(self.margin_sum, self.total)


# --------------------------------------------------------------------------- evaluation loops
def _default_logprobs() -> LogprobsFn:
    from rose_pl.training.losses import sequence_logprobs  # lazy: imported on use

    return sequence_logprobs


def adapter_reference(model: torch.nn.Module):
    """The peft model inside `model` whose adapters can be disabled to get the reference policy, or None."""
    from peft import PeftModel

    for module in model.modules():
        if isinstance(module, PeftModel):
            return module
    return None


def _model_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        model.to(device)
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _progress(dataloader: Iterable[dict], desc: str, unit: str):
    """The batches of `dataloader`, counted as rows with rows/s and ETA (a bar on a terminal, lines otherwise)."""
    from rose_pl.progress import Progress

    dataset = getattr(dataloader, "dataset", None)
    with Progress(len(dataset) if dataset is not None else None, desc, unit=unit) as progress:
        for batch in dataloader:
            yield batch
            progress.update(int(batch["index"].numel()) if "index" in batch else 1)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_preferences(
    model: torch.nn.Module,
    dataloader: Iterable[dict],
    beta: float = 0.1,
    device: str | torch.device | None = None,
    logprobs_fn: LogprobsFn | None = None,
) -> dict[str, Any]:
    """Preference accuracy, DPO reward accuracy/margin and mean log-probs over preference batches.

    `device`: where to run (the model is moved there); default the model's own device. The reference
    policy is the same peft model with adapters disabled; for a model without peft adapters the reward
    metrics are NaN and `reference` is "none". `logprobs_fn` defaults to `training.losses.sequence_logprobs`.
    Under an initialized process group every rank must call this: metric states are summed over ranks.
    """
    logprobs = logprobs_fn or _default_logprobs()
    device = _model_device(model, device)
    peft_model = adapter_reference(model)
    metrics = {
        "pref": PreferenceAccuracy(),
        "reward_acc": RewardAccuracy(beta),
        "margin": RewardMargin(beta),
        "chosen": MeanMetric().set_dtype(torch.float64),
        "rejected": MeanMetric().set_dtype(torch.float64),
        "count": SumMetric().set_dtype(torch.float64),  # a metric, so that compute() sums it over DDP ranks
    }
    for metric in metrics.values():
        metric.to(device)
    was_training = model.training
    model.eval()
    try:
        for batch in _progress(dataloader, "evaluate pairs", "pairs"):
            batch = _to(batch, device)

            def score(side: str) -> torch.Tensor:
                keys = (f"{side}_input_ids", f"{side}_attention_mask", f"{side}_labels")
                return logprobs(model, *(batch[k] for k in keys)).double()

            chosen, rejected = score("chosen"), score("rejected")
            metrics["pref"].update(chosen, rejected)
            metrics["chosen"].update(chosen)
            metrics["rejected"].update(rejected)
            metrics["count"].update(float(chosen.numel()))
            if peft_model is not None:
                with peft_model.disable_adapter():
                    ref_chosen, ref_rejected = score("chosen"), score("rejected")
                metrics["reward_acc"].update(chosen, rejected, ref_chosen, ref_rejected)
                metrics["margin"].update(chosen, rejected, ref_chosen, ref_rejected)
    finally:
        model.train(was_training)

    def value(name: str) -> float:
        metric = metrics[name]
        return float(metric.compute()) if metric.update_count else math.nan

    return {
        "pref_accuracy": value("pref"),
        "reward_accuracy": value("reward_acc"),
        "reward_margin": value("margin"),
        "num_pairs": int(metrics["count"].compute()) if metrics["count"].update_count else 0,
        "chosen_logp_mean": value("chosen"),
        "rejected_logp_mean": value("rejected"),
        "beta": float(beta),
        "reference": "adapter_disabled" if peft_model is not None else "none",
    }


@torch.no_grad()
def evaluate_sft_loss(
    model: torch.nn.Module,
    dataloader: Iterable[dict],
    device: str | torch.device | None = None,
    logprobs_fn: LogprobsFn | None = None,
) -> dict[str, Any]:
    """Negative log-likelihood of held-out SFT answers (batches with `input_ids, attention_mask, labels`).

    `sft_loss` is the token mean over all answer tokens; `sft_loss_per_sample` the mean over samples of
    each sample's token mean. Samples with no answer token (e.g. truncated away) have no per-sample loss;
    they are counted in `num_empty_samples`.
    """
    logprobs = logprobs_fn or _default_logprobs()
    device = _model_device(model, device)
    sums = {k: SumMetric().set_dtype(torch.float64).to(device) for k in ("nll", "tokens", "sample_loss", "samples", "empty")}
    was_training = model.training
    model.eval()
    try:
        for batch in _progress(dataloader, "evaluate SFT loss", "rows"):
            batch = _to(batch, device)
            nll = -logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).double()
            counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).double()  # the one-token shift
            has_tokens = counts > 0
            sums["nll"].update(nll.sum())
            sums["tokens"].update(counts.sum())
            sums["sample_loss"].update((nll[has_tokens] / counts[has_tokens]).sum())
            sums["samples"].update(has_tokens.sum().double())
            sums["empty"].update((~has_tokens).sum().double())
    finally:
        model.train(was_training)
    total = {k: float(m.compute()) if m.update_count else 0.0 for k, m in sums.items()}
    return {
        "sft_loss": total["nll"] / total["tokens"] if total["tokens"] else math.nan,
        "sft_loss_per_sample": total["sample_loss"] / total["samples"] if total["samples"] else math.nan,
        "num_samples": int(total["samples"] + total["empty"]),
        "num_tokens": int(total["tokens"]),
        "num_empty_samples": int(total["empty"]),
    }


# --------------------------------------------------------------------------- results
@dataclass
class EvaluationResult:
    """The metrics of one evaluated model (a method's fine-tune such as "rose", or "base") and what produced them.

    `method` is the label the comparison table shows; `config` records the settings (never secrets).
    """

    method: str
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    def write_json(self, path: str | Path) -> Path:
        """Write atomically (temporary file + os.replace) as strict JSON: NaN and infinities become null."""
        return atomic_write_json(path, jsonable(asdict(self), nan_as_null=True), sort_keys=False, allow_nan=False)

    @classmethod
    def read_json(cls, path: str | Path) -> EvaluationResult:
        """Read a file written by `write_json` (null metrics stay None)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(method=data["method"], metrics=data["metrics"], config=data.get("config", {}))
