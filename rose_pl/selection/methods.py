"""Selection methods: one registry (`rose_pl.registry.METHODS`) of everything `run` can compare.

A method has a name, the feature stages it needs, and a function from a `ScoringContext` to an
`InfluenceResult` (scores, per-task scores, best task), so selection, reports and the comparison treat every
method alike. Two kinds:

- `SelectionMethod`: a score function plus optional `FeatureSpec`s (Lightning predict stages over the pool or
  a target's validation set). Adding a baseline is one function and one `register_method(...)`.
- `GradientMethod`: ROSE Eq. 7 between the pool's per-sample Adam-direction SFT gradients and the gradients of
  a validation objective (DPO for ROSE, SFT for LESS). The pipeline scores it exactly (task-mean validation
  gradients, one pool pass) or from projected feature stores, so a new objective needs only its class and a
  `GradientMethod` naming it.

Built in: rose, less, rds, bm25, random.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

from rose_pl.config import FeatureArgs
from rose_pl.data.formats import PreferenceExample
from rose_pl.data.table import PoolTable
from rose_pl.errors import ConfigError
from rose_pl.registry import METHODS
from rose_pl.selection.influence import InfluenceResult, exact_scores, score_stores

log = logging.getLogger(__name__)

DataKind = Literal["sft", "preference", "preference_sft"]


def class_config(cls: str, **init_args) -> dict:
    """A LightningCLI class configuration: {"class_path", "init_args"}."""
    return {"class_path": cls, "init_args": init_args}


@dataclass(frozen=True)
class FeatureSpec:
    """A Lightning predict stage a method needs: a feature module over the pool or a target's validation set.

    Pool specs are shared by every method and target that names the same `side`; validation specs are
    computed per target.
    """

    side: str
    """Folder name of the features (`features/<side>` for the pool, `targets/<t>/features/<side>` otherwise)."""
    data: Literal["pool", "validation"]
    kind: DataKind
    """How the rows are batched: sft (instruction rows), preference (pairs), preference_sft (prompt + chosen)."""
    module: dict
    """Class configuration of the feature module, without its `checkpoint` (the pipeline sets it)."""
    per_checkpoint: bool = True
    """One store per warmup checkpoint; False: the last checkpoint only."""
    projected: bool = True
    """Gradients, projected by the run's projector; False: the module declares its own width (hidden states)."""


@dataclass
class ScoringContext:
    """What a method's score function may use, for one target of one run."""

    pool: PoolTable
    """The pool: ids, source datasets and drops as arrays (`num_rows`, `ids`, `dataset_codes`, `dropped`), texts
    streamed from its source (`texts()`), a few rows by index."""
    validation: list[PreferenceExample]
    """The target's validation pairs (invalid ones dropped, as read)."""
    seed: int
    """The target's selection seed."""
    scoring: Literal["exact", "projected"]
    stores: Callable[[str], list[Path]]
    """Feature store folders of a side (a pool side or the target's), one per checkpoint (or one)."""
    exact_stores: list[Path] = field(default_factory=list)
    """The target's exact score stores, one per checkpoint (exact scoring)."""

    @property
    def task_ids(self) -> list[str]:
        return [v.task for v in self.validation]


@dataclass(frozen=True)
class SelectionMethod:
    """A named way of scoring the pool for a target."""

    name: str
    score: Callable[[ScoringContext], InfluenceResult] | None = None
    """(context) -> scores of every pool row (N,), per task (N, T), best task (N,)."""
    features: Sequence[FeatureSpec] | Callable[[FeatureArgs], Sequence[FeatureSpec]] = ()
    """The feature stages it needs, or a function of the run's feature settings returning them."""
    description: str = ""

    def __post_init__(self):
        if self.score is None:
            raise ConfigError(f"selection method {self.name!r}: give its score function")

    def feature_specs(self, args: FeatureArgs) -> list[FeatureSpec]:
        return list(self.features(args) if callable(self.features) else self.features)

    @property
    def needs_warmup(self) -> bool:
        return bool(self.features)


def training_side(args: FeatureArgs) -> FeatureSpec:
    """The pool's per-sample SFT gradients as Adam update directions: the training side of every gradient method."""
    module = class_config(
        "rose_pl.features.module.GradientFeatureModule",
        objective=class_config("rose_pl.features.objectives.SFTObjective"),
        transform=class_config("rose_pl.features.transforms.AdamDirection"),
        dtype=args.dtype, compute_dtype=args.compute_dtype, max_tokens_per_pass=args.max_tokens_per_pass,
    )
    return FeatureSpec("train", "pool", "sft", module)


@dataclass(frozen=True)
class GradientMethod(SelectionMethod):
    """ROSE Eq. 7: pool Adam-direction SFT gradients against the task means of a validation objective's gradients."""

    side: str = ""
    """Name of the validation side (`val_dpo`, `val_sft`...): folder and column names."""
    kind: DataKind = "preference"
    """Data kind of the validation side."""
    objective: dict | Callable[[FeatureArgs], dict] = field(default_factory=dict)
    """Class configuration of the validation objective (or a function of the run's feature settings)."""

    def __post_init__(self):
        if not self.side:
            raise ConfigError(f"GradientMethod {self.name!r}: side must name the validation side")
        if self.score is None:  # Eq. 7 against this side, exact or projected
            object.__setattr__(self, "score", gradient_scores(self.side))

    def objective_config(self, args: FeatureArgs) -> dict:
        return self.objective(args) if callable(self.objective) else self.objective

    def validation_module(self, args: FeatureArgs) -> dict:
        """The feature module of the validation side: raw per-sample gradients of the objective."""
        return class_config("rose_pl.features.module.GradientFeatureModule", objective=self.objective_config(args),
                            dtype=args.dtype, compute_dtype=args.compute_dtype,
                            max_tokens_per_pass=args.max_tokens_per_pass)

    def feature_specs(self, args: FeatureArgs) -> list[FeatureSpec]:
        """The projected scoring's stages (exact scoring's are built by the pipeline from the same parts)."""
        return [training_side(args), FeatureSpec(self.side, "validation", self.kind, self.validation_module(args))]

    @property
    def needs_warmup(self) -> bool:
        return True


def gradient_scores(side: str) -> Callable[[ScoringContext], InfluenceResult]:
    """Eq. 7 for validation `side`, from exact score stores or from projected feature stores."""

    def score(ctx: ScoringContext) -> InfluenceResult:
        if ctx.scoring == "exact":
            return exact_scores(ctx.exact_stores, side)
        return score_stores(ctx.stores("train"), ctx.stores(side), ctx.task_ids)

    return score


def register_method(method: SelectionMethod, replace: bool = False) -> SelectionMethod:
    """Add `method` to `rose_pl.registry.METHODS` under its name (then `run` can name it in `methods`)."""
    if not isinstance(method, SelectionMethod):
        raise ConfigError(f"register_method: {method!r} is not a SelectionMethod")
    return METHODS.register(method.name, method, replace=replace)


def get_method(name: str) -> SelectionMethod:
    """A registered method by name, or a SelectionMethod object at an import path."""
    method = METHODS.get(name)
    if not isinstance(method, SelectionMethod):
        raise ConfigError(f"method {name!r} is a {type(method).__name__}, not a SelectionMethod")
    return method


# ---- built-in methods --------------------------------------------------------------------------------
def _dpo(args: FeatureArgs) -> dict:
    return class_config("rose_pl.features.objectives.DPOObjective", beta=args.beta, reference=args.dpo_reference)


def _rds_specs(args: FeatureArgs) -> list[FeatureSpec]:
    module = class_config("rose_pl.features.hidden.HiddenStateModule", dtype=args.dtype)
    return [FeatureSpec("rds_train", "pool", "sft", module, per_checkpoint=False, projected=False),
            FeatureSpec("rds_val", "validation", "preference_sft", module, per_checkpoint=False, projected=False)]


def _rds(ctx: ScoringContext) -> InfluenceResult:
    return score_stores(ctx.stores("rds_train"), ctx.stores("rds_val"), ctx.task_ids, [1.0])


def _bm25(ctx: ScoringContext) -> InfluenceResult:
    from rose_pl.selection.baselines import bm25_scores

    val_texts = [f"{v.prompt}\n{v.chosen}" for v in ctx.validation]
    scores, per_task, tasks = bm25_scores(ctx.pool.texts(), val_texts, ctx.task_ids)
    return InfluenceResult(scores.astype(np.float32), per_task.astype(np.float32), per_task.argmax(1), tasks,
                           np.ones(1), {"method": "bm25"})


def _random(ctx: ScoringContext) -> InfluenceResult:
    from rose_pl.selection.baselines import random_scores

    n = ctx.pool.num_rows
    scores = random_scores(n, ctx.seed).astype(np.float32)
    return InfluenceResult(scores, scores[:, None], np.zeros(n, dtype=np.int64), ["any"], np.ones(1),
                           {"method": "random"})


register_method(GradientMethod(
    "rose", side="val_dpo", kind="preference", objective=_dpo,
    description="ROSE: DPO-loss gradients of the validation pairs (policy = warmup model, reference = base model)"))
register_method(GradientMethod(
    "less", side="val_sft", kind="preference_sft",
    objective=class_config("rose_pl.features.objectives.SFTObjective"),
    description="LESS: SFT-loss gradients of the validation prompts with their chosen answers"))
register_method(SelectionMethod(
    "rds", _rds, features=_rds_specs,
    description="RDS: cosine of mean last-layer hidden states (last warmup checkpoint)"))
register_method(SelectionMethod("bm25", _bm25, description="BM25 (bm25s, BM25Okapi's scores) between validation texts "
                                                           "and pool rows"))
register_method(SelectionMethod("random", _random, description="a uniformly random selection (seeded)"))
