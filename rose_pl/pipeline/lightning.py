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


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """LightningCLI over any LightningModule / LightningDataModule named by `class_path` in the YAML."""
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    # A pipeline calls stages in-process with explicit args while sys.argv holds `run ...`.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    return LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
        parser_kwargs={"prog": "rose-pl"},
    )


def run_lightning(command: str, config: dict, config_file: Path, *, subprocess_run: bool = False,
                  resume: Path | None = None) -> None:
    """Write `config` to `config_file`, then run `rose-pl <command> --config <file>` here or as a subprocess."""
    if command not in LIGHTNING_COMMANDS:
        raise ValueError(f"unknown Lightning command {command!r}")
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    args = [command, "--config", str(config_file)]
    if resume is not None and resume.is_file():
        log.info("resuming from %s", resume)
        args += ["--ckpt_path", str(resume)]
    if subprocess_run:
        result = subprocess.run([sys.executable, "-m", "rose_pl", *args])
        if result.returncode != 0:
            raise StageFailedError(f"`rose-pl {' '.join(args)}` exited with code {result.returncode} (its output "
                                   "above says why); rerun the same command to resume")
    else:
        lightning_cli(args)
