"""Every input of a run checked before any stage starts: all problems at once, with file:line and the fix.

A typo in a validation file, a ROSE file without `shots_per_task`, a test set that needs a judge, a model
that cannot be found or an output folder that cannot be written would otherwise surface hours into a run,
after the warmup and a full gradient pass. Reading is parsing only (no tokenizer): a 270K-row pool takes
seconds.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from rose_pl.config import RunArgs
from rose_pl.errors import ConfigError, RoseError

log = logging.getLogger(__name__)


def _messages(error: RoseError) -> list[str]:
    return list(error.problems) if isinstance(error, ConfigError) else [str(error)]


def _collect(problems: list[str], what: str, check: Callable[[], object]) -> None:
    try:
        check()
    except RoseError as e:
        problems += [f"{what}: {m}" for m in _messages(e)]


def check_model(name: str) -> None:
    """The model can be found: the embedded package installed, a local folder with config.json, or a hub id
    (which, offline, must be in the local Hugging Face cache)."""
    from rose_pl.hub import _EMBEDDED, _embedded_gguf

    if name in _EMBEDDED or name.startswith("embedded:"):
        if name not in _EMBEDDED:
            raise ConfigError(f"unknown embedded model {name!r}; known: {sorted(_EMBEDDED)}")
        _embedded_gguf(name)
        return
    path = Path(name)
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path.expanduser() / "config.json").is_file():
            raise ConfigError(f"{name} is not a model folder (no config.json)")
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ConfigError(f"{name!r} is not in the local Hugging Face cache and the hub is off (HF_HUB_OFFLINE=1)")


def check_writable(folder: str) -> None:
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test."):
            pass
    except OSError as e:
        raise ConfigError(f"{folder} cannot be written ({e.strerror or e})") from None


def preference_test_tasks(path: str, shots_per_task):
    """shots_per_task for reading a preference test file: the target's, or one task for a ROSE JSON object
    (a test set's tasks do not change its metrics)."""
    from rose_pl.data.formats import is_rose_object

    if not is_rose_object(path):
        return None
    return shots_per_task if shots_per_task is not None else "all"


def check_run_inputs(args: RunArgs) -> None:
    """Read and validate the pool, every target's validation and test file, the model and the output folder;
    raise one ConfigError listing every problem."""
    from rose_pl.data.formats import kind_of_test_set, read_golden_answers, read_instructions, read_preferences

    start = time.perf_counter()
    problems: list[str] = []
    _collect(problems, "pool", lambda: read_instructions(args.pool, args.data.duplicate_ids))
    for name, target in args.all_targets().items():
        pref = args.preference_of(target)
        _collect(problems, f"targets.{name}.validation", lambda t=target, p=pref: read_preferences(
            t.validation, t.shots_per_task, p.all_pairs, on_invalid_pair=p.on_invalid_pair))
        if target.test is None:
            continue

        def test(t=target, p=pref, name=name):
            if kind_of_test_set(t.test) == "golden":
                read_golden_answers(t.test)
                if args.evaluation.judge is None:
                    raise ConfigError(f"{t.test} holds prompts with golden answers: evaluating them needs a judge "
                                      "(set evaluation.judge: {base_url: ..., model: ...}) or no test set")
            else:
                read_preferences(t.test, preference_test_tasks(t.test, t.shots_per_task), p.all_pairs,
                                 on_invalid_pair=p.on_invalid_pair)

        _collect(problems, f"targets.{name}.test", test)
    _collect(problems, "model", lambda: check_model(args.model))
    _collect(problems, "output_dir", lambda: check_writable(args.output_dir))
    if problems:
        raise ConfigError(problems)
    log.info("inputs checked in %.1f s", time.perf_counter() - start)
