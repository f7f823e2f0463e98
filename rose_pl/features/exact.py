"""Exact influence scores when the targets are known before the pool pass: no projection, no pool feature store.

Eq. 7 needs, per checkpoint, the inner product of each pool row's (normalized) Adam direction with the mean
of each task's normalized validation gradients. Both sides can be taken exactly:

1. Validation side, `TaskMeanWriter`: per-sample validation gradients (few: tens of pairs) are L2-normalized
   over all parameters and averaged per task, unprojected, into `means.safetensors` ({parameter: (T, *shape)}),
   with `means.json` (tasks, counts, the module's metadata; written last: its presence means complete).
2. Pool side, `ExactScoreWriter`: while the pool's per-sample gradients stream through the sink parameter by
   parameter (the full per-sample gradient is never held), `ExactScoreSink` accumulates for each row its inner
   products with every task mean of every target, and the squared norm of its Adam direction. Each target's
   columns `[<side>/<task>..., norm2]` go to its own store (N x columns, float32, the feature store's
   written-rows mask and atomic completion: a killed pass resumes; DDP ranks write their own rows).

The score of row z for task t at a checkpoint is `inner(z, t) / sqrt(norm2(z))`, which is Eq. 7's
`<mean_t(v / |v|), a_z / |a_z|>` with no random projection (`rose_pl.selection.influence.exact_scores`).

Memory: the task means live on the device, `tasks x trainable parameters` in `means_dtype`: e.g. SmolLM2-135M
with LoRA r=8 on q,v (0.46M parameters) and 60 tasks: 110 MB in float32; Llama-3.1-8B with r=128 on q,k,v,o
(109M parameters): 436 MB per task in float32, 218 MB in bfloat16.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from rose_pl.errors import ConfigError, StoreMismatchError
from rose_pl.features.per_sample_grads import BlockSink
from rose_pl.features.protocols import DATA_MEMBERS, MODULE_MEMBERS, TASK_MEMBERS, check_members
from rose_pl.features.store import KEY_MODULE, FeatureStoreWriter, StoreOutput
from rose_pl.files import atomic_dir, atomic_write_json, file_digest

log = logging.getLogger(__name__)

MEANS_FILE = "means.safetensors"
MEANS_META = "means.json"
NORM_COLUMN = "norm2"
"""Name of the last column of an exact score store: the squared norm of the row's (transformed) gradient."""


def _layout(shapes: dict) -> list:
    return [[str(n), list(s)] for n, s in shapes.items()]


# ---- validation side: per-task means ------------------------------------------------------------------
class TaskMeanWriter(BasePredictionWriter):
    """Averages each task's L2-normalized per-sample gradients (unprojected) and saves the means.

    Needs a `GradientFeatureModule` (its raw per-sample gradients) and a datamodule with `task_ids`. A row
    whose gradient is zero has no direction: it is left out of its task's mean (counted, logged). Under DDP
    the per-task sums are summed over ranks before rank 0 writes.
    """

    def __init__(self, output_dir: str, side: str):
        """
        Args:
            output_dir: Folder for means.safetensors and means.json (replaced atomically when complete). Fields of
                the module's feature metadata may be named in braces, e.g. `.../val_dpo/epoch-{checkpoint_epoch}`.
            side: Name of this validation side (`val_dpo`, `val_sft`, ...): exact score columns are `<side>/<task>`.
        """
        if not isinstance(side, str) or not side or "/" in side:
            raise ConfigError(f"TaskMeanWriter: side must be a non-empty name without '/', got {side!r}")
        super().__init__(write_interval="batch")
        self.output_dir, self.side = output_dir, side

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        dm = trainer.datamodule
        check_members("TaskMeanWriter", pl_module, MODULE_MEMBERS, dm,
                      {k: TASK_MEMBERS[k] for k in ("fingerprint", "task_ids")})
        dm.setup("predict")
        if dm.task_ids is None:
            raise ConfigError("TaskMeanWriter needs the task of every row, and the datamodule has task_ids None "
                              "(IndexedData(..., task_ids=[...]), or a FeatureDataModule on a preference set)")
        self.output_dir = FeatureStoreWriter._fill(self.output_dir, pl_module.feature_metadata())
        self.tasks = sorted(set(dm.task_ids))
        position = {t: i for i, t in enumerate(self.tasks)}
        self._task_of = torch.tensor([position[t] for t in dm.task_ids], dtype=torch.long)
        self.shapes = dict(pl_module.gradient_shapes())
        # The sums exist on every rank from here on: a rank with no rows still takes part in the reduction.
        device = trainer.strategy.root_device
        self._sums = {n: torch.zeros((len(self.tasks), *s), dtype=torch.float32, device=device)
                      for n, s in self.shapes.items()}
        self._counts = torch.zeros(len(self.tasks), dtype=torch.float64, device=device)
        self.zero_rows = 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.gradient_sink = BlockSink(list(self.shapes))

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        blocks: dict[str, torch.Tensor] = prediction["features"]
        device = self._counts.device
        index = prediction["index"].to("cpu")
        norms = torch.zeros(index.numel(), dtype=torch.float64, device=device)
        for g in blocks.values():
            norms += g.reshape(g.shape[0], -1).double().pow(2).sum(1).to(device)
        norms = norms.sqrt()
        keep = norms > 0
        if not bool(keep.all()):
            self.zero_rows += int((~keep).sum())
            log.warning("task means: %d all-zero gradient(s) left out of their task means", int((~keep).sum()))
        tasks = self._task_of[index].to(device)[keep]
        scale = (1.0 / norms[keep]).float()
        for name, g in blocks.items():
            g = g.to(device, torch.float32)[keep]
            self._sums[name].index_add_(0, tasks, g * scale.view(-1, *([1] * (g.dim() - 1))))
        self._counts.index_add_(0, tasks, torch.ones_like(tasks, dtype=torch.float64))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Not on_predict_end: a rank given no rows (fewer rows than ranks) skips the predict hooks but not this one,
        # so every rank takes part in the sums.
        if stage != "predict":
            return
        strategy = trainer.strategy
        counts = strategy.reduce(self._counts, reduce_op="sum") if trainer.world_size > 1 else self._counts
        sums = {n: strategy.reduce(t, reduce_op="sum") if trainer.world_size > 1 else t for n, t in self._sums.items()}
        zero_rows = int(strategy.reduce(torch.tensor(float(self.zero_rows), device=counts.device), reduce_op="sum")
                        ) if trainer.world_size > 1 else self.zero_rows
        failure, message = None, None
        if trainer.is_global_zero:
            try:
                self._write(trainer, pl_module, counts.cpu(), {n: t.cpu() for n, t in sums.items()}, zero_rows)
            except Exception as e:  # re-raised below: as is on rank 0, as a message elsewhere, so no rank waits
                failure, message = e, f"{type(e).__name__}: {e}"
        message = strategy.broadcast(message, src=0)
        if failure is not None:
            raise failure
        if message is not None:
            raise StoreMismatchError(f"task means {self.output_dir} (rank 0 failed): {message}")

    def _write(self, trainer, pl_module, counts, sums, zero_rows) -> None:
        from safetensors.torch import save_file

        present = [i for i, c in enumerate(counts.tolist()) if c > 0]
        empty = [self.tasks[i] for i in range(len(self.tasks)) if i not in present]
        if not present:
            raise StoreMismatchError(f"{self.output_dir}: no task has a usable validation gradient (every row was "
                                     f"dropped or had a zero gradient: {zero_rows} zero); check the validation "
                                     "file and max_seq_length")
        if empty:
            log.warning("task means %s: tasks %s have no usable row and are left out", self.output_dir, empty)
        keep = torch.tensor(present)
        means = {n: (s[keep] / counts[keep].float().view(-1, *([1] * (s.dim() - 1)))).contiguous()
                 for n, s in sums.items()}
        dm = trainer.datamodule
        meta = {
            "tasks": [self.tasks[i] for i in present],
            "counts": [int(counts[i]) for i in present],
            "empty_tasks": empty,
            "zero_rows": zero_rows,
            "side": self.side,
            "normalize": True,
            "parameters": _layout(self.shapes),
            KEY_MODULE: pl_module.feature_metadata(),
            "dataset_fingerprint": dm.fingerprint(),
            "data": dm.settings() if hasattr(dm, "settings") else None,
        }
        with atomic_dir(self.output_dir) as tmp:
            save_file(means, str(tmp / MEANS_FILE))
            meta["means_digest"] = file_digest(tmp / MEANS_FILE)
            atomic_write_json(tmp / MEANS_META, meta)
        log.info("task means of %d tasks (%s rows) written to %s", len(present), int(counts.sum()), self.output_dir)


@dataclass(frozen=True)
class TaskMeans:
    """A TaskMeanWriter folder read back: per-parameter (T, *shape) means and their metadata."""

    path: Path
    tasks: list[str]
    means: dict[str, torch.Tensor]
    meta: dict

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / MEANS_META).is_file():
            raise StoreMismatchError(f"{path}: no {MEANS_META}: the task means are missing or unfinished")
        meta = json.loads((path / MEANS_META).read_text())
        if file_digest(path / MEANS_FILE) != meta.get("means_digest"):
            raise StoreMismatchError(f"{path / MEANS_FILE}: contents differ from {MEANS_META} (damaged or replaced)")
        means = {n: t.to(device, dtype) for n, t in load_file(str(path / MEANS_FILE)).items()}
        return cls(path, list(meta["tasks"]), means, meta)

    @property
    def side(self) -> str:
        """The validation side's name, as recorded by the writer (exact score columns are `<side>/<task>`)."""
        if not self.meta.get("side"):
            raise StoreMismatchError(f"{self.path / MEANS_META}: records no side (written by an older rose_pl); "
                                     "compute the task means again")
        return self.meta["side"]


# ---- pool side: inner products with every task mean ---------------------------------------------------
class ExactScoreSink:
    """GradientSink: per row, the inner product with each task mean and the squared norm, from the blocks.

    `means[name]` is (T, n) over all targets' tasks; `groups[g]` the number of columns of target g. `finish()`
    returns (S, sum(groups) + len(groups)): for each target its inner products, then the (shared) norm2.
    """

    def __init__(self, means: dict[str, torch.Tensor], groups: list[int]):
        self.means, self.groups = means, groups
        self.total = sum(groups)

    def begin(self, num_samples: int, device: torch.device) -> None:
        self._inner = torch.zeros(num_samples, self.total, dtype=torch.float32, device=device)
        self._norm2 = torch.zeros(num_samples, dtype=torch.float32, device=device)
        self._pending = set(self.means)

    def add(self, name: str, grad: torch.Tensor) -> None:
        if name not in self._pending:
            raise RuntimeError(f"ExactScoreSink: unexpected or repeated parameter {name!r}")
        self._pending.discard(name)
        flat = grad.reshape(grad.shape[0], -1).float()
        mean = self.means[name]
        self._inner.addmm_(flat, (mean if mean.dtype == torch.float32 else mean.float()).T)
        self._norm2 += flat.pow(2).sum(1)

    def finish(self) -> torch.Tensor:
        if self._pending:
            raise RuntimeError(f"ExactScoreSink: {len(self._pending)} parameters not added, e.g. {sorted(self._pending)[:3]}")
        parts, start = [], 0
        for width in self.groups:
            parts += [self._inner[:, start:start + width], self._norm2[:, None]]
            start += width
        return torch.cat(parts, dim=1)


@dataclass
class ExactTarget:
    """One target of an exact pass: where its scores go and which task means it is scored against."""

    output_dir: str
    """Store folder of this target's scores (N x (its tasks + 1)); `{checkpoint_epoch}` and other fields of the
    module's feature metadata are filled in."""
    means: list[str]
    """TaskMeanWriter folders of the target, one per validation side, in column order (fields filled in too)."""


class ExactScoreWriter(FeatureStoreWriter):
    """Installs an `ExactScoreSink` over every target's task means and writes each target's columns to its store.

    Use with a `GradientFeatureModule` whose objective and transform make the training side (SFT + AdamDirection),
    at the same checkpoint as the means. One pass over the pool serves every target given.
    """

    def __init__(self, targets: list[ExactTarget], means_dtype: Literal["float32", "bfloat16"] = "float32",
                 overwrite: bool = False):
        """
        Args:
            targets: One entry per target: output_dir (its score store) and means (its task-mean folders).
            means_dtype: dtype of the task means held on the device (bfloat16 halves their memory).
            overwrite: Discard a store made under other metadata instead of refusing it.
        """
        super().__init__(output_dir="", dtype="float32", overwrite=overwrite)
        targets = [t if isinstance(t, ExactTarget) else ExactTarget(**t) for t in targets]
        if not targets or any(not t.means for t in targets):
            raise ConfigError("ExactScoreWriter: give at least one target, each with at least one means folder")
        if means_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"ExactScoreWriter: means_dtype must be float32 or bfloat16, got {means_dtype!r}")
        self.targets, self.means_dtype = targets, means_dtype
        self._sink: ExactScoreSink | None = None

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_members(type(self).__name__, pl_module, MODULE_MEMBERS, trainer.datamodule, DATA_MEMBERS)

    def outputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[StoreOutput]:
        device = trainer.strategy.root_device
        shapes = dict(pl_module.gradient_shapes())
        module_meta = pl_module.feature_metadata()
        _, data = self.data_metadata(trainer)
        dtype = getattr(torch, self.means_dtype)
        per_param: dict[str, list[torch.Tensor]] = {n: [] for n in shapes}
        outputs, groups, start, problems = [], [], 0, []
        for target in self.targets:
            columns, sources = [], []
            output_dir = self._fill(target.output_dir, module_meta)
            for folder in (self._fill(m, module_meta) for m in target.means):
                means = TaskMeans.load(folder, device=device, dtype=dtype)
                problems += self._problems(means, shapes, module_meta)
                for name in shapes:
                    if name in means.means:
                        per_param[name].append(means.means[name].reshape(len(means.tasks), -1))
                columns += [f"{means.side}/{task}" for task in means.tasks]
                sources.append({"side": means.side, "tasks": means.tasks,
                                "digest": means.meta["means_digest"], "objective": means.meta[KEY_MODULE].get("objective")})
            columns.append(NORM_COLUMN)
            meta = {KEY_MODULE: module_meta, "exact": {"columns": columns, "means": sources}, **data}
            outputs.append(StoreOutput(output_dir, len(columns), meta, slice(start, start + len(columns))))
            groups.append(len(columns) - 1)
            start += len(columns)
        if problems:
            raise StoreMismatchError("task means do not fit this pass:\n  - " + "\n  - ".join(problems))
        means = {n: torch.cat(parts) for n, parts in per_param.items()}
        self._sink = ExactScoreSink(means, groups)
        memory = sum(t.numel() * t.element_size() for t in means.values())
        log.info("exact scoring: %d targets, %d task columns, task means %.1f MB on %s", len(self.targets), sum(groups),
                 memory / 2**20, device)
        return outputs

    @staticmethod
    def _problems(means: TaskMeans, shapes: dict, module_meta: dict) -> list[str]:
        problems = []
        if means.meta.get("parameters") != _layout(shapes):
            problems.append(f"{means.path}: computed for other parameters (names or shapes) than this model's")
        theirs = means.meta.get(KEY_MODULE, {})
        for key, what in (("weights", "checkpoint weights (digest)"), ("model", "model")):
            if theirs.get(key) != module_meta.get(key):
                problems.append(f"{means.path}: {what} {theirs.get(key)!r}, this pass uses {module_meta.get(key)!r}")
        return problems

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.gradient_sink = self._sink
