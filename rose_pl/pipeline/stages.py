"""Run bookkeeping: a stage graph with fingerprints, stage records, and what a run must do about each stage.

Each stage has a name, the stages it depends on, and a JSON-able config. Its fingerprint hashes its config and
its dependencies' fingerprints, so a change upstream changes every fingerprint downstream. The stage records
(`records.py`) say, per stage, the fingerprint it ran under and, once complete, the size and digest of every
output file. Before anything runs, `plan` decides for every stage:

| state | meaning | what happens |
|---|---|---|
| done | complete, same fingerprint, outputs as recorded | skipped |
| new | never started | runs |
| resume | started under the same fingerprint, never finished (killed) | runs into its outputs (Lightning checkpoints, the store's written-rows mask) |
| restart | started under another fingerprint, never finished | its outputs are removed, then it runs |
| damaged | complete, but an output file is missing or changed | its outputs are removed, then it runs |
| stale | complete under another fingerprint | refused (`on_change: error`), or removed and run again (`redo`) |
| redo | complete and intact, but something it depends on runs again | removed and run again, after it |

A stage with outputs on disk and no record at all (the record was deleted) is treated as `restart`: nothing is
resumed from files of unknown origin. Stages that share a `group` are run together by one call of the group's
action when several of them are due: e.g. the exact scoring of every new target against one checkpoint is one
pass over the pool.
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
from rose_pl.layout import RunLayout
from rose_pl.pipeline.records import Records

log = logging.getLogger(__name__)

OnChange = Literal["error", "redo"]
MANIFEST_FORMAT = 2


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
    """Figures of the finished stage (rows, drops...), recorded with it."""
    derived: bool = False
    """A cheap summary of other stages (the comparison): redone when what it summarizes changes, never stale."""
    fingerprint: str = ""


class RunManifest:
    """`run.json`: a view of the stage records plus run-level facts (the summary), for people and scripts.

    Only the process that holds the run's lock writes it. A damaged file is reported (`damaged`) and rewritten
    from the records; it never decides what is done.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.file = RunLayout(root).manifest
        self.damaged: str | None = None
        self.data: dict = {"stages": {}}
        if self.file.is_file():
            try:
                data = json.loads(self.file.read_text())
                if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
                    raise ValueError("not a rose-pl run manifest")
                self.data = data
            except (OSError, ValueError) as e:
                self.damaged = f"{type(e).__name__}: {e}"
        self.data.setdefault("stages", {})

    def is_rose_pl(self) -> bool:
        """Whether the file was written by rose-pl (this version, or an earlier one's stage entries)."""
        if "rose_pl" in self.data:
            return True
        entries = self.data.get("stages")
        return bool(entries) and all(isinstance(e, dict) and "fingerprint" in e for e in entries.values())

    def entry(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def mirror(self, record: dict) -> None:
        """Show a stage record in run.json (without its per-file digests, which stay in the record)."""
        self.data["stages"][record["stage"]] = {k: v for k, v in record.items() if k not in ("files", "format", "stage")}

    def set(self, key: str, value: Any) -> None:
        """A run-level record (e.g. the scoring mode, the summary)."""
        self.data[key] = value
        self.save()

    def save(self) -> None:
        from rose_pl import __version__

        self.data["rose_pl"] = {"format": MANIFEST_FORMAT, "version": __version__}
        atomic_write_json(self.file, self.data)


# ---- the plan -------------------------------------------------------------------------------------------
State = Literal["done", "new", "resume", "restart", "damaged", "stale", "redo"]
RUNS = ("new", "resume", "restart", "damaged", "stale", "redo")


@dataclass
class Plan:
    """What a run will do about each stage, and why."""

    stages: list[Stage]
    states: dict[str, State]
    reasons: dict[str, list[str]]
    """Per stage: the damaged files, the changed settings, or the stage it must follow."""
    manifest_damaged: str | None = None
    legacy: dict[str, dict] = field(default_factory=dict)
    """Records read from an earlier rose-pl's run.json, to be written as stage records."""

    def due(self) -> list[str]:
        return [s.name for s in self.stages if self.states[s.name] in RUNS]

    def of(self, *states: str) -> list[str]:
        return [s.name for s in self.stages if self.states[s.name] in states]


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


def _changes(old: Any, new: Any, prefix: str = "", limit: int = 4) -> list[str]:
    """The first few leaf settings that differ between two stage configs (`key: old -> new`)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _changes(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key), limit)
            if len(out) >= limit:
                break
        return out[:limit]
    if old != new:
        return [f"{prefix or 'config'}: {json.dumps(old, default=str)[:60]} -> {json.dumps(new, default=str)[:60]}"]
    return []


def _legacy_records(root: Path, manifest: RunManifest, records: Records, by_name: dict[str, Stage]) -> dict[str, dict]:
    """A run folder of an earlier rose-pl (run.json entries, no stage records): its complete entries as records, with
    the digests of their outputs as they are now (written by `run_stages`, never by a read-only check)."""
    if records.layout.stages.is_dir() or manifest.damaged or not manifest.data["stages"]:
        return {}
    from rose_pl.pipeline.records import RECORD_FORMAT, snapshot

    return {name: {"format": RECORD_FORMAT, "stage": name, "fingerprint": entry["fingerprint"], "status": "complete",
                   "outputs": by_name[name].outputs, "files": snapshot(root, by_name[name].outputs),
                   "config": entry.get("config"), "seconds": entry.get("seconds"),
                   "figures": entry.get("figures", {}), "migrated": True}
            for name, entry in manifest.data["stages"].items()
            if name in by_name and entry.get("status") == "complete"}


def plan(root: str | Path, stages: list[Stage]) -> Plan:
    """Decide, from the stage records and the files on disk, what must run (nothing is changed but a migration)."""
    root = Path(root)
    by_name = _fingerprints(stages)
    manifest, records = RunManifest(root), Records(root)
    legacy = _legacy_records(root, manifest, records, by_name)
    found = legacy or records.all()
    states: dict[str, State] = {}
    reasons: dict[str, list[str]] = {}
    for stage in stages:
        record = found.get(stage.name)
        if record is None:
            present = [o for o in stage.outputs if (root / o).exists()]
            states[stage.name] = "restart" if present else "new"
            if present:
                reasons[stage.name] = [f"{root / o}: exists with no record of how it was made" for o in present]
        elif record["status"] != "complete":
            same = record["fingerprint"] == stage.fingerprint
            states[stage.name] = "resume" if same else "restart"
        elif record["fingerprint"] != stage.fingerprint:
            states[stage.name] = "redo" if stage.derived else "stale"
            reasons[stage.name] = _changes(record.get("config"), stage.config) or ["what it depends on changed"]
        else:
            problems = records.problems(record)
            states[stage.name] = "damaged" if problems else "done"
            if problems:
                reasons[stage.name] = problems
    # Whatever runs again invalidates what was made from it.
    for stage in stages:
        if states[stage.name] == "done":
            upstream = [d for d in stage.depends if states[d] in RUNS]
            if upstream:
                states[stage.name] = "redo"
                reasons[stage.name] = [f"it depends on {upstream[0]}, which runs again"]
    return Plan(stages, states, reasons, manifest.damaged, legacy)


def describe(plan: Plan) -> str:
    """The plan as lines a person reads: every stage that is not simply done or new, and why."""
    lines = []
    if plan.manifest_damaged:
        lines.append(f"run.json is damaged ({plan.manifest_damaged}); it is rewritten from the stage records, "
                     "nothing needs redoing for it")
    for name in plan.of("damaged", "stale", "redo", "restart", "resume"):
        state = plan.states[name]
        lines.append(f"{name}: {state}")
        lines += [f"    {r}" for r in plan.reasons.get(name, [])]
    due = plan.due()
    lines.append(f"{len(due)} of {len(plan.stages)} stages would run: {', '.join(due) if due else 'none'}")
    return "\n".join(lines)


def _remove(root: Path, stage: Stage, why: str) -> None:
    present = [root / o for o in stage.outputs if (root / o).exists()]
    if present:
        log.warning("stage %s: %s; removing %s", stage.name, why, ", ".join(map(str, present)))
    for target in present:
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


def _add_missing_figures(records: Records, manifest: RunManifest, stages: list[Stage], the_plan: Plan) -> None:
    """A stage finished outside `run` (its YAML run by hand) has no figures yet: read them from its outputs."""
    for stage in stages:
        if the_plan.states[stage.name] != "done" or stage.report is None:
            continue
        record = records.read(stage.name)
        if record is not None and "figures" not in record:
            record["figures"] = stage.report()
            records.write(stage.name, {k: v for k, v in record.items() if k not in ("format", "stage")})
            manifest.mirror(record)


_WHY = {"restart": "its outputs were made under another configuration (or their origin is unknown)",
        "damaged": "its outputs are damaged", "stale": "the configuration changed",
        "redo": "what it depends on runs again"}


def run_stages(root: str | Path, stages: list[Stage], on_change: OnChange = "error",
               context: Callable[[Stage], ContextManager] | None = None,
               before: Callable[[RunManifest, Plan], None] | None = None) -> dict[str, str]:
    """Run `stages` (in the given, topological, order); return {stage: 'skipped'|'ran'}.

    The caller holds the run's lock. `context(stage)` wraps every stage that runs (e.g. a log file of its own);
    `before(manifest, plan)` is called once the plan is accepted (nothing stale, or stale stages to redo), before
    the first stage.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    the_plan = plan(root, stages)
    stale = the_plan.of("stale")
    if stale and on_change == "error":
        changes = [f"  {name}: {'; '.join(the_plan.reasons.get(name, []))}" for name in stale[:8]]
        raise StaleOutputError(
            f"{root}: the configuration changed for stages {stale} (or for what they depend on); their outputs are "
            "stale:\n" + "\n".join(changes) + "\nUse a new output_dir, or rerun with `--on_change redo` to redo them "
            "(`--verify` lists everything a rerun would redo).")
    manifest, records = RunManifest(root), Records(root)
    for name, record in the_plan.legacy.items():
        records.write(name, {k: v for k, v in record.items() if k not in ("format", "stage")})
    if the_plan.legacy:
        log.info("%s: recorded the outputs of %d finished stages of an earlier rose-pl", root, len(the_plan.legacy))
    if the_plan.manifest_damaged:
        log.warning("%s was damaged (%s); rewriting it from the stage records in %s (nothing is redone for it)",
                    manifest.file, the_plan.manifest_damaged, records.layout.stages)
        manifest.data = {"stages": {}}
    for name, record in records.all().items():
        manifest.mirror(record)
    _add_missing_figures(records, manifest, stages, the_plan)
    for name in the_plan.of("damaged"):
        log.warning("stage %s: outputs damaged, it runs again with what depends on it:\n  %s", name,
                    "\n  ".join(the_plan.reasons[name]))
    if before is not None:
        before(manifest, the_plan)
    manifest.save()

    by_name = {s.name: s for s in stages}
    done: dict[str, str] = {}
    for stage in stages:
        if stage.name in done:
            continue  # ran with its group
        if the_plan.states[stage.name] == "done":
            log.debug("stage %s: complete, skipped", stage.name)
            done[stage.name] = "skipped"
            continue
        batch = [stage]
        if stage.group is not None:
            batch = [s for s in stages if s.group == stage.group and s.name not in done
                     and the_plan.states[s.name] != "done"]
            late = [d for s in batch for d in s.depends if d not in done]
            if late:
                raise ValueError(f"stage group {stage.group!r}: dependencies {late} must come before its first stage")
        for s in batch:
            state = the_plan.states[s.name]
            if state == "resume":
                log.info("stage %s: resuming an unfinished run", s.name)
            elif state != "new":
                records.remove(s.name)
                _remove(root, s, _WHY[state])
            records.running(s.name, s.fingerprint, config=s.config)
            manifest.mirror({"stage": s.name, "fingerprint": s.fingerprint, "status": "running", "started": time.time()})
        manifest.save()
        names = ", ".join(s.name for s in batch)
        log.info("stage %s: running", names)
        start = time.time()
        try:
            with context(stage) if context else nullcontext():
                if stage.group is not None and stage.group_action is not None:
                    stage.group_action(batch)
                else:
                    stage.action()
        except BaseException as e:
            for s in batch:
                failed = {"stage": s.name, "fingerprint": s.fingerprint, "status": "failed",
                          "error": f"{type(e).__name__}: {e}"[:500], "time": time.time()}
                records.write(s.name, {k: v for k, v in failed.items() if k != "stage"})
                manifest.mirror(failed)
            manifest.save()
            raise
        seconds = round(time.time() - start, 2)
        for s in batch:
            figures = s.report() if s.report else {}
            record = records.complete(s.name, s.fingerprint, s.outputs, config=s.config, seconds=seconds,
                                      figures=figures, **({"group": [b.name for b in batch]} if len(batch) > 1 else {}))
            manifest.mirror(record)
            done[s.name] = "ran"
        manifest.save()
    assert set(done) == set(by_name)
    return done
