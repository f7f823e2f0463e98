"""Every input of a run checked before any stage starts: all problems at once, with file:line and the fix.

A typo in a validation file, a ROSE file without `shots_per_task`, a test set that needs a judge, a model
that cannot be found or an output folder that cannot be written would otherwise surface hours into a run,
after the warmup and a full gradient pass. Reading is parsing only (no tokenizer): a 270K-row pool takes
seconds.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

from dataclasses import replace

from rose_pl.config import PreferenceArgs, RunArgs
from rose_pl.errors import ConfigError, DataFormatError, RoseError
from rose_pl.hub import check_model_source

log = logging.getLogger(__name__)


def _messages(error: RoseError) -> list[str]:
    return list(error.problems) if isinstance(error, ConfigError) else [str(error)]


def _collect(problems: list[str], what: str, check: Callable[[], object]) -> None:
    try:
        check()
    except RoseError as e:
        problems += [f"{what}: {m}" for m in _messages(e)]


def check_writable(folder: str) -> None:
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test."):
            pass
    except OSError as e:
        raise ConfigError(f"{folder} cannot be written ({e.strerror or e})") from None


def is_run_folder(path: Path) -> bool:
    """Whether `path` was made by `rose-pl run` (stage records, its lock file, or its run.json)."""
    from rose_pl.layout import RunLayout
    from rose_pl.pipeline.stages import RunManifest

    layout = RunLayout(path)
    return layout.stages.is_dir() or layout.lock.exists() or RunManifest(path).is_rose_pl()


def check_output_dir(folder: str, exists: str = "error") -> None:
    """The output folder must be new, empty, or a run folder of rose-pl; anything else is refused unchanged unless
    `exists == "ok"`. Then it must be writable."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{folder} is a file, not a folder")
    if path.is_dir() and exists != "ok" and any(path.iterdir()) and not is_run_folder(path):
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise ConfigError(f"{folder} is not empty and is not a rose-pl run folder (it holds {shown}); nothing in it "
                          "was changed. Give a new or empty folder, or add `--output_dir_exists ok` to write the run "
                          "into it anyway (files with the run's names, e.g. run.json and compare.md, are replaced)")
    check_writable(folder)


def test_set_reading(path: str, preference: PreferenceArgs) -> tuple:
    """(shots_per_task, preference settings) to read a preference test file with: one task for a ROSE JSON object
    (a test set's tasks do not change its metrics), and all_pairs only where the file's form has pairs to expand."""
    from rose_pl.data.formats import is_rose_object

    if is_rose_object(path):
        return "all", preference
    return None, replace(preference, all_pairs=False) if preference.all_pairs else preference


POOL_SAMPLE = 1000
"""Pool rows validated up front (all of them are, by the run's first stage, which reads and tokenizes the pool)."""


def check_pool(data) -> None:
    """The pool opens, has rows, and its first POOL_SAMPLE rows are valid instruction rows."""
    from rose_pl.config import dataset_spec
    from rose_pl.data.formats import iter_instructions

    problems = dataset_spec(data).validate()
    if problems:
        raise ConfigError(problems)
    first = next(iter_instructions(data, size=POOL_SAMPLE), None)
    if not first:
        raise DataFormatError(dataset_spec(data).name, None, "no rows")


def check_run_inputs(args: RunArgs) -> None:
    """Check the pool (its first rows; the cache stage reads all of them first), every target's validation and test
    set, the model and the output folder; raise one ConfigError listing every problem."""
    from rose_pl.data.formats import kind_of_test_set, read_golden_answers, read_preferences
    from rose_pl.evaluation.evaluate import check_evaluation

    start = time.perf_counter()
    problems: list[str] = []
    _collect(problems, "pool", lambda: check_pool(args.pool))
    for name, target in args.all_targets().items():
        pref = args.preference_of(target)
        _collect(problems, f"targets.{name}.validation", lambda t=target, p=pref: read_preferences(
            t.validation, t.shots_per_task, p.all_pairs, on_invalid_pair=p.on_invalid_pair))
        if target.test is None:
            continue

        def test(t=target, p=pref):
            kind = kind_of_test_set(t.test)
            e = args.evaluation
            check_evaluation(kind, t.test, e.judge, e.prompt_format, e.batch_size, args.data.max_seq_length)
            if kind == "golden":
                read_golden_answers(t.test)
            else:
                shots, p = test_set_reading(t.test, p)
                read_preferences(t.test, shots, p.all_pairs, on_invalid_pair=p.on_invalid_pair)

        _collect(problems, f"targets.{name}.test", test)
    _collect(problems, "model", lambda: check_model_source(args.model))
    _collect(problems, "output_dir", lambda: check_output_dir(args.output_dir, args.output_dir_exists))
    if problems:
        raise ConfigError(problems)
    log.info("inputs checked in %.1f s", time.perf_counter() - start)
