"""Command line: `python -m rose_pl {fit,validate,predict,score,select,evaluate,run} --config FILE.yaml`.

fit/validate/predict are LightningCLI: the model, data, trainer (devices, strategy, num_nodes) and
callbacks all come from YAML, so DDP, FSDP or several nodes is a config change. The other subcommands are
plain functions parsed by jsonargparse from the same kind of YAML.
"""

from __future__ import annotations

import logging
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _extra_commands() -> dict:
    from rose_pl import commands

    return {
        "score": commands.score,
        "select": commands.select,
        "evaluate": commands.evaluate,
        "run": commands.run_argv,
        "prepare-model": commands.prepare_model,
    }


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """LightningCLI over any LightningModule / LightningDataModule named by `class_path` in the YAML."""
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    # The pipeline calls stages in-process with explicit args while sys.argv holds `run ...`.
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
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = _extra_commands()
    if argv and argv[0] == "run":
        extra["run"](argv[1:])
        return
    if argv and argv[0] in extra:
        from jsonargparse import auto_cli

        auto_cli(extra[argv[0]], args=argv[1:], as_positional=False)
        return
    if argv and argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        sys.exit(f"rose_pl: unknown command {argv[0]!r}; use one of {', '.join(LIGHTNING_COMMANDS + tuple(extra))}")
    lightning_cli(argv)


if __name__ == "__main__":
    main()
