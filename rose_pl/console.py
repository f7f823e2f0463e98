"""What a person sees: one log line per record, no known third-party noise, and errors as short readable blocks.

- Logging: one handler on the root logger (Lightning's own handlers are removed, so a line never appears
  twice), at the level `-v`/`-q`/`--log_level` asks for. Lightning's tips and known deprecation warnings of
  the libraries underneath are filtered from the console, narrowly, by message.
- Stage logs: `stage_log(path)` adds a file handler that keeps everything, unfiltered, for the duration of a
  stage; a subprocess stage finds its file in `ROSE_PL_LOG_FILE`.
- Errors: a `RoseError` (config, data, checkpoint, store, judge) prints what went wrong, where and how to fix it,
  and exits with code 2, without a traceback unless `--debug` or `ROSE_PL_DEBUG=1`. Other exceptions keep theirs.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rose_pl.errors import RoseError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
DEBUG_ENV = "ROSE_PL_DEBUG"
LEVEL_ENV = "ROSE_PL_LOG_LEVEL"
LOG_FILE_ENV = "ROSE_PL_LOG_FILE"
EXIT_ROSE_ERROR = 2

NOISE = [re.compile(p) for p in (
    r"💡 Tip",  # Lightning's advertisements
    r"litlogger|litmodels",
    r"is_gradient_checkpointing",  # transformers deprecation, raised inside peft
    r"LeafSpec",  # torch.utils._pytree deprecation, raised inside Lightning
    r"Total length of `\w+` across ranks is zero",  # Lightning, predict without returned predictions
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"does not have many workers which may be a bottleneck",
    r"LightningCLI's args parameter is intended",
    r"JsonargparseDeprecationWarning",  # jsonargparse deprecations triggered inside Lightning's CLI
    r"deprecated in v4\.\d+\.\d+ and will be removed in v5\.0\.0",
    r"Checkpoint directory .* exists and is not empty",
    r"`gradient_checkpointing_enable` is deprecated",
    r"You passed in a `val_dataloader` but have no `validation_step`",
    r"Missing logger folder",
    r"The '\w+_dataloader' does not have many workers",
    r"Found keys that are in the model state dict but not in the checkpoint",
    r"You are using a custom batch sampler `TokenBudgetBatches` for prediction",  # it is sharded by rank already
)]
"""Known messages of third-party libraries that tell a rose_pl user nothing; kept in the stage log files."""

QUIET_LOGGERS = ("httpx", "httpcore", "openai", "urllib3", "filelock", "fsspec", "matplotlib")
"""Chatty libraries held at WARNING on the console."""


class NoiseFilter(logging.Filter):
    """Drops records whose message matches one of `NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(p.search(message) for p in NOISE)


def configure_logging(level: str | int = "INFO") -> None:
    """One console handler on the root logger, at `level`, with the noise filter; warnings go through logging."""
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            raise ValueError(f"unknown log level {level!r}")
    # Weight-loading bars of transformers / huggingface_hub say nothing in a log; read when they are imported.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import lightning  # noqa: F401  (its import adds a console handler of its own, removed below)

    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_rose_pl_console", False):
            root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console._rose_pl_console = True  # type: ignore[attr-defined]
    console.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    console.addFilter(NoiseFilter())
    console.setLevel(level)
    root.addHandler(console)
    root.setLevel(min(level, logging.INFO))  # the stage log files keep INFO even when the console is quiet
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):  # Lightning adds its own handler: every line would show twice
            lib.removeHandler(handler)
        lib.propagate = True
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)
    warnings.simplefilter("default")  # each distinct warning once per place, through the filtered handler
    if os.environ.get(LOG_FILE_ENV):
        _add_file_handler(Path(os.environ[LOG_FILE_ENV]))


def _add_file_handler(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))  # with the full date: a log file outlives the day
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    return handler


@contextmanager
def stage_log(path: Path) -> Iterator[None]:
    """Everything logged during the block (unfiltered) also goes to `path`; subprocesses append to it too."""
    handler = _add_file_handler(path)
    root = logging.getLogger()
    level = root.level
    root.setLevel(min(level, logging.INFO))  # the file keeps INFO; console handlers keep their own levels
    previous = os.environ.get(LOG_FILE_ENV)
    os.environ[LOG_FILE_ENV] = str(path)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
        if previous is None:
            os.environ.pop(LOG_FILE_ENV, None)
        else:
            os.environ[LOG_FILE_ENV] = previous


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def format_error(error: RoseError) -> str:
    """The error as a short block: its kind, then its message (which names the file:line or key and the fix)."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    head = f"rose-pl: {type(error).__name__}: {lines[0]}"
    body = [f"  {line}" if not line.startswith("  ") else line for line in lines[1:]]
    return "\n".join([head, *body, f"  (for the traceback, rerun with --debug or {DEBUG_ENV}=1)"])


def report_error(error: BaseException, debug: bool = False) -> int:
    """Print a RoseError as a short block (or with its traceback when debugging) and return the exit code."""
    if debug_enabled(debug):
        import traceback

        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    else:
        print(format_error(error), file=sys.stderr)
    return EXIT_ROSE_ERROR
