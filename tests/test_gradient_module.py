"""The predict-time gradient module end to end: Trainer.predict output against hand computations."""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from reference import all_rows, peft_from, single_example_grads, trainer, warmup

from rose_pl.training.checkpoints import Manifest
from rose_pl.data.datamodule import FeatureDataModule
from rose_pl.features.hidden import HiddenStateModule
from rose_pl.features.module import GradientFeatureModule
from rose_pl.features.transforms import AdamDirection
from rose_pl.features.objectives import DPOObjective, SFTObjective
from rose_pl.features.projection import ProjectionCallback

ATOL = 1e-5


@pytest.fixture(scope="module")
def warm(tmp_path_factory, tiny_model_dir):
    """A 2-epoch warmup of the tiny model: (folder, pool file, preference file)."""
    root = tmp_path_factory.mktemp("warm")
    ckpt, pool, prefs = warmup(root, tiny_model_dir)
    return root, pool, prefs


def predict(ckpt, data_file, kind, model_dir, objective=None, transform=None, hidden=False, inference_mode=False,
            max_tokens_per_pass=4096, reference=None, max_tokens_per_batch=None, batch_size=3):
    if hidden:
        module = HiddenStateModule(checkpoint=str(ckpt), model=str(model_dir))
    else:
        module = GradientFeatureModule(checkpoint=str(ckpt), objective=objective, transform=transform,
                                       model=str(model_dir), max_tokens_per_pass=max_tokens_per_pass)
    dm = FeatureDataModule(str(data_file), str(model_dir), kind=kind, batch_size=batch_size, max_seq_length=64,
                           max_prompt_length=32, reference=reference, max_tokens_per_batch=max_tokens_per_batch)
    callbacks = [] if hidden else [ProjectionCallback(kind="identity", normalize=False)]
    out = trainer(callbacks=callbacks, inference_mode=inference_mode).predict(module, datamodule=dm)
    index = torch.cat([o["index"] for o in out])
    feats = torch.cat([o["features"] for o in out])
    return feats[index.argsort()], module, dm


def test_adam_features_equal_a_hand_computation_from_the_saved_state(warm, tiny_model_dir):
    root, pool, _ = warm
    ckpt = Manifest.load(root / "ckpt").get(2)
    feats, module, dm = predict(ckpt.path, pool, "sft", tiny_model_dir, transform=AdamDirection())
    model = peft_from(ckpt.path, tiny_model_dir)
    grads = single_example_grads(model, SFTObjective(), all_rows(dm))
    saved = ckpt.load_optimizer_state()
    (b1, b2), eps = saved["hyper"]["betas"], saved["hyper"]["eps"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    m = torch.cat([saved["state"][n]["exp_avg"].flatten() for n in names])
    v = torch.cat([saved["state"][n]["exp_avg_sq"].flatten() for n in names])
    m2 = b1 * m + (1 - b1) * grads
    v2 = b2 * v + (1 - b2) * grads * grads
    expected = m2 / torch.sqrt(v2 + eps)
    assert feats.shape == expected.shape == (10, sum(p.numel() for p in model.parameters() if p.requires_grad))
    torch.testing.assert_close(feats, expected, atol=ATOL, rtol=1e-4)


def test_features_do_not_depend_on_the_trainers_inference_mode(warm, tiny_model_dir):
    root, pool, _ = warm
    ckpt = root / "ckpt" / "epoch-1"
    a, _, _ = predict(ckpt, pool, "sft", tiny_model_dir, inference_mode=False)
    b, _, _ = predict(ckpt, pool, "sft", tiny_model_dir, inference_mode=True)
    torch.testing.assert_close(a, b)


def test_dpo_features_equal_single_example_dpo_gradients(warm, tiny_model_dir):
    root, _, prefs = warm
    ckpt = root / "ckpt" / "epoch-2"
    feats, _, dm = predict(ckpt, prefs, "preference", tiny_model_dir, objective=DPOObjective(beta=0.5))
    expected = single_example_grads(peft_from(ckpt, tiny_model_dir), DPOObjective(beta=0.5), all_rows(dm))
    torch.testing.assert_close(feats, expected, atol=ATOL, rtol=1e-4)
    noref, _, _ = predict(ckpt, prefs, "preference", tiny_model_dir, objective=DPOObjective(reference="none"))
    normalize = torch.nn.functional.normalize
    torch.testing.assert_close(normalize(feats, dim=1), normalize(noref, dim=1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind,objective", [("sft", SFTObjective()), ("preference", DPOObjective(beta=0.5))])
def test_features_do_not_depend_on_how_a_batch_is_split_into_passes(warm, tiny_model_dir, kind, objective):
    root, pool, prefs = warm
    data = pool if kind == "sft" else prefs
    whole, _, _ = predict(root / "ckpt" / "epoch-2", data, kind, tiny_model_dir, objective=objective,
                          max_tokens_per_pass=None)
    split, _, _ = predict(root / "ckpt" / "epoch-2", data, kind, tiny_model_dir, objective=objective,
                          max_tokens_per_pass=50)  # about one row (or half a pair) per pass
    torch.testing.assert_close(split, whole, atol=ATOL, rtol=1e-4)


def test_split_rows_keeps_every_row_once_in_order_within_the_budget():
    from rose_pl.features.module import split_rows
    from rose_pl.testing import random_sft_batch

    lengths = [30, 28, 20, 9, 9, 3]
    batch = random_sft_batch(lengths, [2] * 6)
    chunks = split_rows(batch, 60)
    assert [c["index"].tolist() for c in chunks] == [[0, 1], [2, 3, 4], [5]]  # 2 x 30, 3 x 20, 1 x 3 tokens
    for c in chunks:
        longest = int(c["attention_mask"].sum(1).max())
        assert c["input_ids"].shape == (len(c["index"]), longest) and len(c["index"]) * longest <= 60
        rows = c["index"].tolist()
        assert torch.equal(c["labels"], batch["labels"][rows, :longest])
    assert split_rows(batch, None) == [batch] and split_rows(batch, 10)[0]["index"].tolist() == [0]


def test_hidden_state_module_gives_unit_mean_hidden_states(warm, tiny_model_dir):
    root, pool, _ = warm
    feats, _, _ = predict(root / "ckpt" / "epoch-2", pool, "sft", tiny_model_dir, hidden=True)
    assert feats.shape == (10, 32)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(10))


def test_an_objective_that_does_not_fit_the_data_kind_is_refused(warm, tiny_model_dir):
    from rose_pl.errors import ConfigError

    root, pool, _ = warm
    with pytest.raises(ConfigError, match="preference"):
        predict(root / "ckpt" / "epoch-1", pool, "sft", tiny_model_dir, objective=DPOObjective())


def predict_config(out, ckpt, data_file, model_dir) -> dict:
    return {
        "trainer": {"accelerator": "cpu", "logger": False, "inference_mode": False, "enable_progress_bar": False,
                    "default_root_dir": str(Path(str(out)).parent), "callbacks": [
                        {"class_path": "rose_pl.features.projection.ProjectionCallback", "init_args": {"kind": "countsketch", "dim": 64}},
                        {"class_path": "rose_pl.features.store.FeatureStoreWriter", "init_args": {"output_dir": str(out), "dtype": "float32"}},
                    ]},
        "model": {"class_path": "rose_pl.features.module.GradientFeatureModule",
                  "init_args": {"checkpoint": str(ckpt), "model": str(model_dir),
                                "objective": {"class_path": "rose_pl.features.objectives.SFTObjective"},
                                "transform": {"class_path": "rose_pl.features.transforms.AdamDirection"}}},
        "data": {"class_path": "rose_pl.data.datamodule.FeatureDataModule",
                 "init_args": {"data_file": str(data_file), "tokenizer": str(model_dir), "batch_size": 3, "max_seq_length": 64}},
        "return_predictions": False,
    }


@pytest.mark.slow
def test_ddp_predict_through_the_cli_writes_the_same_store_as_one_process(warm, tiny_model_dir, tmp_path):
    import subprocess
    import sys

    import yaml

    from rose_pl.features.store import FeatureStore

    root, pool, _ = warm
    stores = {}
    for devices in (1, 2):
        # The store folder may name module metadata fields: this one follows the checkpoint.
        template = tmp_path / f"store{devices}-epoch-{{checkpoint_epoch}}"
        out = tmp_path / f"store{devices}-epoch-2"
        cfg = tmp_path / f"predict{devices}.yaml"
        cfg.write_text(yaml.safe_dump(predict_config(template, root / "ckpt" / "epoch-2", pool, tiny_model_dir)))
        args = [sys.executable, "-m", "rose_pl", "predict", "--config", str(cfg), "--trainer.devices", str(devices)]
        if devices > 1:
            args += ["--trainer.strategy", "ddp"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        stores[devices] = FeatureStore.open(out)
    one, two = stores[1], stores[2]
    assert one.is_complete and two.is_complete
    assert one.meta == two.meta
    # Ranks batch different rows together: equal up to float rounding of different GEMM shapes.
    torch.testing.assert_close(torch.from_numpy(two.features().copy()), torch.from_numpy(one.features().copy()),
                               atol=1e-5, rtol=1e-4)


def test_dpo_features_with_the_reference_computed_once_equal_those_with_a_reference_pass_each(warm, tiny_model_dir,
                                                                                           tmp_path):
    """The base model's log-probs of every pair, computed once (ReferenceLogProbs + ReferenceWriter), give the same
    DPO gradients as the adapter-disabled reference pass DPOObjective otherwise runs at every checkpoint."""
    from rose_pl.features.reference import ReferenceLogProbs, ReferenceWriter

    root, _, prefs = warm
    dm = FeatureDataModule(str(prefs), str(tiny_model_dir), kind="preference", batch_size=2, max_seq_length=64,
                           max_prompt_length=32)
    trainer(callbacks=[ReferenceWriter(str(tmp_path / "reference"))]).predict(
        ReferenceLogProbs(str(tiny_model_dir)), datamodule=dm, return_predictions=False)
    for epoch in (1, 2):
        ckpt = root / "ckpt" / f"epoch-{epoch}"
        cached, _, _ = predict(ckpt, prefs, "preference", tiny_model_dir, objective=DPOObjective(beta=0.5),
                                   reference=str(tmp_path / "reference"))
        passes, _, _ = predict(ckpt, prefs, "preference", tiny_model_dir, objective=DPOObjective(beta=0.5))
        torch.testing.assert_close(cached, passes, atol=1e-6, rtol=1e-5)


def test_reference_log_probs_of_other_pairs_are_refused(warm, tiny_model_dir, tmp_path):
    from rose_pl.errors import DataFormatError
    from rose_pl.features.reference import ReferenceLogProbs, ReferenceWriter

    root, pool, prefs = warm
    other = tmp_path / "other.jsonl"
    other.write_text(Path(prefs).read_text().replace("good", "fine"))
    dm = FeatureDataModule(str(other), str(tiny_model_dir), kind="preference", batch_size=2, max_seq_length=64,
                           max_prompt_length=32)
    trainer(callbacks=[ReferenceWriter(str(tmp_path / "reference"))]).predict(
        ReferenceLogProbs(str(tiny_model_dir)), datamodule=dm, return_predictions=False)
    with pytest.raises(DataFormatError, match="reference log-probs of other data"):
        predict(root / "ckpt" / "epoch-1", prefs, "preference", tiny_model_dir, objective=DPOObjective(),
                reference=str(tmp_path / "reference"))


@pytest.mark.parametrize("kind,objective", [("sft", SFTObjective()), ("preference", DPOObjective(beta=0.5))])
def test_features_with_a_token_budget_equal_those_with_a_row_batch_size(warm, tiny_model_dir, kind, objective):
    root, pool, prefs = warm
    data = pool if kind == "sft" else prefs
    rows, _, _ = predict(root / "ckpt" / "epoch-2", data, kind, tiny_model_dir, objective=objective)
    for budget in (60, 200, 10000):
        packed, _, _ = predict(root / "ckpt" / "epoch-2", data, kind, tiny_model_dir, objective=objective,
                                    max_tokens_per_batch=budget, batch_size=64)
        torch.testing.assert_close(packed, rows, atol=ATOL, rtol=1e-4)
