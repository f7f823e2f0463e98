"""Checkpoints from anywhere: what a gradient pass can start from, and its optimizer state by parameter name.

`checkpoint_source(path)` recognises:

| kind | folder | adapter | optimizer state | learning rate (Eq. 7's weight) |
|---|---|---|---|---|
| `rose_pl` | a rose_pl warmup epoch (`.../checkpoints/epoch-2`, or `root:2`) | `adapter/` | `optimizer.pt`, name-keyed | the manifest's epoch mean |
| `hf_trainer` | a Hugging Face Trainer checkpoint (`checkpoint-N/`, as LESS and ROSE write them) | the folder | `optimizer.pt`, torch's index-keyed state | mean `learning_rate` of `trainer_state.json`'s log over the last epoch |
| `peft` | a peft adapter folder (`adapter_config.json`) | the folder | none | none |
| `model` | a full model folder (`config.json`), e.g. a full fine-tune | none | `optimizer.pt` if present | as `hf_trainer` when `trainer_state.json` is there |

Torch's optimizer state is keyed by position, not name. `named_optimizer_state` maps positions to parameter names
the way `transformers.Trainer` groups parameters (weight-decayed ones first, then biases and norm weights, each in
`named_parameters()` order) or, failing that, in plain `named_parameters()` order, and accepts a mapping only when
every shape agrees; anything unmatched is reported at once, by name.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from rose_pl.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SourceKind = Literal["rose_pl", "hf_trainer", "peft", "model"]


@dataclass(frozen=True)
class CheckpointSource:
    """Where a model's weights (and optionally its Adam state) come from."""

    kind: SourceKind
    path: Path
    base_model: str | None
    """The base model it was trained from, as recorded (None when the folder does not say)."""
    adapter_dir: Path | None
    optimizer_file: Path | None
    epoch: int | None
    lr: float | None
    """Mean learning rate of the epoch that ended at this checkpoint (None when nothing records it)."""

    def load_optimizer_state(self) -> dict[str, Any]:
        """The saved optimizer state as torch.load gives it (name- or index-keyed)."""
        if self.optimizer_file is None or not self.optimizer_file.is_file():
            raise CheckpointError(f"{self.path}: no optimizer state ({OPTIMIZER_FILE}) in this {self.kind} checkpoint")
        return torch.load(self.optimizer_file, map_location="cpu", weights_only=True)


def _trainer_lr(folder: Path) -> tuple[int | None, float | None]:
    """(epoch, mean learning rate over the last epoch's logged steps) from a Trainer's trainer_state.json."""
    file = folder / TRAINER_STATE
    if not file.is_file():
        return None, None
    try:
        state = json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    epoch = state.get("epoch")
    if not isinstance(epoch, (int, float)):
        return None, None
    end = round(float(epoch))
    lrs = [float(e["learning_rate"]) for e in state.get("log_history", [])
           if isinstance(e, dict) and "learning_rate" in e and end - 1 < float(e.get("epoch", -1)) <= float(epoch) + 1e-9]
    return end, (sum(lrs) / len(lrs) if lrs else None)


def checkpoint_source(path: str | Path) -> CheckpointSource:
    """Recognise a checkpoint folder (see the module docstring); a CheckpointError says what was expected."""
    from rose_pl.training.checkpoints import MANIFEST, resolve_checkpoint

    text = str(path)
    p = Path(text)
    if (p.parent / MANIFEST).is_file() or (":" in text and not p.exists()):
        manifest, ckpt = resolve_checkpoint(text)
        return CheckpointSource("rose_pl", ckpt.path, manifest.base_model, ckpt.adapter_dir,
                                ckpt.path / OPTIMIZER_FILE, ckpt.epoch, ckpt.lr)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint folder")
    optimizer = p / OPTIMIZER_FILE if (p / OPTIMIZER_FILE).is_file() else None
    epoch, lr = _trainer_lr(p)
    if (p / ADAPTER_CONFIG).is_file():
        try:
            base = json.loads((p / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        except ValueError as e:
            raise CheckpointError(f"{p / ADAPTER_CONFIG}: not valid JSON ({e})") from None
        kind: SourceKind = "hf_trainer" if (p / TRAINER_STATE).is_file() else "peft"
        return CheckpointSource(kind, p, base, p, optimizer, epoch, lr)
    if (p / "config.json").is_file():
        return CheckpointSource("model", p, str(p), None, optimizer, epoch, lr)
    raise CheckpointError(f"{p}: not a checkpoint: expected a rose_pl warmup epoch folder (listed in ../{MANIFEST}), "
                          f"a Hugging Face Trainer checkpoint or peft adapter folder ({ADAPTER_CONFIG}), or a model "
                          "folder (config.json)")


# ---- does an adapter fit a model ------------------------------------------------------------------------
def _adapter_shapes(adapter_dir: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        return {}  # an old .bin adapter: peft's own loader will say what it finds
    with safe_open(str(file), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def check_adapter_fits(model: nn.Module, adapter_dir: str | Path, model_name: str = "the model") -> None:
    """Raise ConfigError (naming the adapter, the model and what differs) unless every LoRA matrix of the adapter
    fits the layer it adapts in `model`: an adapter of another base model is refused before peft loads it."""
    adapter_dir = Path(adapter_dir)
    try:
        recorded = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        recorded = None
    modules = dict(model.named_modules())
    problems = []
    for key, shape in _adapter_shapes(adapter_dir).items():
        for part in (".lora_A.", ".lora_B."):
            if part not in key:
                continue
            layer = key.split(part)[0].removeprefix("base_model.model.")
            module = modules.get(layer)
            if module is None:
                problems.append(f"it adapts {layer}, which {model_name} does not have")
            elif isinstance(module, nn.Linear):
                expected = module.in_features if part == ".lora_A." else module.out_features
                got = shape[1] if part == ".lora_A." else shape[0]
                if got != expected:
                    side = "inputs" if part == ".lora_A." else "outputs"
                    problems.append(f"{layer} has {expected} {side} in {model_name}, {got} in the adapter")
        if len(problems) >= 3:
            break
    if problems:
        trained = f" (it records base model {recorded!r})" if recorded else ""
        raise ConfigError(f"adapter {adapter_dir} was trained on another base model than {model_name}{trained}: "
                          + "; ".join(problems[:3]))


# ---- optimizer state by parameter name --------------------------------------------------------------------
def _trainer_groups(model: nn.Module, names: list[str]) -> list[str]:
    """`names` in transformers.Trainer's optimizer order: weight-decayed parameters, then the rest (biases and the
    weights of norm layers), each in `named_parameters()` order."""
    norm = {f"{m}.{p}" if m else p for m, module in model.named_modules()
            if "norm" in type(module).__name__.lower() for p, _ in module.named_parameters(recurse=False)}
    decay = [n for n in names if n not in norm and not n.endswith("bias")]
    return decay + [n for n in names if n not in decay]


def named_optimizer_state(saved: dict, model: nn.Module, names: list[str] | None = None,
                          where: str = "optimizer state") -> dict[str, Any]:
    """{"state": {name: {exp_avg, exp_avg_sq, step}}, "hyper": {betas, eps, ...}} from a saved optimizer state:
    rose_pl's name-keyed format as is, or torch's index-keyed `optimizer.state_dict()` mapped to the names of
    `model`'s trainable parameters (or `names`), checked shape by shape."""
    if "hyper" in saved and all(isinstance(k, str) for k in saved.get("state", {})):
        return {"state": dict(saved["state"]), "hyper": dict(saved["hyper"])}
    if "state" not in saved or "param_groups" not in saved:
        raise CheckpointError(f"{where}: neither rose_pl's name-keyed state nor a torch optimizer state_dict "
                              "(state, param_groups)")
    params = dict(model.named_parameters())
    names = list(names) if names is not None else [n for n, p in params.items() if p.requires_grad]
    order = [i for group in saved["param_groups"] for i in group["params"]]
    if len(order) != len(names):
        raise CheckpointError(f"{where}: holds {len(order)} parameters, the model trains {len(names)}; load the "
                              "checkpoint into the model it was saved from (same adapter, same trainable parameters)")
    problems: list[str] = []
    for candidate in (_trainer_groups(model, names), names):
        problems = []
        state = {}
        for index, name in zip(order, candidate):
            entry = saved["state"].get(index)
            if entry is None:
                continue  # never stepped
            shape = tuple(entry["exp_avg"].shape)
            if shape != tuple(params[name].shape):
                problems.append(f"{name}: parameter {tuple(params[name].shape)}, state {shape}")
            state[name] = {k: v for k, v in entry.items() if k in ("exp_avg", "exp_avg_sq", "step")}
        if not problems:
            group = saved["param_groups"][0]
            hyper = {"type": "from state_dict", "betas": list(group["betas"]), "eps": float(group["eps"]),
                     "weight_decay": float(group.get("weight_decay", 0.0))}
            return {"state": state, "hyper": hyper}
    raise CheckpointError(f"{where}: the saved state does not match the model's trainable parameters in any known "
                          "order:\n  - " + "\n  - ".join(problems[:20]))


def check_state_covers(state: dict[str, dict], shapes: dict[str, torch.Size], where: str) -> None:
    """Raise CheckpointError listing every parameter without Adam state or with a mis-shaped one."""
    problems = [f"{n}: no Adam state" for n in shapes if n not in state]
    for n, s in shapes.items():
        if n in state:
            for key in ("exp_avg", "exp_avg_sq"):
                if key not in state[n]:
                    problems.append(f"{n}: no {key}")
                elif tuple(state[n][key].shape) != tuple(s):
                    problems.append(f"{n}: {key} has shape {tuple(state[n][key].shape)}, the parameter {tuple(s)}")
    if problems:
        raise CheckpointError(f"{where}: Adam state does not cover the parameters whose gradients are taken "
                              f"({len(problems)} problems):\n  - " + "\n  - ".join(problems[:30]))

