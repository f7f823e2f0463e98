"""rose_pl: reward-oriented data selection (ROSE) for LLM instruction tuning, on PyTorch Lightning.

The public names below are imported on first use, so `import rose_pl` (and the command line's help) stays fast:

    from rose_pl import GradientFeatureModule, ProjectionCallback, FeatureStoreWriter, LoRACausalLM
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # data
    "SFTDataModule": "rose_pl.data.datamodule",
    "FeatureDataModule": "rose_pl.data.datamodule",
    "Encoder": "rose_pl.data.encoding",
    "ChatTemplate": "rose_pl.data.templates",
    "MarkupTemplate": "rose_pl.data.templates",
    "read_instructions": "rose_pl.data.formats",
    "read_preferences": "rose_pl.data.formats",
    "read_golden_answers": "rose_pl.data.formats",
    "IndexedData": "rose_pl.data.indexed",
    # training
    "LoRACausalLM": "rose_pl.training.model",
    "WarmupCheckpoint": "rose_pl.training.checkpoints",
    "Manifest": "rose_pl.training.checkpoints",
    "checkpoint_source": "rose_pl.training.sources",
    # features
    "Objective": "rose_pl.features.objectives",
    "SFTObjective": "rose_pl.features.objectives",
    "DPOObjective": "rose_pl.features.objectives",
    "PerSampleLoss": "rose_pl.features.objectives",
    "PerSampleGradients": "rose_pl.features.per_sample_grads",
    "GradientTransform": "rose_pl.features.transforms",
    "AdamDirection": "rose_pl.features.transforms",
    "GradientFeatureModule": "rose_pl.features.module",
    "BaseFeatureModule": "rose_pl.features.module",
    "FeatureModule": "rose_pl.features.protocols",
    "FeatureData": "rose_pl.features.protocols",
    "TaskData": "rose_pl.features.protocols",
    "compute_features": "rose_pl.features.compute",
    "compute_task_means": "rose_pl.features.compute",
    "compute_exact_scores": "rose_pl.features.compute",
    "HiddenStateModule": "rose_pl.features.hidden",
    "Projector": "rose_pl.features.projection",
    "ProjectionCallback": "rose_pl.features.projection",
    "build_projector": "rose_pl.features.projection",
    "FeatureStore": "rose_pl.features.store",
    "FeatureStoreWriter": "rose_pl.features.store",
    "TaskMeanWriter": "rose_pl.features.exact",
    "TaskMeans": "rose_pl.features.exact",
    "ExactScoreWriter": "rose_pl.features.exact",
    # selection
    "InfluenceResult": "rose_pl.selection.influence",
    "influence_scores": "rose_pl.selection.influence",
    "score_stores": "rose_pl.selection.influence",
    "exact_scores": "rose_pl.selection.influence",
    "SelectionMethod": "rose_pl.selection.methods",
    "GradientMethod": "rose_pl.selection.methods",
    "FeatureSpec": "rose_pl.selection.methods",
    "ScoringContext": "rose_pl.selection.methods",
    "register_method": "rose_pl.selection.methods",
    "select": "rose_pl.selection.select",
    "write_selection": "rose_pl.selection.select",
    # evaluation
    "evaluate_model": "rose_pl.evaluation.evaluate",
    # pipeline
    "RunArgs": "rose_pl.config",
    "run": "rose_pl.pipeline.run",
    # registries
    "CHAT_TEMPLATES": "rose_pl.registry",
    "PROJECTORS": "rose_pl.registry",
    "METHODS": "rose_pl.registry",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rose_pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
