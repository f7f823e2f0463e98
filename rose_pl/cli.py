"""Command line: `rose-pl COMMAND [options]` (or `python -m rose_pl`).

fit/validate/test/predict are LightningCLI: the model, data, trainer (devices, strategy, num_nodes) and
callbacks all come from YAML, so DDP, FSDP or several nodes is a config change. run/score/select/evaluate/
prepare-model are typed functions parsed by jsonargparse from the same kind of YAML. Global options (before
the command) set the log level and whether errors show their traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rose_pl import __version__
from rose_pl.console import configure_logging, report_error
from rose_pl.errors import RoseError

PROG = "rose-pl"

COMMANDS = {
    "run": "the whole pipeline, one output folder: warmup, gradients, scores, selection, fine-tune, evaluation, "
           "per target (resumes, skips what is done)",
    "fit": "LightningCLI fit: train a LightningModule from YAML (the warmup, a fine-tune)",
    "validate": "LightningCLI validate",
    "test": "LightningCLI test",
    "predict": "LightningCLI predict: gradient features, task-mean gradients or exact scores of one checkpoint",
    "score": "ROSE Eq. 7 scores from feature stores (projected) or exact score stores, max over tasks",
    "select": "the top of the pool by score, written in the pool's own format, with a report",
    "evaluate": "a base model or fine-tuned adapter on a test set (preference pairs or prompts with golden answers)",
    "prepare-model": "convert the embedded default model once and print its folder",
}


def _parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    epilog = "commands:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    epilog += f"\n\nEvery option of a command: {PROG} COMMAND --help. Example: {PROG} run --config configs/rose.yaml"
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        description="Reward-oriented data selection (ROSE) for LLM instruction tuning, on PyTorch Lightning.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", action="store_const", dest="log_level", const="DEBUG",
                       help="log everything (DEBUG)")
    level.add_argument("-q", "--quiet", action="store_const", dest="log_level", const="WARNING",
                       help="log warnings and errors only")
    level.add_argument("--log_level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="console log level")
    parser.add_argument("--debug", action="store_true", help="show the traceback of rose-pl's own errors")
    parser.add_argument("command", nargs="?", metavar="COMMAND", help="one of the commands below")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _extra_commands() -> dict:
    from rose_pl import commands

    return {"score": commands.score, "select": commands.select, "evaluate": commands.evaluate,
            "prepare-model": commands.prepare_model}


def dispatch(command: str, args: list[str]):
    """Run one command with its own arguments (no global options)."""
    if command == "run":
        from rose_pl.commands import run_argv

        return run_argv(args)
    from rose_pl.pipeline.lightning import LIGHTNING_COMMANDS, lightning_cli

    if command in LIGHTNING_COMMANDS:
        result = lightning_cli([command, *args])
        close_process_group()
        return result
    extra = _extra_commands()
    from jsonargparse import auto_cli

    return auto_cli(extra[command], args=args, as_positional=False, parser_class=_prog_parser(command))


def close_process_group() -> None:
    """Destroy the process group a finished Lightning command ran in, while the interpreter is whole.

    Lightning registers this at exit for NCCL only. A gloo group (CPU ranks, CPU nodes) left to interpreter shutdown
    can abort the process (SIGABRT, "terminate called without an active exception") after all its work is done,
    at random, and the stage counts as failed. Called on success only: after a failure a peer may be gone and
    the group's teardown could wait for it."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _prog_parser(command: str):
    from jsonargparse import ArgumentParser

    class Parser(ArgumentParser):
        def __init__(self, *a, **kw):
            kw.setdefault("prog", f"{PROG} {command}")
            super().__init__(*a, **kw)

    return Parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        raise SystemExit(0)
    if ns.command not in COMMANDS:
        parser.exit(2, f"{PROG}: unknown command {ns.command!r}; use one of {', '.join(COMMANDS)}\n")
    import os

    from rose_pl.console import DEBUG_ENV, LEVEL_ENV

    level = ns.log_level or os.environ.get(LEVEL_ENV) or "INFO"
    # Stages run as subprocesses (several devices) read the same settings from the environment.
    os.environ[LEVEL_ENV] = level
    if ns.debug:
        os.environ[DEBUG_ENV] = "1"
    configure_logging(level)
    from rose_pl.pipeline.nodes import die_with_parent

    die_with_parent()  # a no-op unless `run` started this process as a stage
    try:
        dispatch(ns.command, ns.args)
    except RoseError as error:
        logging.getLogger(__name__).debug("failed", exc_info=True)
        raise SystemExit(report_error(error)) from None


if __name__ == "__main__":
    main()
