"""The one-command pipeline: skip on rerun, resume after a real kill, refuse or redo stale stages."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rose_pl.errors import StaleOutputError
from rose_pl.stages import RUN_MANIFEST

DATA = Path(__file__).resolve().parents[1] / "data"


def small_inputs(root: Path) -> dict:
    """24 pool rows from two domains, the demo validation set, 6 held-out pairs."""
    rows = [json.loads(line) for line in (DATA / "pool.jsonl").read_text().splitlines()]
    pool = [r for r in rows if r["dataset"] == "cooking"][:12] + [r for r in rows if r["dataset"] == "travel"][:12]
    tests = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()]
    (root / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tests[:3] + tests[-3:]))
    return {"pool": str(root / "pool.jsonl"), "test": str(root / "test.jsonl"), "validation": str(DATA / "validation.jsonl")}


def run_config(root: Path, model_dir: Path, out: str, **overrides) -> Path:
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    cfg = {
        "output_dir": str(root / out),
        "model": str(model_dir),
        **small_inputs(root),
        "max_seq_length": 192,
        "methods": ["rose", "less", "random", "bm25"],
        "warmup": {"fraction": 0.25, "epochs": 2, "batch_size": 2, "lora": lora, "optim": {"lr": 1e-3}},
        "features": {"dim": 32, "batch_size": 8},
        "selection": {"fraction": 0.25},
        "finetune": {"methods": ["rose"], "epochs": 1, "batch_size": 2, "lora": lora, "optim": {"lr": 1e-3}},
        "evaluation": {"batch_size": 8},
        "trainer": {"accelerator": "cpu", "devices": 1},
    }
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(config: Path, *extra: str) -> dict[str, str]:
    """Run the pipeline in this process; returns {stage: 'ran' | 'skipped'}."""
    from rose_pl.commands import run_argv

    return run_argv(["--config", str(config), *extra])


def manifest_stages(out: Path) -> dict:
    return json.loads((out / RUN_MANIFEST).read_text())["stages"]


def selections(root: Path) -> dict:
    return {m: (root / "selection" / m / "selected.jsonl").read_text() for m in ("rose", "less", "random", "bm25")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("pipeline")
    config = run_config(root, tiny_model_dir, "full")
    run(config)
    return root, config, manifest_stages(root / "full")


@pytest.mark.slow
def test_run_produces_every_stage_and_the_comparison(finished_run):
    root, config, stages = finished_run
    out = root / "full"
    assert all(s["status"] == "complete" for s in stages.values())
    for m in ("rose", "less", "random", "bm25"):
        assert (out / "selection" / m / "report.md").is_file()
        assert len((out / "selection" / m / "selected.jsonl").read_text().splitlines()) == 6  # 25% of 24
    assert (out / "warmup" / "checkpoints" / "manifest.json").is_file()
    evaluation = json.loads((out / "evaluation" / "rose.json").read_text())
    assert evaluation["metrics"]["num_pairs"] == 6
    compare = (out / "compare.md").read_text()
    assert "| rose |" in compare and "| base |" in compare


@pytest.mark.slow
def test_rerunning_a_finished_run_does_nothing(finished_run):
    root, config, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in (root / "full").rglob("*") if p.is_file() and p.name != RUN_MANIFEST}
    result = run(config)
    assert set(result.values()) == {"skipped"}
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_remaining_stages_only(finished_run, tiny_model_dir):
    root, _, _ = finished_run
    config = run_config(root, tiny_model_dir, "killed")
    out = root / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "rose_pl", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    manifest = out / RUN_MANIFEST
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if manifest.is_file():
                state = json.loads(manifest.read_text())["stages"]
                if state.get("features/train/epoch-1", {}).get("status") == "complete":
                    break
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done_before = {k for k, v in manifest_stages(out).items() if v["status"] == "complete"}
    assert "warmup" in done_before and "compare" not in done_before
    result = run(config)
    assert {k for k, v in result.items() if v == "skipped"} == done_before
    assert all(v["status"] == "complete" for v in manifest_stages(out).values())
    # The resumed run ends where an uninterrupted one does.
    assert selections(out) == selections(root / "full")


@pytest.mark.slow
def test_a_changed_warmup_is_refused_then_redone_with_its_dependents(finished_run, tiny_model_dir):
    root, _, _ = finished_run
    shutil.copytree(root / "full", root / "changed")
    config = run_config(root, tiny_model_dir, "changed", **{"warmup.optim": {"lr": 5e-3}})
    with pytest.raises(StaleOutputError, match="warmup"):
        run(config)
    result = run(config, "--on_change", "redo")
    ran = {k for k, v in result.items() if v == "ran"}
    assert {"warmup", "features/train/epoch-1", "features/val_dpo/epoch-2", "selection/rose", "selection/less",
            "finetune/rose", "evaluation/rose", "compare"} <= ran
    # Stages that do not depend on the warmup are kept.
    assert {"selection/random", "selection/bm25", "evaluation/base"} <= {k for k, v in result.items() if v == "skipped"}
