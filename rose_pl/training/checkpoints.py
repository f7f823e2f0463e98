"""Warmup checkpoints the gradient stage can use: adapter, name-keyed AdamW state, epoch mean learning rate.

Layout of a checkpoint folder (one per warmup run)::

    manifest.json            the source of truth: base model, LoRA config, one entry per epoch
    epoch-1/adapter/         the LoRA adapter in peft's own format (PeftModel.from_pretrained reads it)
    epoch-1/optimizer.pt     {"state": {param_name: {"exp_avg", "exp_avg_sq", "step"}}, "hyper": {...}}
    epoch-1/info.json        epoch, mean learning rate of the epoch, optimizer steps

Parameter names are those of the peft model's `named_parameters()`; LESS assumed name-keyed Adam state
and read torch's integer-keyed state wrongly, so it is converted here, once, by parameter identity.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from rose_pl.errors import CheckpointError
from rose_pl.files import atomic_dir, atomic_write_json
from rose_pl.layout import epoch_dirname

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ADAPTER_DIR = "adapter"
OPTIMIZER_FILE = "optimizer.pt"
INFO_FILE = "info.json"
FORMAT_VERSION = 1


def named_adam_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Convert torch's integer/parameter-keyed optimizer state to {parameter name: state} on the CPU."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise CheckpointError("optimizer holds a parameter that is not part of the model")
            state = optimizer.state.get(p)
            if not state:
                continue  # never stepped (e.g. checkpoint before the first step)
            out[names[id(p)]] = {
                k: (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else torch.tensor(v))
                for k, v in state.items()
                if k in ("exp_avg", "exp_avg_sq", "step")
            }
    return out


def adam_hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    group = optimizer.param_groups[0]
    return {
        "type": type(optimizer).__name__,
        "betas": list(group["betas"]),
        "eps": float(group["eps"]),
        "weight_decay": float(group.get("weight_decay", 0.0)),
    }


@dataclass
class CheckpointInfo:
    """One warmup checkpoint as listed in the manifest."""

    epoch: int
    path: Path
    lr: float
    """Mean learning rate over the epoch's optimizer steps (the weight eta_i of ROSE Eq. 7)."""
    steps: int
    global_step: int

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR

    def load_optimizer_state(self, map_location="cpu") -> dict[str, Any]:
        file = self.path / OPTIMIZER_FILE
        if not file.is_file():
            raise CheckpointError(f"{file}: optimizer state missing")
        return torch.load(file, map_location=map_location, weights_only=True)


@dataclass
class Manifest:
    """The list of warmup checkpoints of one run."""

    root: Path
    base_model: str
    lora: dict
    checkpoints: list[CheckpointInfo]
    data: dict = field(default_factory=dict)
    """What was trained on: rows, and the rows dropped with their reasons."""

    @classmethod
    def load(cls, root: str | Path) -> "Manifest":
        root = Path(root)
        file = root / MANIFEST
        if not file.is_file():
            raise CheckpointError(f"{file}: no checkpoint manifest (is {root} a warmup output folder?)")
        try:
            raw = json.loads(file.read_text())
            ckpts = [
                CheckpointInfo(int(c["epoch"]), root / c["dir"], float(c["lr"]), int(c["steps"]), int(c["global_step"]))
                for c in raw["checkpoints"]
            ]
            return cls(root, raw["base_model"], raw["lora"], sorted(ckpts, key=lambda c: c.epoch), raw.get("data", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: malformed manifest ({e!r})") from e

    def get(self, epoch: int) -> CheckpointInfo:
        for c in self.checkpoints:
            if c.epoch == epoch:
                return c
        raise CheckpointError(f"{self.root / MANIFEST}: no checkpoint for epoch {epoch}; have {[c.epoch for c in self.checkpoints]}")


def resolve_checkpoint(path: str | Path) -> tuple[Manifest, CheckpointInfo]:
    """Accept either an epoch folder (`.../epoch-2`) or `root:epoch`, return its manifest and entry."""
    text = str(path)
    if ":" in text and not Path(text).exists() and text.rsplit(":", 1)[1].isdigit():
        root, epoch = text.rsplit(":", 1)
        manifest = Manifest.load(root)
        return manifest, manifest.get(int(epoch))
    p = Path(text)
    manifest = Manifest.load(p.parent)
    for c in manifest.checkpoints:
        if c.path.resolve() == p.resolve():
            return manifest, c
    raise CheckpointError(f"{p}: not listed in {p.parent / MANIFEST}")


def find_peft_model(pl_module: pl.LightningModule):
    """The one peft model inside `pl_module` (a CheckpointError names what was found otherwise)."""
    from peft import PeftModel

    found = [(name, m) for name, m in pl_module.named_modules() if isinstance(m, PeftModel)]
    if len(found) != 1:
        raise CheckpointError(
            f"WarmupCheckpoint needs exactly one peft model inside {type(pl_module).__name__}, found "
            f"{[n or '<the module itself>' for n, _ in found] or 'none'} (wrap the causal LM with peft.get_peft_model)")
    return found[0][1]


def lora_config_dict(peft_model) -> dict:
    """The adapter's configuration, as recorded in checkpoint manifests."""
    cfg = peft_model.peft_config[peft_model.active_adapter]
    modules = cfg.target_modules
    return {"r": cfg.r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
            "target_modules": sorted(modules) if isinstance(modules, (set, list, tuple)) else modules}


class WarmupCheckpoint(pl.Callback):
    """Save, at the end of every training epoch, the adapter, the name-keyed AdamW state and the epoch's
    mean learning rate, then update the manifest. Writes are atomic, so a killed run leaves either the
    previous or the new checkpoint, never half of one.

    Works with any LightningModule that holds one peft model (rose_pl's `LoRACausalLM` or your own): parameter
    names are the peft model's own, the base model and LoRA settings are read from peft (or given)."""

    def __init__(self, dirpath: str, every_n_epochs: int = 1, save_optimizer: bool = True,
                 base_model: str | None = None):
        """
        Args:
            dirpath: Output folder of the warmup checkpoints (created if missing).
            every_n_epochs: Save every n-th epoch (the last epoch is always saved).
            save_optimizer: Save the name-keyed AdamW state (the gradient stage needs it; a final
                fine-tune does not).
            base_model: The base model to record in the manifest (what a gradient pass loads the adapter onto);
                default: the module's `model` hyperparameter, else what peft records.
        """
        self.dirpath = Path(dirpath)
        self.save_optimizer = save_optimizer
        self.every_n_epochs = every_n_epochs
        self.base_model = base_model
        self._epoch_lrs: list[float] = []
        self._peft = None

    def on_fit_start(self, trainer, pl_module) -> None:
        # Not in setup: a module may build its model in configure_model, which runs after the callbacks' setup.
        self._check(pl_module)

    def _check(self, pl_module) -> None:
        self._peft = find_peft_model(pl_module)
        hparams = getattr(pl_module, "hparams", {}) or {}
        recorded = getattr(self._peft.peft_config[self._peft.active_adapter], "base_model_name_or_path", None)
        self._base = self.base_model or (hparams.get("model") if isinstance(hparams.get("model"), str) else None) \
            or recorded
        if not self._base:
            raise CheckpointError(f"WarmupCheckpoint: {type(pl_module).__name__} records no base model name "
                                  "(hparams['model'] or peft's base_model_name_or_path): pass base_model=...")
        self._lora = lora_config_dict(self._peft)

    # The learning rate an optimizer step uses is read just before the step.
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._epoch_lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # Keep the learning rates restored from a mid-epoch checkpoint of this same epoch only.
        if self._lrs_epoch != trainer.current_epoch:
            self._epoch_lrs = []
        self._lrs_epoch = trainer.current_epoch

    _lrs_epoch = -1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_lrs": list(self._epoch_lrs), "epoch": self._lrs_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epoch_lrs = list(state_dict.get("epoch_lrs", []))
        self._lrs_epoch = int(state_dict.get("epoch", -1))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        lrs, self._epoch_lrs = self._epoch_lrs, []
        if epoch % self.every_n_epochs and not last:
            return
        if not lrs:
            log.warning("epoch %d took no optimizer step: not saving a checkpoint", epoch)
            return
        if self._peft is None:  # called without on_fit_start (hooks called by hand)
            self._check(pl_module)
        adapter_state, optim_state = _gather_states(trainer, self._peft)
        hyper = adam_hyperparameters(trainer.optimizers[0])
        if trainer.is_global_zero:
            self._write(trainer, epoch, sum(lrs) / len(lrs), len(lrs), trainer.global_step, adapter_state,
                        optim_state, hyper)
        trainer.strategy.barrier("rose_pl.warmup_checkpoint")

    def _write(self, trainer, epoch, mean_lr, steps, global_step, adapter_state, optim_state, hyper) -> None:
        final = self.dirpath / epoch_dirname(epoch)
        info = {"epoch": epoch, "lr": mean_lr, "steps": steps, "global_step": global_step}
        # Everything the manifest will say is known before the folder is written: nothing can fail in between.
        entry, data = info | {"dir": final.name}, _data_summary(trainer.datamodule)
        with atomic_dir(final) as tmp:  # replaces the folder of a resumed run redoing this epoch
            self._peft.save_pretrained(tmp / ADAPTER_DIR, state_dict=adapter_state)
            if self.save_optimizer:
                torch.save({"format": FORMAT_VERSION, "state": optim_state, "hyper": hyper}, tmp / OPTIMIZER_FILE)
            atomic_write_json(tmp / INFO_FILE, info)
        self._update_manifest(entry, data)
        log.info("saved warmup checkpoint %s (mean lr %.3g over %d steps)", final, mean_lr, steps)

    def _update_manifest(self, entry: dict, data: dict) -> None:
        file = self.dirpath / MANIFEST
        raw = json.loads(file.read_text()) if file.is_file() else {}
        entries = [c for c in raw.get("checkpoints", []) if c["epoch"] != entry["epoch"]]
        raw = {
            "format": FORMAT_VERSION,
            "base_model": self._base,
            "lora": dict(self._lora),
            "checkpoints": sorted(entries + [entry], key=lambda c: c["epoch"]),
            "data": data,
        }
        atomic_write_json(file, raw)


def _data_summary(dm) -> dict:
    """Rows trained on and rows the datamodule dropped (with why), when it keeps that record."""
    if dm is None or getattr(dm, "train_dataset", None) is None:
        return {}
    dropped = [{"id": d.id, "where": d.where, "reason": d.reason} for d in getattr(dm, "dropped", [])]
    hparams = getattr(dm, "hparams", {}) or {}
    return {"file": str(hparams.get("train_file", "")), "rows": len(dm.train_dataset), "dropped": len(dropped),
            "dropped_rows": dropped[:50]}


def _gather_states(trainer, model) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Full (unsharded) adapter weights and name-keyed Adam state of the peft `model`, on the CPU."""
    from lightning.pytorch.strategies import FSDPStrategy

    optimizer = trainer.optimizers[0]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if isinstance(trainer.strategy, FSDPStrategy):
        # FSDP shards parameters and optimizer state: gather full, FQN-keyed copies (collective call).
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd, osd = get_state_dict(model, optimizer, options=opts)
        adapter = {n: t for n, t in msd.items() if n in trainable}
        optim = {n: {k: v for k, v in s.items() if k in ("exp_avg", "exp_avg_sq", "step")} for n, s in osd["state"].items()}
        return adapter, optim
    adapter = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    return adapter, named_adam_state(model, optimizer)
