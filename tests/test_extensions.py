"""Extension points used from outside the package: an objective and two selection methods defined only here,
named by class path in YAML or registered in Python, run through `predict` and `run` on the tiny model."""

import json

import numpy as np
import pytest
import torch
import yaml
from reference import warmup

from rose_pl.features.objectives import Objective, PerSampleLoss, concat_pairs
from rose_pl.training.losses import sequence_logprobs
from rose_pl.selection.influence import InfluenceResult
from rose_pl.selection.methods import GradientMethod, SelectionMethod, register_method


class MarginObjective(Objective):
    """Minus the log-likelihood margin of chosen over rejected, scaled: a reward-margin objective. Its gradient is
    a positive multiple of the DPO loss's for every pair, so its normalized features equal ROSE's."""

    batch_kind = "preference"

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, model, batch):
        pairs = concat_pairs(batch)
        logps = sequence_logprobs(model, pairs["input_ids"], pairs["attention_mask"], pairs["labels"])
        n = batch["chosen_input_ids"].shape[0]
        rows = torch.arange(n, device=logps.device).repeat(2)
        return PerSampleLoss(-self.scale * (logps[:n] - logps[n:]), rows)

    def settings(self) -> dict:
        return {"scale": self.scale}


def shortest_answers(ctx) -> InfluenceResult:
    """A baseline that prefers short answers (one score, one pseudo-task)."""
    scores = np.asarray([-float(len(e.messages[-1]["content"])) for e in ctx.pool], dtype=np.float32)
    return InfluenceResult(scores, scores[:, None], np.zeros(len(scores), dtype=np.int64), ["any"], np.ones(1))


MARGIN = GradientMethod("margin", side="val_margin", kind="preference",
                        objective={"class_path": "test_extensions.MarginObjective", "init_args": {"scale": 3.0}})
SHORTEST = SelectionMethod("shortest", shortest_answers, description="short answers first")


def test_an_objective_defined_in_a_test_file_runs_through_predict_by_class_path(tmp_path, tiny_model_dir):
    from rose_pl.cli import main
    from rose_pl.features.store import FeatureStore

    ckpt, pool, prefs = warmup(tmp_path, tiny_model_dir)
    stores = {}
    for name, objective in (("margin", {"class_path": "test_extensions.MarginObjective", "init_args": {"scale": 3.0}}),
                            ("dpo", {"class_path": "rose_pl.features.objectives.DPOObjective"})):
        config = {
            "trainer": {"accelerator": "cpu", "logger": False, "inference_mode": False, "enable_progress_bar": False,
                        "default_root_dir": str(tmp_path), "callbacks": [
                            {"class_path": "rose_pl.features.projection.ProjectionCallback",
                             "init_args": {"kind": "identity"}},
                            {"class_path": "rose_pl.features.store.FeatureStoreWriter",
                             "init_args": {"output_dir": str(tmp_path / name), "dtype": "float32"}}]},
            "model": {"class_path": "rose_pl.features.module.GradientFeatureModule",
                      "init_args": {"checkpoint": str(ckpt / "epoch-2"), "model": str(tiny_model_dir),
                                    "objective": objective}},
            "data": {"class_path": "rose_pl.data.datamodule.FeatureDataModule",
                     "init_args": {"data_file": str(prefs), "tokenizer": str(tiny_model_dir), "kind": "preference",
                                   "max_seq_length": 64, "max_prompt_length": 32}},
            "return_predictions": False,
        }
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        main(["predict", "--config", str(tmp_path / f"{name}.yaml")])
        stores[name] = FeatureStore.open(tmp_path / name)
    assert stores["margin"].meta["module"]["objective"] == {"class": "test_extensions.MarginObjective", "scale": 3.0}
    np.testing.assert_allclose(stores["margin"].features(), stores["dpo"].features(), atol=1e-5)  # both normalized


@pytest.mark.slow
def test_a_new_objective_and_a_new_method_run_through_run_from_a_test_file(tmp_path, tiny_model_dir):
    from test_pipeline import run, run_config

    register_method(MARGIN, replace=True)
    config = run_config(tmp_path, tiny_model_dir, "ext", methods=["rose", "margin", "test_extensions.SHORTEST"],
                        **{"finetune.methods": ["margin"]})
    result = run(config)
    out = tmp_path / "ext" / "targets" / "default"
    assert {"targets/default/means/val_margin/epoch-1", "targets/default/selection/margin",
            "targets/default/selection/shortest", "targets/default/finetune/margin",
            "targets/default/evaluation/margin"} <= {k for k, v in result.items() if v == "ran"}
    # The margin's gradient is a positive multiple of DPO's: the same normalized means, the same selection.
    assert (out / "selection" / "margin" / "selected.jsonl").read_text() == \
        (out / "selection" / "rose" / "selected.jsonl").read_text()
    shortest = [json.loads(line) for line in (out / "selection" / "shortest" / "selected.jsonl").read_text().splitlines()]
    pool = [json.loads(line) for line in (tmp_path / "pool.jsonl").read_text().splitlines()]
    lengths = sorted(len(r["messages"][-1]["content"]) for r in pool)
    assert [len(r["messages"][-1]["content"]) for r in shortest] == lengths[: len(shortest)]
