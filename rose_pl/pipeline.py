"""`python -m rose_pl run`: warmup -> features per checkpoint -> scores -> selection -> fine-tune -> evaluate.

One output folder per run. Every Lightning stage gets a generated LightningCLI YAML under
`<output_dir>/configs/` (so any stage can be rerun alone with `python -m rose_pl fit|predict --config ...`)
and runs in this process on one device, or as a `python -m rose_pl` subprocess when the trainer asks for
several devices or nodes (Lightning's DDP launcher then starts the ranks). Bookkeeping (skip, resume,
stale detection) is in `stages.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from rose_pl.config import LoRAArgs, OptimArgs
from rose_pl.errors import ConfigError
from rose_pl.hub import DEFAULT_MODEL
from rose_pl.stages import OnChange, Stage, run_stages

log = logging.getLogger(__name__)

METHODS = ("rose", "less", "random", "bm25", "rds")
Method = Literal["rose", "less", "random", "bm25", "rds"]


@dataclass
class TrainerArgs:
    """Hardware for every Lightning stage; nothing about devices lives anywhere else."""

    accelerator: str = "auto"
    """cpu, gpu, auto."""
    devices: int | str = 1
    """Devices per node (an int, 'auto', or a list as a string)."""
    strategy: str = "auto"
    """auto, ddp, fsdp (GPU), deepspeed..."""
    num_nodes: int = 1
    """Number of nodes (launched by your cluster's launcher, e.g. srun / torchrun)."""
    precision: str = "32-true"
    """32-true, bf16-mixed, bf16-true..."""

    def multi_process(self) -> bool:
        """Several processes are launched by Lightning itself: run such stages as subprocesses."""
        return self.num_nodes > 1 or str(self.devices) != "1"


@dataclass
class FitArgs:
    """A LoRA training run (the warmup and the final fine-tune share these)."""

    seed: int = 0
    """Seed of training (and of the warmup subset)."""
    epochs: int = 4
    """Epochs (for the warmup: the number of checkpoints used for scoring)."""
    batch_size: int = 1
    """Per-device batch size."""
    accumulate_grad_batches: int = 1
    """Gradient accumulation steps."""
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)


@dataclass
class WarmupArgs(FitArgs):
    """Warmup training on a random slice of the pool (ROSE step 1)."""

    fraction: float = 0.05
    """Fraction of the pool used for warmup."""


@dataclass
class FeatureArgs:
    """Gradient features (ROSE steps 2-3)."""

    projector: Literal["countsketch", "gaussian", "identity", "trak"] = "countsketch"
    """Random projection kind (countsketch needs no compiled code; trak needs fast_jl + CUDA)."""
    dim: int = 8192
    """Projected dimension."""
    seed: int = 0
    """Projection seed."""
    batch_size: int = 8
    """Per-device batch size of the gradient stage."""
    store_dtype: str = "float16"
    """dtype of stored features."""
    beta: float = 0.1
    """DPO temperature (recorded; it does not change normalized features)."""
    dpo_reference: Literal["adapter_disabled", "none"] = "adapter_disabled"
    """Reference model of the DPO gradient: the base model (adapter disabled), or skipped (same features)."""
    compute_dtype: str | None = None
    """dtype of per-sample einsums (None = float32)."""
    dtype: str = "float32"
    """Weights dtype of the model during feature extraction."""


@dataclass
class SelectionArgs:
    """Selection budget (ROSE step 5)."""

    fraction: float | None = 0.05
    """Fraction of the pool to keep (ignored when k is set)."""
    k: int | None = None
    """Keep exactly k examples."""
    seed: int = 0
    """Seed of the tie-breaking order (and of the random baseline)."""


@dataclass
class FinetuneArgs(FitArgs):
    """Final fine-tune on each selection (ROSE step 6)."""

    methods: list[str] = field(default_factory=lambda: ["rose", "less", "random"])
    """Which selections to fine-tune on."""


@dataclass
class JudgeArgs:
    """Optional LLM judge for win rates (any OpenAI-compatible endpoint)."""

    base_url: str
    """e.g. http://localhost:8000/v1"""
    model: str
    """Judge model name at that endpoint."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the API key (None: no key)."""
    max_new_tokens: int = 256
    """Generation length of the evaluated model's responses."""
    max_prompts: int | None = None
    """Judge only the first n test prompts."""


@dataclass
class EvalArgs:
    """Evaluation on held-out preference pairs."""

    beta: float = 0.1
    """beta of the DPO implicit reward."""
    batch_size: int = 8
    judge: JudgeArgs | None = None
    """LLM judge; None skips the win rate."""


def file_digest(path: str | Path) -> str:
    """Content hash of an input file: a changed file changes every stage that reads it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class Pipeline:
    """Builds the stage list of one run from its arguments and runs it."""

    def __init__(self, a: "RunArgs"):
        self.a = a
        self.root = Path(a.output_dir)

    # ---- paths: the one place that derives them ----------------------------------------------------
    def p(self, *parts) -> Path:
        return self.root.joinpath(*map(str, parts))

    def warmup_dir(self) -> Path:
        return self.p("warmup")

    def feature_dir(self, side: str, epoch: int | None = None) -> Path:
        return self.p("features", side) if epoch is None else self.p("features", side, f"epoch-{epoch}")

    def selection_dir(self, method: str) -> Path:
        return self.p("selection", method)

    def finetune_dir(self, method: str) -> Path:
        return self.p("finetune", method)

    def eval_file(self, method: str) -> Path:
        return self.p("evaluation", f"{method}.json")

    # ---- Lightning stage configs -------------------------------------------------------------------
    def _trainer(self, stage_dir: Path, **extra) -> dict:
        t = self.a.trainer
        cfg = {
            "accelerator": t.accelerator,
            "devices": t.devices,
            "strategy": t.strategy,
            "num_nodes": t.num_nodes,
            "precision": t.precision,
            "default_root_dir": str(stage_dir),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(stage_dir), "name": "logs"}},
            "enable_model_summary": False,
        }
        cfg.update(extra)
        return cfg

    def _fit_config(self, out: Path, train_file: str, args, subset_fraction: float | None, save_optimizer: bool) -> dict:
        a = self.a
        return {
            "seed_everything": args.seed,
            "trainer": self._trainer(
                out,
                max_epochs=args.epochs,
                accumulate_grad_batches=args.accumulate_grad_batches,
                callbacks=[
                    {"class_path": "rose_pl.checkpoints.WarmupCheckpoint", "init_args": {"dirpath": str(out / "checkpoints"), "save_optimizer": save_optimizer}},
                    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(out / "resume"), "save_last": True, "save_top_k": 1, "every_n_train_steps": 50}},
                ],
            ),
            "model": {
                "class_path": "rose_pl.model.LoRACausalLM",
                "init_args": {"model": a.model, "lora": asdict(args.lora), "optim": asdict(args.optim)},
            },
            "data": {
                "class_path": "rose_pl.data.datamodule.SFTDataModule",
                "init_args": {
                    "train_file": train_file,
                    "tokenizer": a.model,
                    "max_seq_length": a.max_seq_length,
                    "batch_size": args.batch_size,
                    "subset_fraction": subset_fraction,
                    "subset_seed": args.seed,
                    "shuffle_seed": args.seed,
                },
            },
        }

    def _predict_config(self, out: Path, checkpoint: Path, data_file: str, kind: str, mode: str) -> dict:
        a, f = self.a, self.a.features
        callbacks = []
        if mode != "hidden":
            callbacks.append({"class_path": "rose_pl.projection.ProjectionCallback", "init_args": {"kind": f.projector, "dim": f.dim, "seed": f.seed}})
        callbacks.append({"class_path": "rose_pl.store.FeatureStoreWriter", "init_args": {"output_dir": str(out), "dtype": f.store_dtype}})
        return {
            "trainer": self._trainer(out, inference_mode=False, callbacks=callbacks, logger=False),
            "model": {
                "class_path": "rose_pl.gradient_module.GradientFeatureModule",
                "init_args": {
                    "checkpoint": str(checkpoint),
                    "mode": mode,
                    "model": a.model,
                    "beta": f.beta,
                    "dtype": f.dtype,
                    "compute_dtype": f.compute_dtype,
                },
            },
            "data": {
                "class_path": "rose_pl.data.datamodule.FeatureDataModule",
                "init_args": {
                    "data_file": data_file,
                    "tokenizer": a.model,
                    "kind": kind,
                    "max_seq_length": a.max_seq_length,
                    "batch_size": f.batch_size,
                    "shots_per_task": a.shots_per_task if kind != "sft" else None,
                },
            },
            "return_predictions": False,
        }

    def _lightning(self, command: str, name: str, config: dict, resume_ckpt: Path | None = None) -> None:
        cfg_file = self.p("configs", name.replace("/", "__") + ".yaml")
        cfg_file.parent.mkdir(parents=True, exist_ok=True)
        cfg_file.write_text(yaml.safe_dump(config, sort_keys=False))
        args = [command, "--config", str(cfg_file)]
        if resume_ckpt is not None and resume_ckpt.is_file():
            log.info("resuming %s from %s", name, resume_ckpt)
            args += ["--ckpt_path", str(resume_ckpt)]
        if self.a.trainer.multi_process():
            subprocess.run([sys.executable, "-m", "rose_pl", *args], check=True)
        else:
            from rose_pl.cli import lightning_cli

            lightning_cli(args)

    # ---- stages ------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        a = self.a
        digests = {"pool": file_digest(a.pool), "validation": file_digest(a.validation)}
        if a.test:
            digests["test"] = file_digest(a.test)
        methods = list(a.methods)
        epochs = list(range(1, a.warmup.epochs + 1))
        stages: list[Stage] = []

        warm_cfg = self._fit_config(self.warmup_dir(), a.pool, a.warmup, a.warmup.fraction, save_optimizer=True)
        stages.append(Stage(
            "warmup", {"yaml": warm_cfg, "data": digests["pool"]},
            lambda: self._lightning("fit", "warmup", warm_cfg, self.warmup_dir() / "resume" / "last.ckpt"),
            outputs=["warmup"],
        ))

        def feature_stage(side: str, epoch: int | None, data_file: str, kind: str, mode: str) -> None:
            out = self.feature_dir(side, epoch)
            ckpt = self.warmup_dir() / "checkpoints" / f"epoch-{epoch or a.warmup.epochs}"
            cfg = self._predict_config(out, ckpt, data_file, kind, mode)
            name = f"features/{side}" + (f"/epoch-{epoch}" if epoch else "")
            digest = digests["pool"] if data_file == a.pool else digests["validation"]
            stages.append(Stage(name, {"yaml": cfg, "data": digest}, lambda: self._lightning("predict", name, cfg),
                                depends=["warmup"], outputs=[str(out.relative_to(self.root))]))
            return name

        feature_deps: dict[str, list[str]] = {m: [] for m in methods}
        if "rose" in methods or "less" in methods:
            for e in epochs:
                train = feature_stage("train", e, a.pool, "sft", "sft_adam")
                if "rose" in methods:
                    mode = "dpo" if a.features.dpo_reference == "adapter_disabled" else "dpo_noref"
                    feature_deps["rose"] += [train, feature_stage("val_dpo", e, a.validation, "preference", mode)]
                if "less" in methods:
                    feature_deps["less"] += [train, feature_stage("val_sft", e, a.validation, "preference_sft", "sft")]
        if "rds" in methods:
            feature_deps["rds"] += [
                feature_stage("rds_train", None, a.pool, "sft", "hidden"),
                feature_stage("rds_val", None, a.validation, "preference_sft", "hidden"),
            ]

        for m in methods:
            sel_cfg = {"method": m, "selection": asdict(a.selection), "data": digests, "shots": a.shots_per_task}
            stages.append(Stage(f"selection/{m}", sel_cfg, lambda m=m: self.select_method(m),
                                depends=["warmup", *feature_deps[m]] if m in ("rose", "less", "rds") else [],
                                outputs=[str(self.selection_dir(m).relative_to(self.root))]))

        for m in a.finetune.methods:
            if m not in methods:
                raise ConfigError(f"finetune.methods: {m!r} is not among methods {methods}")
            out = self.finetune_dir(m)
            ft_cfg = self._fit_config(out, str(self.selection_dir(m) / "selected.jsonl"), a.finetune, None, save_optimizer=False)
            stages.append(Stage(f"finetune/{m}", {"yaml": ft_cfg}, lambda out=out, m=m, cfg=ft_cfg: self._lightning("fit", f"finetune/{m}", cfg, out / "resume" / "last.ckpt"),
                                depends=[f"selection/{m}"], outputs=[str(out.relative_to(self.root))]))

        if a.test:
            for m in ["base", *a.finetune.methods]:
                deps = [] if m == "base" else [f"finetune/{m}"]
                stages.append(Stage(f"evaluation/{m}", {"eval": asdict(a.evaluation), "test": digests["test"], "model": a.model,
                                                          "max_seq_length": a.max_seq_length},
                                    lambda m=m: self.evaluate_method(m), depends=deps,
                                    outputs=[str(self.eval_file(m).relative_to(self.root))]))
        all_names = [s.name for s in stages]
        stages.append(Stage("compare", {"methods": methods}, self.compare, depends=all_names, outputs=["compare.md", "compare.json"]))
        return stages

    # ---- in-process stages -------------------------------------------------------------------------
    def select_method(self, method: str) -> None:
        from rose_pl.scoring import score_method, select_and_report

        result, pool = score_method(self, method)
        select_and_report(self, method, result, pool)

    def evaluate_method(self, method: str) -> None:
        from rose_pl.commands import evaluate_adapter

        adapter = None
        if method != "base":
            from rose_pl.checkpoints import Manifest

            adapter = str(Manifest.load(self.finetune_dir(method) / "checkpoints").checkpoints[-1].adapter_dir)
        e = self.a.evaluation
        evaluate_adapter(
            model=self.a.model, adapter=adapter, data=self.a.test, output=str(self.eval_file(method)),
            beta=e.beta, batch_size=e.batch_size, max_seq_length=self.a.max_seq_length, judge=e.judge,
            label=method,
        )

    def compare(self) -> None:
        from rose_pl.scoring import write_comparison

        write_comparison(self)

    def run(self) -> dict[str, str]:
        return run_stages(self.root, self.stages(), on_change=self.a.on_change)


@dataclass
class RunArgs:
    """Everything one ROSE run needs."""

    output_dir: str = "runs/demo"
    """Output folder of the run (one per run; holds run.json, the source of truth)."""
    model: str = DEFAULT_MODEL
    """Base model: hub id, local folder, or embedded:smollm2-135m-instruct."""
    pool: str = "data/pool.jsonl"
    """Instruction pool (JSONL/JSON, LESS/ROSE processed format or prompt/completion)."""
    validation: str = "data/validation.jsonl"
    """Few-shot preference validation set (ROSE JSON or JSONL with task ids)."""
    test: str | None = "data/test.jsonl"
    """Held-out preference pairs for evaluation (None: no evaluation)."""
    shots_per_task: int | None = None
    """ROSE JSON only: row i belongs to task i // shots_per_task."""
    max_seq_length: int = 2048
    """Tokens per example after truncation."""
    methods: list[str] = field(default_factory=lambda: ["rose", "less", "random", "bm25", "rds"])
    """Selection methods to run side by side."""
    warmup: WarmupArgs = field(default_factory=WarmupArgs)
    features: FeatureArgs = field(default_factory=FeatureArgs)
    selection: SelectionArgs = field(default_factory=SelectionArgs)
    finetune: FinetuneArgs = field(default_factory=FinetuneArgs)
    evaluation: EvalArgs = field(default_factory=EvalArgs)
    trainer: TrainerArgs = field(default_factory=TrainerArgs)
    on_change: OnChange = "error"
    """What to do when the config changed under finished stages: error, or redo them."""

    def validate(self) -> None:
        problems = []
        for m in self.methods:
            if m not in METHODS:
                problems.append(f"methods: unknown method {m!r} (known: {', '.join(METHODS)})")
        for key in ("pool", "validation", "test"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                problems.append(f"{key}: file {path} does not exist")
        if self.warmup.epochs < 1:
            problems.append("warmup.epochs must be >= 1")
        if not 0 < self.warmup.fraction <= 1:
            problems.append(f"warmup.fraction must be in (0, 1], got {self.warmup.fraction}")
        problems += [f"warmup.{p}" for p in self.warmup.lora.validate() + self.warmup.optim.validate()]
        problems += [f"finetune.{p}" for p in self.finetune.lora.validate() + self.finetune.optim.validate()]
        if problems:
            raise ConfigError(problems)


def run(args: RunArgs) -> dict[str, str]:
    args.validate()
    done = Pipeline(args).run()
    log.info("run complete: %s", json.dumps(done))
    return done
