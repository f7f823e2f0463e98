"""A run folder you can trust: one writer at a time; damaged outputs found and repaired by redoing only the stages
that own them and their dependents; a foreign folder refused untouched; the model and the config checked up front
with one short message each."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_pipeline import manifest_stages, run, run_config

METHODS = ("rose", "less", "random", "bm25")


def results(out: Path) -> dict:
    """What a run produced: every selection, the rose scores, the evaluations' metrics."""
    t = out / "targets" / "default"
    found = {m: (t / "selection" / m / "selected.jsonl").read_text() for m in METHODS}
    with np.load(t / "selection" / "rose" / "scores" / "scores.npz") as z:
        found["rose scores"] = z["scores"].round(5).tolist()
    for name in ("base", "rose"):
        metrics = json.loads((t / "evaluation" / f"{name}.json").read_text())["metrics"]
        found[f"eval {name}"] = {k: round(v, 5) for k, v in metrics.items() if isinstance(v, float)}
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """One uninterrupted run."""
    root = tmp_path_factory.mktemp("folder")
    run(run_config(root, tiny_model_dir, "reference"))
    return root, root / "reference"


def rose_pl(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rose_pl", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_exits_at_once_naming_the_holder(reference, tiny_model_dir):
    root, ref = reference
    config = run_config(root, tiny_model_dir, "locked")
    out = root / "locked"
    first = subprocess.Popen([sys.executable, "-m", "rose_pl", "run", "--config", str(config)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "stages").is_dir():
            assert first.poll() is None, "the first run ended before a second could be started"
            time.sleep(0.2)
        start = time.time()
        second = rose_pl("run", "--config", str(config), timeout=120)
        elapsed = time.time() - start
        assert first.poll() is None, "the first run must still be running for this test to mean anything"
        assert second.returncode == 2, second.stderr
        assert "in use by another `rose-pl run`" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert elapsed < 30, f"the second run took {elapsed:.0f} s to give up"
        assert first.wait(timeout=600) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert results(out) == results(ref)  # the first run was not disturbed


DAMAGE = {
    # case: (what to damage, the stages that own it and depend on it)
    "truncated store": ("targets/default/exact/epoch-1/features.bin",
                        ["targets/default/exact/epoch-1", "targets/default/selection/rose",
                         "targets/default/selection/less", "targets/default/finetune/rose",
                         "targets/default/evaluation/rose", "compare"]),
    "deleted store folder": ("targets/default/exact/epoch-2",
                             ["targets/default/exact/epoch-2", "targets/default/selection/rose",
                              "targets/default/selection/less", "targets/default/finetune/rose",
                              "targets/default/evaluation/rose", "compare"]),
    "deleted scores.npz": ("targets/default/selection/rose/scores/scores.npz",
                           ["targets/default/selection/rose", "targets/default/finetune/rose",
                            "targets/default/evaluation/rose", "compare"]),
    "truncated scores.npz": ("targets/default/selection/less/scores/scores.npz",
                             ["targets/default/selection/less", "compare"]),
    "empty selected.jsonl": ("targets/default/selection/random/selected.jsonl",
                             ["targets/default/selection/random", "compare"]),
    "truncated run.json": ("run.json", []),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_found_and_repaired_by_redoing_only_its_owner_and_dependents(reference, tiny_model_dir, case,
                                                                               capsys):
    root, ref = reference
    name = case.replace(" ", "_").replace(".", "_")
    shutil.copytree(ref, root / name)
    config = run_config(root, tiny_model_dir, name)
    path, owners = DAMAGE[case]
    target = root / name / path
    if case.startswith("deleted"):
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    elif case.startswith("empty"):
        target.write_text("")
    else:
        target.write_bytes(target.read_bytes()[:100])

    run(config, "--verify")
    report = capsys.readouterr().out
    if owners:
        assert f"{owners[0]}: damaged" in report and str(target) in report
        assert f"{len(owners)} of" in report and all(o in report for o in owners)
    else:
        assert "run.json is damaged" in report and "0 of" in report

    result = run(config)
    assert sorted(k for k, v in result.items() if v == "ran") == sorted(owners)
    assert results(root / name) == results(ref)
    assert all(s["status"] == "complete" for s in manifest_stages(root / name).values())


@pytest.mark.slow
def test_a_folder_that_is_not_a_run_is_refused_and_left_unchanged(tmp_path, tiny_model_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "compare.md").write_text("my own notes")
    (mine / "run.json").write_text(json.dumps({"experiment": 3}))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in mine.iterdir()}
    config = run_config(tmp_path, tiny_model_dir, "mine")
    done = rose_pl("run", "--config", str(config), timeout=120)
    assert done.returncode == 2 and "is not a rose-pl run folder" in done.stderr
    assert "--output_dir_exists ok" in done.stderr and "Traceback" not in done.stderr
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in mine.iterdir()} == before


@pytest.mark.slow
def test_an_unreachable_hub_model_fails_before_any_stage_with_one_message(tmp_path, tiny_model_dir):
    config = run_config(tmp_path, tiny_model_dir, "hub", model="no-such-org/no-such-model")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: refused at once
    start = time.time()
    done = rose_pl("run", "--config", str(config), env=env, timeout=120)
    assert time.time() - start < 60
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("rose-pl: ConfigError") == 1 and "Traceback" not in done.stderr
    assert "no-such-org/no-such-model" in done.stderr and "cannot be reached" in done.stderr
    assert not (tmp_path / "hub").exists()  # the run would have created it: nothing is left behind, not even the lock


def test_a_config_typo_gives_one_short_error_with_the_file_the_key_and_the_suggestion(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump({"validation": "v.jsonl", "warmup": {"epocs": 3}, "shots_per_tasks": 2}))
    done = rose_pl("run", "--config", str(config), timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) <= 5, done.stderr
    assert f"{config}: `warmup.epocs` is not an option; did you mean `warmup.epochs`?" in done.stderr
    assert f"{config}: `shots_per_tasks` is not an option; did you mean `shots_per_task`?" in done.stderr
    assert "usage" not in done.stderr


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("warmup:\n  epochs: 3\n   lr: [\n")
    done = rose_pl("run", "--config", str(config), timeout=120)
    assert done.returncode == 2 and f"{config}, line 3" in done.stderr and "<unicode string>" not in done.stderr


def test_run_help_gives_every_option_a_meaning_and_the_intro_once():
    done = rose_pl("run", "--help", timeout=120)
    assert done.returncode == 0
    assert done.stdout.count("The whole pipeline in one output folder") == 1
    assert "Epochs (for the warmup: one checkpoint per epoch" in done.stdout
    assert "--verify" in done.stdout
