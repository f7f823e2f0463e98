"""Exact scoring: task-mean validation gradients, one streamed pool pass, scores without projection noise.

References: per-sample gradients by one backward pass per example, the Adam direction and Eq. 7 in float64.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from reference import all_rows, peft_from, single_example_grads, trainer, warmup

from rose_pl.data.datamodule import FeatureDataModule
from rose_pl.errors import StoreMismatchError
from rose_pl.features.exact import ExactScoreWriter, ExactTarget, TaskMeanWriter, TaskMeans
from rose_pl.features.module import GradientFeatureModule
from rose_pl.features.objectives import DPOObjective, SFTObjective
from rose_pl.features.projection import ProjectionCallback
from rose_pl.features.store import FeatureStore, FeatureStoreWriter
from rose_pl.features.transforms import AdamDirection
from rose_pl.selection.influence import exact_scores, score_stores
from rose_pl.training.checkpoints import Manifest

SIDES = {"val_dpo": ("preference", DPOObjective(beta=0.1)), "val_sft": ("preference_sft", SFTObjective())}


class KillAfterBatches(pl.Callback):
    """SIGKILLs its own process after `batches` predict batches (a crash in the middle of a pass)."""

    def __init__(self, batches: int):
        self.batches = batches

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 >= self.batches:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def warm(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("exact")
    ckpt, pool, prefs = warmup(root, tiny_model_dir)
    return root, Manifest.load(ckpt), pool, prefs


def data(path, model_dir, kind):
    return FeatureDataModule(str(path), str(model_dir), kind=kind, batch_size=3, max_seq_length=64,
                             max_prompt_length=32)


def compute_means(root, manifest, prefs, model_dir):
    """TaskMeanWriter folders {side: [epoch-1, epoch-2]}."""
    out = {}
    for side, (kind, objective) in SIDES.items():
        out[side] = []
        for c in manifest.checkpoints:
            folder = root / "means" / side / f"epoch-{c.epoch}"
            module = GradientFeatureModule(checkpoint=str(c.path), objective=objective, model=str(model_dir))
            trainer(callbacks=[TaskMeanWriter(str(folder), side)]).predict(module, datamodule=data(prefs, model_dir, kind),
                                                                      return_predictions=False)
            out[side].append(folder)
    return out


def exact_pass(manifest, pool, model_dir, targets_of_epoch):
    """One pool pass per checkpoint; `targets_of_epoch(epoch)` -> [ExactTarget]."""
    for c in manifest.checkpoints:
        module = GradientFeatureModule(checkpoint=str(c.path), objective=SFTObjective(), transform=AdamDirection(),
                                       model=str(model_dir))
        trainer(callbacks=[ExactScoreWriter(targets_of_epoch(c.epoch))]).predict(
            module, datamodule=data(pool, model_dir, "sft"), return_predictions=False)


@pytest.fixture(scope="module")
def exact_run(warm, tiny_model_dir):
    root, manifest, pool, prefs = warm
    means = compute_means(root, manifest, prefs, tiny_model_dir)
    out = [root / "exact" / f"epoch-{c.epoch}" for c in manifest.checkpoints]
    exact_pass(manifest, pool, tiny_model_dir,
               lambda e: [ExactTarget(str(out[e - 1]), [str(means[s][e - 1]) for s in SIDES])])
    return means, out


def reference_scores(warm, model_dir, side):
    """Eq. 7 in float64 from batch-size-1 gradients: per-task scores (N, T) with tasks sorted."""
    root, manifest, pool, prefs = warm
    kind, objective = SIDES[side]
    lrs = np.array([c.lr for c in manifest.checkpoints], dtype=np.float64)
    eta = lrs / lrs.sum()
    total = None
    for w, c in zip(eta, manifest.checkpoints):
        model = peft_from(c.path, model_dir)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        saved = c.load_optimizer_state()
        (b1, b2), eps = saved["hyper"]["betas"], saved["hyper"]["eps"]
        m = torch.cat([saved["state"][n]["exp_avg"].flatten() for n in names]).double()
        v = torch.cat([saved["state"][n]["exp_avg_sq"].flatten() for n in names]).double()
        g = single_example_grads(model, SFTObjective(), all_rows(data(pool, model_dir, "sft"))).double()
        adam = (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g * g + eps)
        adam = adam / adam.norm(dim=1, keepdim=True)
        val_dm = data(prefs, model_dir, kind)
        vg = single_example_grads(model, objective, all_rows(val_dm)).double()
        vg = vg / vg.norm(dim=1, keepdim=True)
        tasks = sorted(set(val_dm.task_ids))
        means = torch.stack([vg[[i for i, t in enumerate(val_dm.task_ids) if t == task]].mean(0) for task in tasks])
        part = (adam @ means.T).numpy() * w
        total = part if total is None else total + part
    return total, tasks


@pytest.mark.parametrize("side", ["val_dpo", "val_sft"])
def test_exact_scores_equal_a_float64_computation_from_single_example_gradients(warm, exact_run, tiny_model_dir, side):
    _, stores = exact_run
    expected, tasks = reference_scores(warm, tiny_model_dir, side)
    result = exact_scores(stores, side)
    assert result.tasks == tasks == ["t0", "t1"]  # 3 and 2 pairs, interleaved in the file
    np.testing.assert_allclose(result.per_task, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(result.scores, result.per_task.max(axis=1))


def test_task_means_hold_the_mean_of_normalized_gradients_per_task(warm, exact_run):
    means, _ = exact_run
    loaded = TaskMeans.load(means["val_dpo"][0])
    assert loaded.tasks == ["t0", "t1"] and loaded.meta["counts"] == [3, 2]
    norm = torch.sqrt(sum(t.pow(2).sum(dim=tuple(range(1, t.dim()))) for t in loaded.means.values()))
    assert torch.all(norm <= 1 + 1e-6)  # a mean of unit vectors


@pytest.mark.parametrize("dim", [128, 512])
def test_exact_scores_agree_with_the_projected_path_within_the_jl_bound(warm, exact_run, tiny_model_dir, dim):
    root, manifest, pool, prefs = warm
    _, stores = exact_run
    folders = {}
    for name, path, kind, objective, transform in (("train", pool, "sft", SFTObjective(), AdamDirection()),
                                                   ("val_dpo", prefs, "preference", DPOObjective(beta=0.1), None)):
        folders[name] = []
        for c in manifest.checkpoints:
            out = root / f"projected-{dim}" / name / f"epoch-{c.epoch}"
            module = GradientFeatureModule(checkpoint=str(c.path), objective=objective, transform=transform,
                                           model=str(tiny_model_dir))
            callbacks = [ProjectionCallback(kind="countsketch", dim=dim, seed=3),
                         FeatureStoreWriter(str(out), dtype="float32")]
            trainer(callbacks=callbacks).predict(module, datamodule=data(path, tiny_model_dir, kind),
                                                 return_predictions=False)
            folders[name].append(out)
    val_dm = data(prefs, tiny_model_dir, "preference")
    val_dm.setup()
    task_ids = val_dm.task_ids
    projected = score_stores(folders["train"], folders["val_dpo"], task_ids).per_task
    exact = exact_scores(stores, "val_dpo").per_task
    # A cosine of unit vectors projected to d dims errs by about sqrt(2 / d) (JL); a score is a weighted mean of them.
    error = projected - exact
    scale = np.sqrt(2.0 / dim)
    assert np.sqrt(np.mean(error ** 2)) < 2 * scale and np.max(np.abs(error)) < 4 * scale
    assert np.max(np.abs(error)) > 1e-4  # the projection does add noise: the checks above can fail


def test_exact_stores_refuse_means_of_another_checkpoint(warm, exact_run, tiny_model_dir, tmp_path):
    root, manifest, pool, _ = warm
    means, _ = exact_run
    c = manifest.checkpoints[1]
    module = GradientFeatureModule(checkpoint=str(c.path), objective=SFTObjective(), transform=AdamDirection(),
                                   model=str(tiny_model_dir))
    wrong = ExactScoreWriter([ExactTarget(str(tmp_path / "x"), [str(means["val_dpo"][0])])])  # epoch-1's means
    with pytest.raises(StoreMismatchError, match="checkpoint"):
        trainer(callbacks=[wrong]).predict(module, datamodule=data(pool, tiny_model_dir, "sft"), return_predictions=False)


def predict_config(out: Path, means: Path, ckpt: Path, pool: Path, model_dir: Path, kill_after: int | None = None):
    callbacks = [{"class_path": "rose_pl.features.exact.ExactScoreWriter",
                  "init_args": {"targets": [{"output_dir": str(out), "means": [str(means)]}]}}]
    if kill_after:
        callbacks.append({"class_path": "test_exact.KillAfterBatches", "init_args": {"batches": kill_after}})
    return {
        "trainer": {"accelerator": "cpu", "logger": False, "inference_mode": False, "enable_progress_bar": False,
                    "default_root_dir": str(out.parent), "callbacks": callbacks},
        "model": {"class_path": "rose_pl.features.module.GradientFeatureModule",
                  "init_args": {"checkpoint": str(ckpt), "model": str(model_dir),
                                "objective": {"class_path": "rose_pl.features.objectives.SFTObjective"},
                                "transform": {"class_path": "rose_pl.features.transforms.AdamDirection"}}},
        "data": {"class_path": "rose_pl.data.datamodule.FeatureDataModule",
                 "init_args": {"data_file": str(pool), "tokenizer": str(model_dir), "batch_size": 3,
                               "max_seq_length": 64}},
        "return_predictions": False,
    }


def predict_cli(tmp_path: Path, name: str, config: dict, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "rose_pl", "predict", "--config", str(path), *extra],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_an_exact_pass_killed_midway_resumes_and_ends_equal_to_an_uninterrupted_one(warm, exact_run, tiny_model_dir,
                                                                                   tmp_path):
    root, manifest, pool, _ = warm
    means, stores = exact_run
    c = manifest.checkpoints[1]
    out = tmp_path / "killed"
    crashed = predict_cli(tmp_path, "killed", predict_config(out, means["val_dpo"][1], c.path, pool, tiny_model_dir,
                                                              kill_after=2))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    partial = FeatureStore.open(out)
    assert not partial.is_complete and 0 < partial.written_indices().size < partial.num_rows
    resumed = predict_cli(tmp_path, "resumed", predict_config(out, means["val_dpo"][1], c.path, pool, tiny_model_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already written" in resumed.stderr
    # The uninterrupted pass of the same checkpoint, restricted to the same columns.
    reference = FeatureStore.open(stores[1]).features()
    columns = FeatureStore.open(stores[1]).meta["exact"]["columns"]
    keep = [i for i, name in enumerate(columns) if name.startswith("val_dpo/") or name == "norm2"]
    np.testing.assert_allclose(FeatureStore.open(out).features(), reference[:, keep], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_ddp_exact_pass_equals_one_process(warm, exact_run, tiny_model_dir, tmp_path):
    root, manifest, pool, _ = warm
    means, _ = exact_run
    c = manifest.checkpoints[0]
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"ddp{devices}"
        extra = ["--trainer.devices", str(devices)] + (["--trainer.strategy", "ddp"] if devices > 1 else [])
        proc = predict_cli(tmp_path, f"ddp{devices}", predict_config(out, means["val_sft"][0], c.path, pool,
                                                                     tiny_model_dir), *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = FeatureStore.open(out)
    assert results[1].is_complete and results[2].is_complete and results[1].meta == results[2].meta
    np.testing.assert_allclose(results[2].features(), results[1].features(), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_ddp_task_means_equal_one_process_when_the_rows_do_not_divide_among_ranks(warm, tiny_model_dir, tmp_path):
    """5 validation pairs on 2 ranks: the sampler repeats one pair to even the ranks out; it must count once."""
    root, manifest, _, prefs = warm
    c = manifest.checkpoints[0]
    means = {}
    for devices in (1, 2):
        out = tmp_path / f"means{devices}"
        config = {
            "trainer": {"accelerator": "cpu", "logger": False, "inference_mode": False, "enable_progress_bar": False,
                        "default_root_dir": str(tmp_path), "callbacks": [
                            {"class_path": "rose_pl.features.exact.TaskMeanWriter",
                             "init_args": {"output_dir": str(out), "side": "val_dpo"}}]},
            "model": {"class_path": "rose_pl.features.module.GradientFeatureModule",
                      "init_args": {"checkpoint": str(c.path), "model": str(tiny_model_dir),
                                    "objective": {"class_path": "rose_pl.features.objectives.DPOObjective"}}},
            "data": {"class_path": "rose_pl.data.datamodule.FeatureDataModule",
                     "init_args": {"data_file": str(prefs), "tokenizer": str(tiny_model_dir), "kind": "preference",
                                   "batch_size": 2, "max_seq_length": 64, "max_prompt_length": 32}},
            "return_predictions": False,
        }
        extra = ["--trainer.devices", str(devices)] + (["--trainer.strategy", "ddp"] if devices > 1 else [])
        proc = predict_cli(tmp_path, f"means{devices}", config, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        means[devices] = TaskMeans.load(out)
    one, two = means[1], means[2]
    assert one.meta["counts"] == two.meta["counts"] == [3, 2] and one.side == "val_dpo"
    for name in one.means:
        torch.testing.assert_close(two.means[name], one.means[name], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_ddp_with_more_ranks_than_rows_is_refused_with_the_fix(warm, tiny_model_dir, tmp_path):
    """Lightning gives every rank at least one row and crashes otherwise: say so, naming the file and the fix."""
    root, manifest, _, _ = warm
    one_pair = tmp_path / "one.jsonl"
    one_pair.write_text('{"prompt": "ask", "chosen": "good answer", "rejected": "bad", "task": "t"}\n')
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "inference_mode": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path), "callbacks": [
                        {"class_path": "rose_pl.features.exact.TaskMeanWriter", "init_args": {"output_dir": str(tmp_path / "m"), "side": "val_dpo"}}]},
        "model": {"class_path": "rose_pl.features.module.GradientFeatureModule",
                  "init_args": {"checkpoint": str(manifest.checkpoints[0].path), "model": str(tiny_model_dir),
                                "objective": {"class_path": "rose_pl.features.objectives.DPOObjective"}}},
        "data": {"class_path": "rose_pl.data.datamodule.FeatureDataModule",
                 "init_args": {"data_file": str(one_pair), "tokenizer": str(tiny_model_dir), "kind": "preference",
                               "max_seq_length": 64, "max_prompt_length": 32}},
        "return_predictions": False,
    }
    proc = predict_cli(tmp_path, "one", config, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert proc.returncode != 0
    assert f"{one_pair}: 1 rows to predict on 2 ranks" in proc.stderr and "at most 1 devices" in proc.stderr
