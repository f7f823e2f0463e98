"""Stage records: what each stage was made from, and what its outputs should be.

One JSON file per stage in `<run>/stages/` is the source of truth of a run folder:

- `status: running` with the stage's fingerprint, written before the stage starts: a killed stage with the same
  fingerprint resumes into its outputs; one with another fingerprint has its outputs removed first.
- `status: complete` with the fingerprint and, for every file under the stage's outputs, its size and digest
  (`files.output_digest`: the whole file when small, sampled when large). Before a finished stage counts as
  done, its files are checked against the record; a missing or changed file marks the stage (and everything
  that depends on it) to be redone.

`run.json` is a view of these records (plus the run's summary), rewritten by the process that holds the run's
lock; a damaged `run.json` is rebuilt from them and costs nothing. Records are written atomically by whoever
finishes the stage: `rose-pl run` itself, or `StageRecorder`, the Lightning callback that every generated stage
YAML (`<run>/configs/<stage>.yaml`) carries, so a stage run by hand under any launcher is recognised by the
next `run`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterable

import lightning.pytorch as pl

from rose_pl.files import atomic_write_json, output_digest
from rose_pl.layout import RunLayout

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
SCRATCH_DIRS = ("resume", "logs")
"""Folders inside a stage's outputs that are scratch, not results: Lightning's resume checkpoints and its logs.
They are not recorded, so removing them (to save space) does not make a finished stage look damaged."""


def _is_scratch(relative: Path) -> bool:
    name = relative.name
    return any(part in SCRATCH_DIRS for part in relative.parts[:-1]) or (name.startswith(".") and name.endswith(".tmp"))


def snapshot(root: str | Path, outputs: Iterable[str]) -> dict[str, dict]:
    """{file relative to root: size and digest} of every result file under `outputs` (files or folders)."""
    root = Path(root)
    files: dict[str, dict] = {}
    for out in outputs:
        target = root / out
        if target.is_file():
            candidates = [target]
        elif target.is_dir():
            candidates = sorted(p for p in target.rglob("*") if p.is_file())
        else:
            continue
        for path in candidates:
            inner = path.relative_to(target) if target.is_dir() else Path(path.name)
            if not _is_scratch(inner):
                files[str(path.relative_to(root))] = output_digest(path)
    return files


def verify(root: str | Path, recorded: dict[str, dict]) -> list[str]:
    """What differs between the files on disk and their record ([] when all are as recorded)."""
    root = Path(root)
    problems = []
    for relative, expected in sorted(recorded.items()):
        path = root / relative
        if not path.is_file():
            problems.append(f"{path}: missing" if not path.exists() else f"{path}: not a file")
            continue
        size = path.stat().st_size
        if size != expected.get("size"):
            problems.append(f"{path}: {size} bytes, {expected.get('size')} when the stage finished")
            continue
        if output_digest(path) != expected:
            problems.append(f"{path}: contents changed since the stage finished (digest differs)")
    return problems


class Records:
    """The stage records of one run folder."""

    def __init__(self, root: str | Path):
        self.layout = RunLayout(root)

    def read(self, name: str) -> dict | None:
        """The record of stage `name`, or None (absent, or unreadable: logged and treated as absent)."""
        return self._load(self.layout.stage_record(name))

    def _load(self, path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or "fingerprint" not in data or "status" not in data:
                raise ValueError("not a stage record")
            return data
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable stage record (%s); the stage counts as not done", path, e)
            return None

    def all(self) -> dict[str, dict]:
        """Every readable record by stage name."""
        out = {}
        if self.layout.stages.is_dir():
            for path in sorted(self.layout.stages.glob("*.json")):
                record = self._load(path)
                if record is not None and isinstance(record.get("stage"), str):
                    out[record["stage"]] = record
        return out

    def write(self, name: str, record: dict) -> None:
        atomic_write_json(self.layout.stage_record(name), {"format": RECORD_FORMAT, "stage": name, **record})

    def running(self, name: str, fingerprint: str, **extra) -> None:
        self.write(name, {"fingerprint": fingerprint, "status": "running", "started": time.time(), **extra})

    def complete(self, name: str, fingerprint: str, outputs: list[str], **extra) -> dict:
        """Record `name` as complete with the digests of its output files now; returns the record."""
        record = {"fingerprint": fingerprint, "status": "complete", "finished": time.time(), "outputs": outputs,
                  "files": snapshot(self.layout.root, outputs), **extra}
        self.write(name, record)
        return {"format": RECORD_FORMAT, "stage": name, **record}

    def remove(self, name: str) -> None:
        self.layout.stage_record(name).unlink(missing_ok=True)

    def problems(self, record: dict) -> list[str]:
        """Why a complete record's outputs cannot be trusted ([] when they are as recorded)."""
        if "files" not in record:
            return [f"{self.layout.stage_record(record['stage'])}: records no output files"]
        return verify(self.layout.root, record["files"])


class StageRecorder(pl.Callback):
    """Records one or several run stages as running when a Lightning stage starts and as complete (with the
    digests of their outputs) when it ends without error. Every stage YAML that `rose-pl run` generates carries
    it, so a stage run alone (`rose-pl predict --config <run>/configs/<stage>.yaml`, under any launcher) counts
    as done for the next `run`, provided its outputs are still as recorded. Only global rank 0 writes."""

    def __init__(self, run_dir: str, stages: list[dict]):
        """
        Args:
            run_dir: The run folder.
            stages: The stages this Lightning run computes: [{name, fingerprint, outputs: [paths relative to
                run_dir]}] (several for a pass shared by several targets).
        """
        self.run_dir, self.stages = run_dir, [dict(s) for s in stages]
        self._failed = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Last in the list: its teardown must see the outputs the other callbacks finish in theirs.
        trainer.callbacks.remove(self)
        trainer.callbacks.append(self)
        if trainer.is_global_zero:
            records = Records(self.run_dir)
            for s in self.stages:
                current = records.read(s["name"])
                if current is None or current["status"] != "running" or current["fingerprint"] != s["fingerprint"]:
                    records.running(s["name"], s["fingerprint"], by="lightning")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._failed = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._failed or not trainer.is_global_zero or trainer.interrupted:
            return
        records = Records(self.run_dir)
        for s in self.stages:
            records.complete(s["name"], s["fingerprint"], list(s["outputs"]), by="lightning")
