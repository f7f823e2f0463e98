"""Every path and file name of a run folder, derived in one place.

```
run.json                                   what ran under which configuration, the scoring mode, the summary (a view of
                                           stages/, rewritten by the run that holds run.lock)
run.lock                                   held by the `rose-pl run` working in this folder (flock; dies with it)
stages/<stage>.json                        each stage's record: the fingerprint it ran under, and when complete, the
                                           size and digest of every output file (the source of truth)
configs/<stage>.yaml                       the LightningCLI YAML of every Lightning stage (rerun one alone)
cache/pool/                                the pool read, validated and tokenized once (rose_pl.data.cache), memory-mapped
                                           by every stage and rank; targets/<t>/cache/<kind>/ likewise for validation sets
logs/<stage>.log                           everything each stage logged, unfiltered
warmup/checkpoints/                        manifest.json + epoch-k/{adapter/, optimizer.pt, info.json}
warmup/resume/                             Lightning checkpoints of an unfinished warmup
features/<side>/epoch-k/                   pool feature stores (projected scoring: side train; rds_train has one store,
                                           features/rds_train/, at the last checkpoint)
targets/<t>/features/<side>/epoch-k/       the target's validation feature stores (projected scoring)
targets/<t>/means/<side>/epoch-k/          the target's per-task mean validation gradients (exact scoring)
targets/<t>/exact/epoch-k/                 the pool's exact scores against the target's tasks (exact scoring)
targets/<t>/selection/<method>/            scores/, selected.jsonl, selection.json, report.md, *.png
targets/<t>/finetune/<method>/             fine-tuned adapter (checkpoints/) and its logs
targets/<t>/evaluation/<method>.json       metrics of the fine-tuned model (and of the base model: base.json)
compare.md, compare.json                   every target's methods side by side
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUN_MANIFEST = "run.json"
RUN_LOCK = "run.lock"
STAGES_DIR = "stages"
CHECKPOINTS_DIR = "checkpoints"
RESUME_DIR = "resume"
RESUME_FILE = "last.ckpt"
SCORES_DIR = "scores"
SELECTED_FILE = "selected.jsonl"
COMPARE_MD = "compare.md"
COMPARE_JSON = "compare.json"
REFERENCE_ARRAYS = "reference.npz"
REFERENCE_META = "reference.json"
"""The DPO reference's log-probs of a validation set (rose_pl.features.reference), read by FeatureDataModule."""
BASE = "base"
"""Name under which the base model's evaluation is filed next to the methods'."""


def stage_filename(stage: str) -> str:
    """A stage name as one file name: slashes become double underscores."""
    return stage.replace("/", "__")


def epoch_dirname(epoch: int) -> str:
    """The folder of checkpoint `epoch` (epochs count from 1), and of everything computed per checkpoint."""
    return f"epoch-{epoch}"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder; nothing else in the package spells them."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    def path(self, *parts) -> Path:
        return self.root.joinpath(*map(str, parts))

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    # ---- run-wide ---------------------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.path(RUN_MANIFEST)

    @property
    def lock(self) -> Path:
        return self.path(RUN_LOCK)

    @property
    def stages(self) -> Path:
        """Stage records (one JSON file per stage)."""
        return self.path(STAGES_DIR)

    def stage_record(self, stage: str) -> Path:
        """The record of one stage (slashes in its name become double underscores)."""
        return self.stages / (stage_filename(stage) + ".json")

    def stage_log(self, stage: str) -> Path:
        """Everything a stage logged, unfiltered (slashes in its name become double underscores)."""
        return self.path("logs", stage_filename(stage) + ".log")

    def stage_config(self, stage: str) -> Path:
        """The generated YAML of a Lightning stage (slashes in its name become double underscores)."""
        return self.path("configs", stage_filename(stage) + ".yaml")

    @property
    def warmup(self) -> Path:
        return self.path("warmup")

    @property
    def checkpoints(self) -> Path:
        """Warmup checkpoints (manifest.json + one folder per epoch)."""
        return self.warmup / CHECKPOINTS_DIR

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / epoch_dirname(epoch)

    @staticmethod
    def resume_checkpoint(stage_dir: Path) -> Path:
        """Lightning's last checkpoint of a training stage (resumes a killed fit)."""
        return Path(stage_dir) / RESUME_DIR / RESUME_FILE

    def pool_features(self, side: str, epoch: int | None = None) -> Path:
        base = self.path("features", side)
        return base if epoch is None else base / epoch_dirname(epoch)

    @property
    def pool_cache(self) -> Path:
        """The pool's token cache (read and tokenized once per run)."""
        return self.path("cache", "pool")

    def target_cache(self, target: str, kind: str) -> Path:
        """A target's validation set tokenized as `kind` (preference, preference_sft)."""
        return self.target(target) / "cache" / kind

    @property
    def compare_md(self) -> Path:
        return self.path(COMPARE_MD)

    @property
    def compare_json(self) -> Path:
        return self.path(COMPARE_JSON)

    # ---- per target -------------------------------------------------------------------------------
    def target(self, name: str) -> Path:
        return self.path("targets", name)

    def target_features(self, target: str, side: str, epoch: int | None = None) -> Path:
        base = self.target(target) / "features" / side
        return base if epoch is None else base / epoch_dirname(epoch)

    def reference(self, target: str, side: str) -> Path:
        """The DPO reference's log-probs of the target's validation pairs (once for every checkpoint)."""
        return self.target(target) / "reference" / side

    def means(self, target: str, side: str, epoch: int) -> Path:
        return self.target(target) / "means" / side / epoch_dirname(epoch)

    def exact(self, target: str, epoch: int) -> Path:
        return self.target(target) / "exact" / epoch_dirname(epoch)

    def selection(self, target: str, method: str) -> Path:
        return self.target(target) / "selection" / method

    def selected(self, target: str, method: str) -> Path:
        return self.selection(target, method) / SELECTED_FILE

    def scores(self, target: str, method: str) -> Path:
        return self.selection(target, method) / SCORES_DIR

    def finetune(self, target: str, method: str) -> Path:
        return self.target(target) / "finetune" / method

    def finetune_checkpoints(self, target: str, method: str) -> Path:
        return self.finetune(target, method) / CHECKPOINTS_DIR

    def evaluation(self, target: str, method: str) -> Path:
        return self.target(target) / "evaluation" / f"{method}.json"

    def judgements(self, target: str, method: str) -> Path:
        """Every prompt, answer and verdict of the judge (JSONL) beside the evaluation."""
        return self.target(target) / "evaluation" / f"{method}.judgements.jsonl"
