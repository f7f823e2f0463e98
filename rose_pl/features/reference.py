"""The DPO reference's log-probabilities of every validation pair, computed once and reused at every checkpoint.

ROSE's validation gradient is that of the DPO loss with the base model as the reference policy. The reference
does not change from one warmup checkpoint to the next, so its summed response log-probs of each pair are
computed once, by `ReferenceLogProbs` + `ReferenceWriter` (a predict stage on one device, under the run's
precision), into `reference.npz` (+ `reference.json`, written last). `FeatureDataModule(reference=...)` then adds
them to every preference batch (`reference_chosen_logps`, `reference_rejected_logps`) and `DPOObjective` uses them
instead of a second, adapter-disabled forward pass per pair and checkpoint.
"""

from __future__ import annotations

import logging
from typing import Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn

from rose_pl.errors import ConfigError, StoreMismatchError
from rose_pl.features.module import BaseFeatureModule, with_attention_masks
from rose_pl.features.protocols import check_members
from rose_pl.files import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

from rose_pl.layout import REFERENCE_ARRAYS as ARRAYS_FILE, REFERENCE_META as META_FILE


class ReferenceLogProbs(BaseFeatureModule):
    """The reference policy (a base model, no adapter) scoring each pair: summed chosen and rejected log-probs."""

    def __init__(self, model: Union[str, nn.Module, None] = None, checkpoint: str | None = None,
                 dtype: str = "float32", attn_implementation: str | None = "eager"):
        """
        Args:
            model: The reference model (the base model of the warmup): a name or folder, or an nn.Module.
            checkpoint: Weights on top of it, if the reference is not the plain base model.
            dtype: Weights dtype of a model loaded by name.
            attn_implementation: Attention kernel; eager is the safe choice with padding masks.
        """
        super().__init__(model, checkpoint, dtype, attn_implementation)
        self.save_hyperparameters(ignore=["model"])
        self.hparams["model"] = self.base_model_name

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        from rose_pl.features.objectives import DPOObjective

        if "chosen_input_ids" not in batch or "index" not in batch:
            raise ConfigError(f"ReferenceLogProbs needs preference batches with an index (got {sorted(batch)})")
        batch = with_attention_masks(dict(batch))
        with torch.no_grad():
            chosen, rejected = DPOObjective().policy_logps(self.model, batch)
        return {"index": batch["index"], "chosen": chosen.float(), "rejected": rejected.float()}


class ReferenceWriter(BasePredictionWriter):
    """Collects every pair's reference log-probs and writes them (once, atomically) to `output_dir`."""

    def __init__(self, output_dir: str):
        """
        Args:
            output_dir: Folder for reference.npz and reference.json (replaced atomically when complete).
        """
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        check_members("ReferenceWriter", pl_module, {"feature_metadata": "feature_metadata()"}, trainer.datamodule,
                      {"num_examples": "num_examples", "fingerprint": "fingerprint()"})
        n = int(trainer.datamodule.num_examples)
        self._chosen = torch.full((n,), float("nan"), dtype=torch.float64)
        self._rejected = torch.full((n,), float("nan"), dtype=torch.float64)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        index = prediction["index"].to("cpu")
        self._chosen[index] = prediction["chosen"].to("cpu", torch.float64)
        self._rejected[index] = prediction["rejected"].to("cpu", torch.float64)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict" or not hasattr(self, "_chosen"):
            return
        if trainer.world_size > 1:  # ranks hold disjoint rows; NaN marks a row another rank computed
            both = torch.stack([self._chosen, self._rejected])
            gathered = trainer.strategy.all_gather(both.to(trainer.strategy.root_device))
            gathered = gathered.cpu().reshape(-1, 2, both.shape[1])
            both = torch.nan_to_num(gathered, nan=0.0).sum(0)
            both[:, torch.isnan(gathered).all(0).any(0)] = float("nan")
            self._chosen, self._rejected = both[0], both[1]
        if trainer.is_global_zero:
            dm = trainer.datamodule
            planned = set(getattr(dm, "predict_indices", range(len(self._chosen))))
            missing = [i for i in sorted(planned) if np.isnan(self._chosen[i].item())]
            if missing:
                raise StoreMismatchError(f"{self.output_dir}: no reference log-probs for rows {missing[:10]}")
            meta = {"module": pl_module.feature_metadata(), "dataset_fingerprint": dm.fingerprint(),
                    "rows": len(self._chosen), "precision": str(trainer.precision)}
            with atomic_dir(self.output_dir) as tmp:
                np.savez(tmp / ARRAYS_FILE, chosen=self._chosen.numpy(), rejected=self._rejected.numpy())
                atomic_write_json(tmp / META_FILE, meta)
            log.info("reference log-probs of %d pairs written to %s", len(planned), self.output_dir)
        trainer.strategy.barrier("rose_pl.reference")
