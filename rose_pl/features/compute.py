"""One call for notebooks and scripts: features, task means or exact scores of any model and data, into a store.

Each function builds the same Lightning pieces a YAML stage would (`GradientFeatureModule`, `IndexedData`, the
sink callbacks) and runs `Trainer.predict` on the current device, so the result is what the Lightning path gives,
resumable the same way (rerun with the same arguments and finished rows are skipped):

    from rose_pl import AdamDirection, SFTObjective, compute_features
    store = compute_features(model, dataset, "out/train", transform=AdamDirection.from_optimizer(opt, model),
                             collate_fn=my_collate)
    feats = store.features()          # (N, 8192) memmap, row i = dataset row i
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from rose_pl.features.objectives import Objective
from rose_pl.features.transforms import GradientTransform


def _module(model, objective, transform, checkpoint, parameters, max_tokens_per_pass, compute_dtype):
    from rose_pl.features.module import GradientFeatureModule

    if isinstance(model, GradientFeatureModule):
        return model
    return GradientFeatureModule(model, objective=objective, transform=transform, checkpoint=checkpoint,
                                 parameters=parameters, max_tokens_per_pass=max_tokens_per_pass,
                                 compute_dtype=compute_dtype)


def _data(data, batch_size, collate_fn, fingerprint, task_ids, keys, batch_transform):
    import lightning as L

    from rose_pl.data.indexed import IndexedData

    if isinstance(data, L.LightningDataModule) and hasattr(data, "skip_indices") and hasattr(data, "fingerprint"):
        return data  # already implements the feature-data contract (FeatureDataModule, IndexedData)
    return IndexedData(data, batch_size=batch_size, collate_fn=collate_fn, fingerprint=fingerprint,
                       task_ids=task_ids, keys=keys, batch_transform=batch_transform)


def _predict(module, datamodule, callbacks: list, device: str, root: Path) -> None:
    import lightning.pytorch as pl

    accelerator = "gpu" if device == "cuda" else device
    trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                         default_root_dir=str(root), callbacks=callbacks)
    trainer.predict(module, datamodule=datamodule, return_predictions=False)


def _device(device: str | None) -> str:
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def compute_features(
    model: Any,
    data: Any,
    output_dir: str | Path,
    objective: Objective | None = None,
    transform: GradientTransform | None = None,
    projector: str | Any | None = "countsketch",
    dim: int = 8192,
    seed: int = 0,
    checkpoint: str | None = None,
    parameters: list[str] | None = None,
    batch_size: int | None = None,
    collate_fn: Callable | None = None,
    fingerprint: str | None = None,
    keys: dict[str, str] | None = None,
    batch_transform: Callable | None = None,
    store_dtype: Literal["float16", "float32"] = "float16",
    normalize: bool = True,
    max_tokens_per_pass: int | None = 4096,
    compute_dtype: str | None = "float32",
    device: str | None = None,
):
    """Per-sample gradient features of every row of `data` (projected and L2-normalized, as LESS/ROSE), in a
    FeatureStore at `output_dir`; returns it (read-only).

    model: an nn.Module (plain or peft), a model name or folder, or a GradientFeatureModule. data: a map-style
    Dataset, DataLoader or LightningDataModule (wrapped in IndexedData with batch_size, collate_fn, fingerprint,
    keys, batch_transform). projector: a kind (countsketch, gaussian, identity, trak), a Projector, or None for
    the raw gradient (identity, unnormalized). device: cpu, cuda, or None (cuda when available).
    """
    from rose_pl.features.projection import ProjectionCallback, build_projector
    from rose_pl.features.store import FeatureStore, FeatureStoreWriter

    module = _module(model, objective, transform, checkpoint, parameters, max_tokens_per_pass, compute_dtype)
    datamodule = _data(data, batch_size, collate_fn, fingerprint, None, keys, batch_transform)
    if projector is None:
        projector, normalize, store_dtype = build_projector("identity"), False, "float32"
    elif isinstance(projector, str):
        projector = build_projector(projector, dim=dim, seed=seed)
    callbacks = [ProjectionCallback(projector=projector, normalize=normalize),
                 FeatureStoreWriter(str(output_dir), dtype=store_dtype)]
    _predict(module, datamodule, callbacks, _device(device), Path(output_dir))
    return FeatureStore.open(output_dir)


def compute_task_means(
    model: Any,
    data: Any,
    output_dir: str | Path,
    side: str,
    task_ids: Sequence[str] | None = None,
    objective: Objective | None = None,
    checkpoint: str | None = None,
    parameters: list[str] | None = None,
    batch_size: int | None = None,
    collate_fn: Callable | None = None,
    fingerprint: str | None = None,
    keys: dict[str, str] | None = None,
    batch_transform: Callable | None = None,
    max_tokens_per_pass: int | None = 4096,
    compute_dtype: str | None = "float32",
    device: str | None = None,
):
    """Per-task means of the L2-normalized, unprojected per-sample gradients of `objective` (the validation side of
    exact scoring), in a TaskMeanWriter folder named validation side `side`; returns them (TaskMeans)."""
    from rose_pl.features.exact import TaskMeans, TaskMeanWriter

    module = _module(model, objective, None, checkpoint, parameters, max_tokens_per_pass, compute_dtype)
    datamodule = _data(data, batch_size, collate_fn, fingerprint, task_ids, keys, batch_transform)
    _predict(module, datamodule, [TaskMeanWriter(str(output_dir), side)], _device(device), Path(output_dir))
    return TaskMeans.load(output_dir)


def compute_exact_scores(
    model: Any,
    data: Any,
    output_dir: str | Path,
    means: Sequence[str | Path],
    objective: Objective | None = None,
    transform: GradientTransform | None = None,
    checkpoint: str | None = None,
    parameters: list[str] | None = None,
    batch_size: int | None = None,
    collate_fn: Callable | None = None,
    fingerprint: str | None = None,
    keys: dict[str, str] | None = None,
    batch_transform: Callable | None = None,
    max_tokens_per_pass: int | None = 4096,
    compute_dtype: str | None = "float32",
    device: str | None = None,
):
    """Exact scores of every row of `data` against the task means in `means` (one folder per validation side): the
    inner product of each row's (transformed) gradient with every task mean, and its squared norm, in a store at
    `output_dir` (read them with `rose_pl.selection.influence.exact_scores`); returns the store."""
    from rose_pl.features.exact import ExactScoreWriter, ExactTarget
    from rose_pl.features.store import FeatureStore

    module = _module(model, objective, transform, checkpoint, parameters, max_tokens_per_pass, compute_dtype)
    datamodule = _data(data, batch_size, collate_fn, fingerprint, None, keys, batch_transform)
    writer = ExactScoreWriter([ExactTarget(str(output_dir), [str(m) for m in means])])
    _predict(module, datamodule, [writer], _device(device), Path(output_dir))
    return FeatureStore.open(output_dir)
