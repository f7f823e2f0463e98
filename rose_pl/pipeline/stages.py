"""Run bookkeeping: a stage graph with fingerprints, a run manifest, skip / resume / stale detection.

Each stage has a name, the stages it depends on, and a JSON-able config. Its fingerprint hashes its
config and its dependencies' fingerprints, so a change upstream changes every fingerprint downstream.
The run manifest (`run.json`) records, per stage, the fingerprint it ran under, whether it finished, how
long it took and what it reported (rows, drops). On a rerun a finished stage with the same fingerprint is
skipped; an unfinished one is run again (the stages themselves resume: Lightning checkpoints, the feature
store's written-rows mask); a finished stage whose fingerprint changed is stale: refused, or redone from
scratch when the user asks.

Stages that share a `group` are run together by one call of the group's action when several of them are
due: e.g. the exact scoring of every new target against one checkpoint is one pass over the pool.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Literal

from rose_pl.errors import StaleOutputError
from rose_pl.files import atomic_write_json
from rose_pl.layout import RUN_MANIFEST

log = logging.getLogger(__name__)

OnChange = Literal["error", "redo"]


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    """One step of a run: `action()` produces everything under `outputs` (paths relative to the run)."""

    name: str
    config: dict
    action: Callable[[], Any] | None = None
    depends: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    group: str | None = None
    """Stages of one group that are due together run in one call of `group_action`."""
    group_action: Callable[[list["Stage"]], Any] | None = None
    report: Callable[[], dict] | None = None
    """Figures of the finished stage (rows, drops...), recorded in run.json."""
    derived: bool = False
    """A cheap summary of other stages (the comparison): redone when what it summarizes changes, never stale."""
    fingerprint: str = ""


class RunManifest:
    """The `run.json` of one output folder: the source of truth for what has been done there."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.file = self.root / RUN_MANIFEST
        self.data = json.loads(self.file.read_text()) if self.file.is_file() else {"stages": {}}
        self.data.setdefault("stages", {})

    def entry(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def mark(self, name: str, fp: str, status: str, **extra) -> None:
        self.data["stages"][name] = {"fingerprint": fp, "status": status, "time": time.time(), **extra}
        self.save()

    def set(self, key: str, value: Any) -> None:
        """A run-level record (e.g. the scoring mode, the summary)."""
        self.data[key] = value
        self.save()

    def save(self) -> None:
        atomic_write_json(self.file, self.data)


def _fingerprints(stages: list[Stage]) -> dict[str, Stage]:
    by_name: dict[str, Stage] = {}
    for stage in stages:
        missing = [d for d in stage.depends if d not in by_name]
        if missing:
            raise ValueError(f"stage {stage.name!r} depends on {missing}, which do not come before it")
        if stage.name in by_name:
            raise ValueError(f"two stages are called {stage.name!r}")
        stage.fingerprint = fingerprint({"config": stage.config, "deps": [by_name[d].fingerprint for d in stage.depends]})
        by_name[stage.name] = stage
    return by_name


def _done(manifest: RunManifest, stage: Stage) -> bool:
    entry = manifest.entry(stage.name)
    return bool(entry) and entry["fingerprint"] == stage.fingerprint and entry["status"] == "complete"


def _clean(root: Path, manifest: RunManifest, stage: Stage) -> None:
    entry = manifest.entry(stage.name)
    if entry and entry["fingerprint"] != stage.fingerprint:
        # Outputs from another configuration must not be resumed into: start this stage afresh.
        log.info("stage %s: configuration changed, removing its old outputs", stage.name)
        for out in stage.outputs:
            target = root / out
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    elif entry:
        log.info("stage %s: resuming an unfinished run", stage.name)


def run_stages(root: str | Path, stages: list[Stage], on_change: OnChange = "error",
               context: Callable[[Stage], ContextManager] | None = None,
               before: Callable[[RunManifest], None] | None = None) -> dict[str, str]:
    """Run `stages` (in the given, topological, order); return {stage: 'skipped'|'ran'}.

    `context(stage)` wraps every stage that runs (e.g. a log file of its own); `before(manifest)` is called once
    the configuration is accepted (nothing stale, or stale stages to redo), before the first stage.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = RunManifest(root)
    by_name = _fingerprints(stages)

    stale = [s.name for s in stages if (e := manifest.entry(s.name)) is not None and e["status"] == "complete"
             and e["fingerprint"] != s.fingerprint and not s.derived]
    if stale and on_change == "error":
        raise StaleOutputError(
            f"{manifest.file}: the configuration changed for stages {stale} (or for what they depend on); "
            "their outputs are stale. Use a new output_dir, or rerun with `--on_change redo` to redo them."
        )
    if before is not None:
        before(manifest)

    done: dict[str, str] = {}
    for stage in stages:
        if stage.name in done:
            continue  # ran with its group
        if _done(manifest, stage):
            log.debug("stage %s: complete, skipped", stage.name)
            done[stage.name] = "skipped"
            continue
        batch = [stage]
        if stage.group is not None:
            batch = [s for s in stages if s.group == stage.group and s.name not in done and not _done(manifest, s)]
            late = [d for s in batch for d in s.depends if d not in done]
            if late:
                raise ValueError(f"stage group {stage.group!r}: dependencies {late} must come before its first stage")
        for s in batch:
            _clean(root, manifest, s)
            manifest.mark(s.name, s.fingerprint, "running", config=s.config)
        names = ", ".join(s.name for s in batch)
        log.info("stage %s: running", names)
        start = time.time()
        with context(stage) if context else nullcontext():
            if stage.group is not None and stage.group_action is not None:
                stage.group_action(batch)
            else:
                stage.action()
        seconds = round(time.time() - start, 2)
        for s in batch:
            figures = s.report() if s.report else {}
            manifest.mark(s.name, s.fingerprint, "complete", config=s.config, seconds=seconds, figures=figures,
                          **({"group": [b.name for b in batch]} if len(batch) > 1 else {}))
            done[s.name] = "ran"
    return done
