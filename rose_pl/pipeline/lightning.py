"""Running a Lightning stage: LightningCLI over any LightningModule / DataModule named by class path.

The same YAML runs in this process (one device) or in a `python -m rose_pl fit|predict --config` subprocess
(several devices or nodes: Lightning's launcher then starts the ranks). `lightning_cli` is also what the
command line's fit/validate/test/predict use.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import yaml

from rose_pl.errors import RoseError

log = logging.getLogger(__name__)

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class StageFailedError(RoseError):
    """A stage run as a subprocess exited with an error (its own output says why)."""


OUTPUT_KEYS = ("output_dir", "dirpath")
"""init_args of callbacks that name where a stage writes (FeatureStoreWriter, TaskMeanWriter, WarmupCheckpoint...)."""


def _output_folder(trainer_cfg) -> Path | None:
    """Where a stage's callbacks write (the parent of the first named output folder), for Lightning's own files."""
    for callback in trainer_cfg.get("callbacks") or []:
        init = callback.get("init_args") if isinstance(callback, dict) else getattr(callback, "init_args", None)
        init = dict(init or {}) if not isinstance(init, dict) else init
        for key in OUTPUT_KEYS:
            value = init.get(key)
            if isinstance(value, str) and value:
                return Path(value.split("{", 1)[0]).parent if "{" in value else Path(value).parent
        targets = init.get("targets")
        if isinstance(targets, list) and targets:
            first = targets[0] if isinstance(targets[0], dict) else vars(targets[0])
            value = first.get("output_dir")
            if isinstance(value, str) and value:
                return Path(value.split("{", 1)[0]).parent
    return None


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """LightningCLI over any LightningModule / LightningDataModule named by `class_path` in the YAML.

    Nothing is written into the working directory unless the config says so: with no `trainer.default_root_dir`,
    Lightning's own files (its config.yaml, default logs and checkpoints) go beside the stage's outputs (the folder
    of the first callback's `output_dir` / `dirpath`), and a config.yaml is never written over one of the user's.
    """
    import os
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    class SaveConfigBesideOutputs(SaveConfigCallback):
        def setup(self, trainer, pl_module, stage: str) -> None:
            if Path(trainer.log_dir or os.getcwd()).resolve() == Path.cwd().resolve():
                log.debug("not saving the resolved config: it would go into the working directory")
                return
            super().setup(trainer, pl_module, stage)

    class CLI(LightningCLI):
        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            trainer = cfg.get("trainer")
            if trainer is not None and not trainer.get("default_root_dir"):
                folder = _output_folder(trainer)
                if folder is not None:
                    trainer["default_root_dir"] = str(folder)

    # A pipeline calls stages in-process with explicit args while sys.argv holds `run ...`.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    return CLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigBesideOutputs,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
        parser_kwargs={"prog": "rose-pl"},
    )


def run_lightning(command: str, config: dict, config_file: Path, *, subprocess_run: bool = False,
                  resume: Path | None = None, nodes=None, everywhere: bool = False, stage: str = "") -> None:
    """Write `config` to `config_file`, then run `rose-pl <command> --config <file>`: in this process, as a
    subprocess (several devices: Lightning's launcher starts the ranks), or, with `nodes` (a NodeGroup, several
    nodes), on every node at once (`everywhere`) or as a subprocess of this node only."""
    import os

    from rose_pl.console import LOG_FILE_ENV
    from rose_pl.files import atomic_write_text
    from rose_pl.pipeline.nodes import stage_env

    if command not in LIGHTNING_COMMANDS:
        raise ValueError(f"unknown Lightning command {command!r}")
    atomic_write_text(config_file, yaml.safe_dump(config, sort_keys=False))
    args = [command, "--config", str(config_file)]
    if resume is not None and resume.is_file():
        log.info("resuming from %s", resume)
        args += ["--ckpt_path", str(resume)]
    if nodes is not None and everywhere:
        nodes.run_everywhere(stage, args, os.environ.get(LOG_FILE_ENV))
    elif subprocess_run or nodes is not None:
        # The launcher's variables (srun, torchrun) are removed: Lightning then starts the stage's ranks itself.
        result = subprocess.run([sys.executable, "-m", "rose_pl", *args], env=stage_env())
        if result.returncode != 0:
            raise StageFailedError(f"`rose-pl {' '.join(args)}` exited with code {result.returncode} (its output "
                                   "above says why); rerun the same command to resume")
    else:
        try:
            lightning_cli(args)
        finally:
            release_memory()


def release_memory() -> None:
    """Give the memory of a stage that ran in this process back to the system before the next one.

    Freed tensors stay in the C allocator's arenas: on glibc a `run` on SmolLM2-135M (LoRA r 128) held 3.3 GB after
    one validation-means stage and 9.7 GB after a dozen, while its two-rank pool pass needed the memory, and the OOM
    killer took it. Trimming after each stage brings it back to about 1.3 GB."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass
