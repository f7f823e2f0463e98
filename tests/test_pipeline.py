"""The one-command pipeline on a tiny model: skip on rerun, resume after a real kill, refuse or redo stale stages,
several targets from one pool pass, targets added later, exact and projected scoring."""

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
from rose_pl.layout import RUN_LOCK, RUN_MANIFEST

DATA = Path(__file__).resolve().parents[1] / "data"
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def small_inputs(root: Path) -> dict:
    """24 pool rows from two domains, the demo validation set split by task, 6 held-out pairs per task."""
    rows = [json.loads(line) for line in (DATA / "pool.jsonl").read_text().splitlines()]
    pool = [r for r in rows if r["dataset"] == "cooking"][:12] + [r for r in rows if r["dataset"] == "travel"][:12]
    (root / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    val = [json.loads(line) for line in (DATA / "validation.jsonl").read_text().splitlines()]
    tests = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()]
    for task in ("cooking", "python"):
        (root / f"val_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val if r["task"] == task))
        (root / f"test_{task}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in [t for t in tests if t["task"] == task][:6]))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tests[:3] + tests[-3:]))
    return {"pool": str(root / "pool.jsonl"), "test": str(root / "test.jsonl"), "validation": str(DATA / "validation.jsonl")}


def target(root: Path, task: str, test: bool = True) -> dict:
    return {"validation": str(root / f"val_{task}.jsonl"), "test": str(root / f"test_{task}.jsonl") if test else None}


def run_config(root: Path, model_dir: Path, out: str, **overrides) -> Path:
    cfg = {
        "output_dir": str(root / out),
        "model": str(model_dir),
        **small_inputs(root),
        "methods": ["rose", "less", "random", "bm25"],
        "data": {"max_seq_length": 192},
        "preference": {"max_prompt_length": 96},
        "warmup": {"fraction": 0.25, "epochs": 2, "batch_size": 2, "accumulate_grad_batches": 1, "lora": LORA,
                   "optim": {"lr": 1e-3}},
        "features": {"dim": 32, "batch_size": 8},
        "selection": {"fraction": 0.25},
        "finetune": {"methods": ["rose"], "epochs": 1, "batch_size": 2, "lora": LORA, "optim": {"lr": 1e-3}},
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


def selections(root: Path, target: str = "default") -> dict:
    return {m: (root / "targets" / target / "selection" / m / "selected.jsonl").read_text()
            for m in ("rose", "less", "random", "bm25")}


def ran(result: dict, prefix: str) -> list[str]:
    return sorted(k for k, v in result.items() if v == "ran" and k.startswith(prefix))


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
        assert (out / "targets" / "default" / "selection" / m / "report.md").is_file()
        assert len((out / "targets" / "default" / "selection" / m / "selected.jsonl").read_text().splitlines()) == 6
    assert (out / "warmup" / "checkpoints" / "manifest.json").is_file()
    evaluation = json.loads((out / "targets" / "default" / "evaluation" / "rose.json").read_text())
    assert evaluation["metrics"]["num_pairs"] == 6
    compare = (out / "compare.md").read_text()
    assert "## Target `default`" in compare and "| rose |" in compare and "| base |" in compare
    # A new run scores exactly: no pool feature store, one exact score store per checkpoint.
    assert json.loads((out / RUN_MANIFEST).read_text())["scoring"] == "exact"
    assert not (out / "features").exists()
    assert sorted(p.name for p in (out / "targets" / "default" / "exact").iterdir()) == ["epoch-1", "epoch-2"]
    # Each stage's log file keeps what it logged.
    assert "saved warmup checkpoint" in (out / "logs" / "warmup.log").read_text()


@pytest.mark.slow
def test_rerunning_a_finished_run_does_nothing(finished_run):
    root, config, _ = finished_run
    # run.json is rewritten (the summary) and run.lock names its holder; nothing else is touched.
    before = {p: p.stat().st_mtime_ns for p in (root / "full").rglob("*")
              if p.is_file() and p.name not in (RUN_MANIFEST, RUN_LOCK)}
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
                if state.get("targets/default/exact/epoch-1", {}).get("status") == "complete":
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
    assert {"warmup", "targets/default/exact/epoch-1", "targets/default/means/val_dpo/epoch-2",
            "targets/default/selection/rose", "targets/default/selection/less", "targets/default/finetune/rose",
            "targets/default/evaluation/rose", "compare"} <= set(ran(result, ""))
    # Stages that do not depend on the warmup are kept.
    assert {"targets/default/selection/random", "targets/default/selection/bm25",
            "targets/default/evaluation/base"} <= {k for k, v in result.items() if v == "skipped"}


@pytest.mark.slow
def test_two_targets_share_one_warmup_and_one_pool_pass_then_a_third_computes_only_its_own(tmp_path, tiny_model_dir):
    """Projected scoring: the pool's features are computed once and reused by a target added later."""
    two = {"cooking": target(tmp_path, "cooking"), "python": target(tmp_path, "python")}
    config = run_config(tmp_path, tiny_model_dir, "multi", validation=None, test=None, targets=two, scoring="projected")
    result = run(config)
    assert ran(result, "warmup") == ["warmup"]
    assert ran(result, "features/") == ["features/train/epoch-1", "features/train/epoch-2"]
    for t in two:
        assert ran(result, f"targets/{t}/selection/") == [f"targets/{t}/selection/{m}" for m in
                                                          ("bm25", "less", "random", "rose")]
        assert ran(result, f"targets/{t}/finetune/") == [f"targets/{t}/finetune/rose"]
        assert ran(result, f"targets/{t}/evaluation/") == [f"targets/{t}/evaluation/base",
                                                           f"targets/{t}/evaluation/rose"]
    compare = json.loads((tmp_path / "multi" / "compare.json").read_text())
    assert set(compare["targets"]) == {"cooking", "python"}
    assert all(r["method"] != "base" or "pref_accuracy" in r for rows in compare["targets"].values() for r in rows)
    report = (tmp_path / "multi" / "targets" / "python" / "selection" / "rose" / "report.md").read_text()
    assert "target: python" in report

    # A third target (the whole validation set, its two tasks together) added to the finished run.
    three = {**two, "both": {"validation": str(DATA / "validation.jsonl"), "test": None}}
    config = run_config(tmp_path, tiny_model_dir, "multi", validation=None, test=None, targets=three,
                        scoring="projected")
    result = run(config)
    assert not ran(result, "warmup") and not ran(result, "features/")
    assert not ran(result, "targets/cooking") and not ran(result, "targets/python")
    assert ran(result, "targets/both/selection/") and ran(result, "targets/both/features/val_dpo/")
    assert ran(result, "compare") == ["compare"]

    # Removing a target leaves the others untouched.
    result = run(run_config(tmp_path, tiny_model_dir, "multi", validation=None, test=None, targets=two,
                            scoring="projected"))
    assert not ran(result, "targets/")


@pytest.mark.slow
def test_exact_scoring_of_two_targets_makes_one_pool_pass_per_checkpoint_and_no_pool_store(tmp_path, tiny_model_dir):
    two = {"cooking": target(tmp_path, "cooking", test=False), "python": target(tmp_path, "python", test=False)}
    config = run_config(tmp_path, tiny_model_dir, "exact", validation=None, test=None, targets=two,
                        methods=["rose", "less"], **{"finetune.methods": []})
    run(config)
    out = tmp_path / "exact"
    stages = manifest_stages(out)
    for epoch in (1, 2):
        groups = {tuple(stages[f"targets/{t}/exact/epoch-{epoch}"]["group"]) for t in two}
        assert groups == {(f"targets/cooking/exact/epoch-{epoch}", f"targets/python/exact/epoch-{epoch}")}
    passes = sorted(p.name for p in (out / "configs").glob("exact__*"))
    assert passes == ["exact__cooking+python__epoch-1.yaml", "exact__cooking+python__epoch-2.yaml"]
    assert not (out / "features").exists()
    from rose_pl.features.store import FeatureStore

    store = FeatureStore.open(out / "targets" / "python" / "exact" / "epoch-1")
    assert store.is_complete and store.meta["exact"]["columns"] == ["val_dpo/python", "val_sft/python", "norm2"]

    # A target added to the exact run: one more pool pass per checkpoint, for the new target only.
    three = {**two, "both": {"validation": str(DATA / "validation.jsonl"), "test": None}}
    result = run(run_config(tmp_path, tiny_model_dir, "exact", validation=None, test=None, targets=three,
                            methods=["rose", "less"], **{"finetune.methods": []}))
    assert ran(result, "targets/both/exact/") == ["targets/both/exact/epoch-1", "targets/both/exact/epoch-2"]
    assert not ran(result, "targets/cooking") and not ran(result, "warmup")


@pytest.mark.slow
def test_a_changed_data_option_makes_exactly_the_stages_that_read_it_stale(finished_run, tiny_model_dir):
    root, _, _ = finished_run
    shutil.copytree(root / "full", root / "options")
    config = run_config(root, tiny_model_dir, "options", **{"preference.format": "chat"})
    with pytest.raises(StaleOutputError) as info:
        run(config)
    stale = str(info.value)
    assert "targets/default/means/val_dpo/epoch-1" in stale and "targets/default/selection/rose" in stale
    assert "'warmup'" not in stale and "selection/random" not in stale
    config = run_config(root, tiny_model_dir, "options", **{"data.chat_template": "chatml"})
    with pytest.raises(StaleOutputError, match="'warmup'"):
        run(config)


@pytest.mark.slow
def test_a_pool_of_long_prompts_runs_end_to_end_and_a_row_that_cannot_fit_is_counted_not_selected(
        tmp_path, tiny_model_dir):
    """Under the old right-truncation every row below lost its answer at 96 tokens; now only the prompts are cut.
    One row whose chat headers alone exceed the limit is dropped, counted in run.json and the report."""
    rows = [{"dataset": "long", "id": f"long_{i}", "messages": [
        {"role": "user", "content": f"question {i} " + "context " * 60},
        {"role": "assistant", "content": f"answer {i} " + "y" * (5 + i)}]} for i in range(15)]
    rows.insert(7, {"dataset": "long", "id": "headers_only", "messages": [
        *[{"role": "user", "content": "u"} for _ in range(9)], {"role": "assistant", "content": "lost"}]})
    (tmp_path / "long_pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = run_config(tmp_path, tiny_model_dir, "long", methods=["rose", "less", "random"],
                        pool=str(tmp_path / "long_pool.jsonl"), test=None,
                        **{"data.max_seq_length": 96, "preference.max_prompt_length": 48, "warmup.fraction": 1.0,
                           "selection.fraction": 0.9, "finetune.methods": []})
    run(config)
    out = tmp_path / "long"
    stages = manifest_stages(out)
    cache = stages["cache/pool"]["figures"]
    assert cache["truncated_rows"] == 16 and cache["truncated_tokens"] > 15 * 300 and cache["dropped"] == 1  # all cut
    assert stages["warmup"]["figures"]["rows"] == 15 and stages["warmup"]["figures"]["dropped"] == 1
    exact = stages["targets/default/exact/epoch-1"]["figures"]
    assert exact["rows"] == 15 and exact["dropped"] == 1 and exact["dropped_rows"][0]["id"] == "headers_only"
    assert "no loss token" in exact["dropped_rows"][0]["reason"]
    for method in ("rose", "less"):
        selected = (out / "targets" / "default" / "selection" / method / "selected.jsonl").read_text()
        assert len(selected.splitlines()) == 15 and "headers_only" not in selected  # 90% of 16: all but the drop
        report = (out / "targets" / "default" / "selection" / method / "report.md").read_text()
        assert "pool rows without scores (dropped, never selected): 1" in report


@pytest.mark.slow
def test_the_dpo_reference_runs_once_for_every_checkpoint_and_target_side(tmp_path, tiny_model_dir, monkeypatch):
    """Two checkpoints: the base model scores each validation pair once; no checkpoint runs a reference pass."""
    from rose_pl.features.objectives import DPOObjective
    from rose_pl.features.reference import ReferenceLogProbs

    passes, rows = [], []
    original_reference, original_step = DPOObjective.reference_logps, ReferenceLogProbs.predict_step

    def reference_logps(self, model, batch):
        if "reference_chosen_logps" not in batch:
            passes.append(batch["chosen_input_ids"].shape[0])
        return original_reference(self, model, batch)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        rows.append(batch["index"].shape[0])
        return original_step(self, batch, batch_idx, dataloader_idx)

    monkeypatch.setattr(DPOObjective, "reference_logps", reference_logps)
    monkeypatch.setattr(ReferenceLogProbs, "predict_step", predict_step)
    config = run_config(tmp_path, tiny_model_dir, "once", methods=["rose"], test=None,
                        **{"finetune.methods": [], "warmup.epochs": 2})
    result = run(config)
    assert result["targets/default/reference/val_dpo"] == "ran"
    assert passes == [] and sum(rows) == 8  # the 8 validation pairs, once
    for epoch in (1, 2):
        stage = yaml.safe_load((tmp_path / "once" / "configs" / f"targets__default__means__val_dpo__epoch-{epoch}.yaml")
                               .read_text())
        assert stage["data"]["init_args"]["reference"].endswith("targets/default/reference/val_dpo")
