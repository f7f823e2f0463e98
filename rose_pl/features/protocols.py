"""What rose_pl's feature callbacks need of your LightningModule and your data: the published contracts.

Bring your own module and data to `ProjectionCallback`, `FeatureStoreWriter`, `TaskMeanWriter` and
`ExactScoreWriter`: they need only the members below. Each callback checks them in `setup`, before anything is
written, and reports every missing member at once. rose_pl's own `GradientFeatureModule` / `HiddenStateModule`
and `FeatureDataModule` / `IndexedData` (which wraps any map-style Dataset, DataLoader or LightningDataModule)
implement them.

`predict_step(batch, batch_idx)` of a feature module returns `{"index": LongTensor (B,), "features": ...}`: the
rows' positions in the dataset (never their position in the batch) and, with a sink installed, what the sink's
`finish()` returned (`(B, dim)` features); without one, the raw per-sample gradients under "grads".
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from rose_pl.errors import ConfigError


@runtime_checkable
class FeatureModule(Protocol):
    """A LightningModule that produces per-sample gradient blocks."""

    gradient_sink: object | None
    """Set by the sink callback before predicting: `begin(S, device)`, `add(name, grad)` per parameter, `finish()`
    (see `rose_pl.features.per_sample_grads.GradientSink`); the module hands every block to it."""

    def gradient_shapes(self) -> dict[str, torch.Size]:
        """{parameter name: shape}, in a fixed order, of the parameters whose per-sample gradients it produces."""

    def feature_metadata(self) -> dict:
        """What defines its features (model, weights, objective, transform...): stored with them and compared
        when a store is resumed, so features of another setting never mix in."""


@runtime_checkable
class FeatureData(Protocol):
    """A LightningDataModule whose predict batches carry each row's index."""

    num_examples: int
    """Rows in the dataset's index space (the store's row count); dropped rows included."""
    skip_indices: set[int] | None
    """Rows `predict_dataloader` leaves out; a writer sets it to the rows already written, so a rerun resumes."""

    def fingerprint(self) -> str:
        """A digest of the rows and of every setting that changes them: a store of other data is refused."""


@runtime_checkable
class TaskData(FeatureData, Protocol):
    """Validation data for task means: FeatureData whose rows belong to named tasks."""

    task_ids: list[str]
    """The task of each row (as long as num_examples)."""


MODULE_MEMBERS = {
    "gradient_shapes": "gradient_shapes() -> {parameter name: shape} of the parameters it takes gradients of",
    "feature_metadata": "feature_metadata() -> dict of what defines its features",
    "gradient_sink": "gradient_sink, an attribute the sink callback sets before predicting",
}
DATA_MEMBERS = {
    "num_examples": "num_examples: rows in the dataset (the store's row count)",
    "fingerprint": "fingerprint() -> str digest of the rows and their settings",
    "skip_indices": "skip_indices: the rows predict_dataloader leaves out (already written: how a rerun resumes)",
}
TASK_MEMBERS = {**DATA_MEMBERS, "task_ids": "task_ids: the task name of each row"}


def check_members(by: str, module=None, module_needs: dict[str, str] | None = None, data=None,
                  data_needs: dict[str, str] | None = None) -> None:
    """Raise one ConfigError naming every member `module` and `data` lack of what `by` needs of them."""
    problems = []
    for obj, needs, what in ((module, module_needs, "the LightningModule"), (data, data_needs, "the datamodule")):
        if not needs:
            continue
        if obj is None:
            problems.append(f"{by} needs {what}, and there is none (trainer.predict(model, datamodule=...))")
            continue
        missing = [doc for name, doc in needs.items() if not hasattr(obj, name)]
        if missing:
            problems.append(f"{by} needs {what} {type(obj).__name__} to have: " + "; ".join(missing))
    if problems:
        raise ConfigError(problems + ["(rose_pl.features.protocols; wrap plain data in rose_pl.IndexedData)"])
