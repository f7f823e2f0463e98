"""Run bookkeeping: a stage graph with fingerprints, a run manifest, skip / resume / stale detection.

Each stage has a name, the stages it depends on, and a JSON-able config. Its fingerprint hashes its
config and its dependencies' fingerprints, so a change upstream changes every fingerprint downstream.
The run manifest (`run.json`) records, per stage, the fingerprint it ran under and whether it finished.
On a rerun a finished stage with the same fingerprint is skipped; an unfinished one is run again (the
stages themselves resume: Lightning checkpoints, the feature store's written-rows mask); a finished
stage whose fingerprint changed is stale: refused, or redone from scratch when the user asks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from rose_pl.atomic import atomic_write_json
from rose_pl.errors import StaleOutputError

log = logging.getLogger(__name__)

RUN_MANIFEST = "run.json"
OnChange = Literal["error", "redo"]


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    """One step of a run: `action()` produces everything under `outputs` (paths relative to the run)."""

    name: str
    config: dict
    action: Callable[[], None]
    depends: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    fingerprint: str = ""


class RunManifest:
    """The `run.json` of one output folder: the source of truth for what has been done there."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.file = self.root / RUN_MANIFEST
        self.data = json.loads(self.file.read_text()) if self.file.is_file() else {"stages": {}}

    def entry(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def mark(self, name: str, fp: str, status: str, **extra) -> None:
        self.data["stages"][name] = {"fingerprint": fp, "status": status, "time": time.time(), **extra}
        atomic_write_json(self.file, self.data)


def run_stages(root: str | Path, stages: list[Stage], on_change: OnChange = "error") -> dict[str, str]:
    """Run `stages` (in the given, topological, order); return {stage: 'skipped'|'ran'}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = RunManifest(root)
    by_name: dict[str, Stage] = {}
    for stage in stages:
        missing = [d for d in stage.depends if d not in by_name]
        if missing:
            raise ValueError(f"stage {stage.name!r} depends on {missing}, which do not come before it")
        stage.fingerprint = fingerprint({"config": stage.config, "deps": [by_name[d].fingerprint for d in stage.depends]})
        by_name[stage.name] = stage

    stale = [
        s.name
        for s in stages
        if (e := manifest.entry(s.name)) is not None and e["status"] == "complete" and e["fingerprint"] != s.fingerprint
    ]
    if stale and on_change == "error":
        raise StaleOutputError(
            f"{manifest.file}: the configuration changed for stages {stale} (or for what they depend on); "
            "their outputs are stale. Use a new output_dir, or rerun with `--on_change redo` to redo them."
        )

    done: dict[str, str] = {}
    for stage in stages:
        entry = manifest.entry(stage.name)
        if entry and entry["fingerprint"] == stage.fingerprint and entry["status"] == "complete":
            log.info("stage %s: complete, skipped", stage.name)
            done[stage.name] = "skipped"
            continue
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
        manifest.mark(stage.name, stage.fingerprint, "running", config=stage.config)
        log.info("stage %s: running", stage.name)
        start = time.time()
        stage.action()
        manifest.mark(stage.name, stage.fingerprint, "complete", config=stage.config, seconds=round(time.time() - start, 2))
        done[stage.name] = "ran"
    return done
