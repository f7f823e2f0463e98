"""rose_pl in someone else's Lightning project: their model, optimizer state and data, each result against an
independent batch-size-1 reference (a backward per row, the Adam direction by hand)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

from rose_pl import (AdamDirection, GradientFeatureModule, IndexedData, compute_exact_scores, compute_features,
                     compute_task_means)
from rose_pl.errors import CheckpointError, ConfigError
from rose_pl.features.store import FeatureStoreWriter
from rose_pl.testing import random_sft_batch, save_tiny_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_project"
sys.path.insert(0, str(EXAMPLE))

from my_project.data import MyData, pad  # noqa: E402
from my_project.flow import KEYS, SIDE, exact_selection, projected_scores, warmup  # noqa: E402
from my_project.model import MyLM  # noqa: E402
from my_project.objective import SummedAnswerLoss  # noqa: E402

POOL = str(EXAMPLE / "data" / "pool.jsonl")
VALIDATION = str(EXAMPLE / "data" / "validation.jsonl")


def rows(batch: dict) -> list[dict]:
    """A padded batch as a list of unpadded rows in the project's own key names."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        out.append({"ids": batch["input_ids"][i, :n], "target": batch["labels"][i, :n]})
    return out


def row_grads(model, data: list[dict], names: list[str], summed: bool = False) -> torch.Tensor:
    """(rows, params) gradients of each row's loss, one backward per row, float64-accumulated flat vectors."""
    params = dict(model.named_parameters())
    out = []
    for x in data:
        logits = model(input_ids=x["ids"][None]).logits[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits, x["target"][1:], ignore_index=-100,
                                                 reduction="sum" if summed else "mean")
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        out.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(out)


def adam(grads: torch.Tensor, m: torch.Tensor, v: torch.Tensor, betas, eps) -> torch.Tensor:
    """LESS's direction m' / sqrt(v' + eps), by hand, in float64."""
    m2 = betas[0] * m + (1 - betas[0]) * grads
    v2 = betas[1] * v + (1 - betas[1]) * grads ** 2
    return m2 / torch.sqrt(v2 + eps)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data():
    return rows(random_sft_batch([10, 7, 12, 5, 9, 8], [3, 2, 4, 1, 2, 2], seed=1))


def test_features_of_a_plain_hf_model_with_no_warmup_equal_a_backward_per_row(tmp_path, data):
    from rose_pl.testing import tiny_llama

    chosen = ["*q_proj.weight", "*mlp.down_proj.weight"]
    store = compute_features(tiny_llama(), data, tmp_path / "plain", projector=None, batch_size=4,
                             collate_fn=pad, keys=KEYS, parameters=chosen, device="cpu")
    reference = tiny_llama()
    names = [n for n, _ in reference.named_parameters() if n.endswith(("q_proj.weight", "mlp.down_proj.weight"))]
    expected = row_grads(reference, data, names)
    torch.testing.assert_close(torch.from_numpy(np.asarray(store.features())).double(), expected, atol=1e-6, rtol=1e-5)


def _trained(model_dir, data, steps: int = 3):
    """MyLM trained a few steps by its own Lightning loop; returns (module, its live optimizer)."""
    pl.seed_everything(0)
    module = MyLM(str(model_dir))
    for name, p in module.net.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: every A gradient would be zero
            torch.nn.init.normal_(p, std=0.05)
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=pad)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)
    return module, trainer.optimizers[0]


def test_adam_direction_from_a_live_optimizer_equals_the_direction_by_hand(tmp_path, model_dir, data):
    module, optimizer = _trained(model_dir, data)
    peft_model = module.net
    store = compute_features(peft_model, data, tmp_path / "live", projector=None, batch_size=4, collate_fn=pad,
                             keys=KEYS, transform=AdamDirection.from_optimizer(optimizer, peft_model), device="cpu")
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    by_param = {p: n for n, p in peft_model.named_parameters()}
    state = {by_param[p]: s for p, s in optimizer.state.items()}
    m = torch.cat([state[n]["exp_avg"].reshape(-1) for n in names]).double()
    v = torch.cat([state[n]["exp_avg_sq"].reshape(-1) for n in names]).double()
    group = optimizer.param_groups[0]
    expected = adam(row_grads(peft_model, data, names), m, v, group["betas"], group["eps"])
    torch.testing.assert_close(torch.from_numpy(np.asarray(store.features())).double(), expected, rtol=1e-4, atol=1e-5)
    assert store.meta["module"]["model"] == f"<{type(peft_model).__name__}>"


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory, model_dir, data):
    """A LESS/ROSE-style warmup: transformers.Trainer on a LoRA model, a checkpoint-N folder per epoch."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    train = [{"input_ids": x["ids"], "labels": x["target"]} for x in data]
    out = tmp_path_factory.mktemp("trainer")
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=1, num_train_epochs=2,
                             save_strategy="epoch", learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=train).train()
    return out / "checkpoint-12"


def test_a_hugging_face_trainer_checkpoint_folder_gives_the_direction_by_hand(tmp_path, model_dir, data,
                                                                               trainer_checkpoint):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = GradientFeatureModule(str(model_dir), transform=AdamDirection(), checkpoint=str(trainer_checkpoint))
    store = compute_features(module, data, tmp_path / "hf", projector=None, batch_size=4, collate_fn=pad, keys=KEYS,
                             device="cpu")
    # The reference reads the files itself: the adapter, torch's index-keyed optimizer state (Trainer puts every
    # LoRA matrix in one group, in named_parameters order), the lr log of trainer_state.json.
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(trainer_checkpoint),
                                          is_trainable=True)
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    saved = torch.load(trainer_checkpoint / "optimizer.pt", weights_only=True)
    order = saved["param_groups"][0]["params"]
    m = torch.cat([saved["state"][i]["exp_avg"].reshape(-1) for i in order]).double()
    v = torch.cat([saved["state"][i]["exp_avg_sq"].reshape(-1) for i in order]).double()
    group = saved["param_groups"][0]
    expected = adam(row_grads(reference, data, names), m, v, group["betas"], group["eps"])
    torch.testing.assert_close(torch.from_numpy(np.asarray(store.features())).double(), expected, rtol=1e-4, atol=1e-5)
    history = json.loads((trainer_checkpoint / "trainer_state.json").read_text())["log_history"]
    lrs = [e["learning_rate"] for e in history if "learning_rate" in e and 1 < e["epoch"] <= 2]
    meta = store.meta["module"]
    assert meta["checkpoint_kind"] == "hf_trainer" and meta["checkpoint_epoch"] == 2
    assert meta["checkpoint_lr"] == pytest.approx(sum(lrs) / len(lrs))


def test_the_example_project_runs_end_to_end(tmp_path, model_dir):
    """The example's own module trained with rose_pl's WarmupCheckpoint, exact and projected scoring, a selection."""
    model = str(model_dir)
    manifest = warmup(model, POOL, tmp_path, epochs=2)
    assert [c.epoch for c in manifest.checkpoints] == [1, 2] and manifest.base_model == model
    assert manifest.lora["r"] == 4 and manifest.lora["target_modules"] == ["q_proj", "v_proj"]
    result, chosen = exact_selection(model, POOL, VALIDATION, tmp_path, manifest)
    assert result.tasks == ["code", "kitchen"] and len(chosen) == 4
    pool = [json.loads(line) for line in open(POOL) if line.strip()]
    selected = [json.loads(line) for line in (tmp_path / "selected.jsonl").read_text().splitlines()]
    assert selected == [pool[i] for i in chosen]  # the project's own rows, best first
    projected = projected_scores(model, POOL, VALIDATION, tmp_path, manifest)
    # A cosine projected to d dims errs by about sqrt(2 / d) (JL); the tiny model's rows differ by less than that,
    # so their order is not compared, only the scores.
    error = projected.per_task - result.per_task
    assert projected.tasks == result.tasks and np.sqrt(np.mean(error ** 2)) < 2 * np.sqrt(2 / 1024)


def test_the_example_yaml_runs_by_class_path_and_equals_the_python_flow(tmp_path, model_dir):
    model = str(model_dir)
    manifest = warmup(model, POOL, tmp_path / "py", epochs=1)
    ckpt = str(manifest.checkpoints[0].path)
    python = compute_features(model, IndexedData(MyData(POOL, model, shuffle=False), keys=KEYS),
                              tmp_path / "py" / "train", transform=AdamDirection(), checkpoint=ckpt, dim=1024,
                              device="cpu")
    config = yaml.safe_load((EXAMPLE / "predict.yaml").read_text())
    config["model"]["init_args"]["checkpoint"] = ckpt
    config["data"]["init_args"]["data"]["init_args"].update(path=POOL, tokenizer=model)
    config["trainer"]["callbacks"][1]["init_args"]["output_dir"] = str(tmp_path / "yaml" / "train")
    (tmp_path / "predict.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE)}
    done = subprocess.run([sys.executable, "-m", "rose_pl", "predict", "--config", str(tmp_path / "predict.yaml")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from rose_pl.features.store import FeatureStore

    yaml_store = FeatureStore.open(tmp_path / "yaml" / "train")
    np.testing.assert_array_equal(np.asarray(yaml_store.features()), np.asarray(python.features()))


class Bare(pl.LightningModule):
    """A module that keeps none of the feature contract."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def predict_step(self, batch, batch_idx):
        return batch


class BareData(pl.LightningDataModule):
    def predict_dataloader(self):
        return torch.utils.data.DataLoader([torch.zeros(2)])


def test_a_module_and_data_without_the_contract_fail_at_setup_listing_every_member(tmp_path):
    out = tmp_path / "never"
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False,
                         callbacks=[FeatureStoreWriter(str(out))], default_root_dir=str(tmp_path))
    with pytest.raises(ConfigError) as info:
        trainer.predict(Bare(), datamodule=BareData(), return_predictions=False)
    text = str(info.value)
    for member in ("feature_metadata", "feature_dim", "num_examples", "fingerprint", "skip_indices"):
        assert member in text
    assert not out.exists()


def test_task_means_need_task_ids_and_say_so_before_writing(tmp_path, model_dir, data):
    from rose_pl.testing import tiny_llama

    with pytest.raises(ConfigError, match="task_ids"):
        compute_task_means(tiny_llama(), IndexedData(data, collate_fn=pad, keys=KEYS), tmp_path / "m", side="s",
                           parameters=["*q_proj.weight"], device="cpu")
    assert not (tmp_path / "m").exists()


def test_adam_state_that_misses_parameters_names_every_one(tmp_path, model_dir, data):
    module, optimizer = _trained(model_dir, data)
    state = {n: {"exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
             for n, p in module.net.named_parameters() if p.requires_grad and "v_proj" in n}
    transform = AdamDirection.from_state_dict({"state": state, "hyper": {"betas": [0.9, 0.999], "eps": 1e-8}})
    with pytest.raises(CheckpointError) as info:
        compute_features(module.net, data, tmp_path / "x", projector=None, collate_fn=pad, keys=KEYS,
                         transform=transform, device="cpu")
    text = str(info.value)
    assert "q_proj" in text and "no Adam state" in text and "has shape (2,)" in text
    assert text.count("layers.0.self_attn.q_proj.lora_A") == 1


def test_warmup_checkpoint_on_a_module_without_peft_fails_before_writing(tmp_path):
    from rose_pl import WarmupCheckpoint

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[WarmupCheckpoint(str(tmp_path / "ckpt"))])
    with pytest.raises(CheckpointError, match="exactly one peft model"):
        trainer.fit(Plain(), train_dataloaders=torch.utils.data.DataLoader([torch.ones(2)] * 4))
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("command", ["predict", "fit"])
def test_lightning_commands_write_nothing_into_the_working_directory(tmp_path, model_dir, command):
    """No default_root_dir in the config: Lightning's own files go beside the stage's outputs, not into the cwd."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "config.yaml").write_text("mine: true\n")  # the user's own file, never replaced
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"answer {i}"}) + "\n" for i in range(4)))
    out = tmp_path / "outputs"
    if command == "fit":
        config = {"trainer": {"accelerator": "cpu", "max_epochs": 1, "enable_progress_bar": False,
                              "callbacks": [{"class_path": "rose_pl.training.checkpoints.WarmupCheckpoint",
                                             "init_args": {"dirpath": str(out / "checkpoints")}}]},
                  "model": {"class_path": "rose_pl.training.model.LoRACausalLM",
                            "init_args": {"model": str(model_dir), "lora": {"r": 2, "alpha": 4, "dropout": 0.0,
                                                                            "target_modules": ["q_proj"]}}},
                  "data": {"class_path": "rose_pl.data.datamodule.SFTDataModule",
                           "init_args": {"train_file": str(pool), "tokenizer": str(model_dir), "max_seq_length": 64}}}
    else:
        config = {"trainer": {"accelerator": "cpu", "inference_mode": False, "enable_progress_bar": False,
                              "callbacks": [{"class_path": "rose_pl.features.projection.ProjectionCallback",
                                             "init_args": {"dim": 16}},
                                            {"class_path": "rose_pl.features.store.FeatureStoreWriter",
                                             "init_args": {"output_dir": str(out / "features")}}]},
                  "model": {"class_path": "rose_pl.features.module.GradientFeatureModule",
                            "init_args": {"model": str(model_dir), "parameters": ["*q_proj.weight"]}},
                  "data": {"class_path": "rose_pl.data.datamodule.FeatureDataModule",
                           "init_args": {"data_file": str(pool), "tokenizer": str(model_dir), "max_seq_length": 64}},
                  "return_predictions": False}
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump(config))
    before = sorted(p.name for p in cwd.iterdir())
    done = subprocess.run([sys.executable, "-m", "rose_pl", command, "--config", str(tmp_path / "stage.yaml")],
                          capture_output=True, text=True, cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in cwd.iterdir()) == before and (cwd / "config.yaml").read_text() == "mine: true\n"
    assert out.exists()


def test_the_reuse_page_shows_the_example_code_and_uses_only_exported_names():
    import re

    import rose_pl

    page = (Path(__file__).resolve().parents[1] / "docs" / "reuse.md").read_text()
    imported = set()
    for names in re.findall(r"from rose_pl import \(?([^)]*?)\)?\n(?!\s)", page):
        imported |= {n.strip() for n in re.sub(r"#.*", "", names).replace("\n", ",").split(",") if n.strip()}
    assert imported and imported <= set(rose_pl.__all__), imported - set(rose_pl.__all__)
    source = {line.strip() for f in (EXAMPLE / "my_project").glob("*.py") for line in f.read_text().splitlines()}
    for block in re.findall(r"```python\n(.*?)```", page, re.S):
        if "class MyLM" in block or "class SummedAnswerLoss" in block or "compute_task_means(model" in block:
            shown = [line.strip() for line in block.splitlines() if line.strip() and line.strip() != "..."]
            assert [line for line in shown if line not in source] == []
