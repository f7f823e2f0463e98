"""The LoRA LightningModule, warmup checkpoints, and DDP equivalence."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from rose_pl.training.checkpoints import Manifest, WarmupCheckpoint, resolve_checkpoint
from rose_pl.config import LoRAArgs, OptimArgs
from rose_pl.data.datamodule import SFTDataModule
from rose_pl.errors import ConfigError
from rose_pl.training.model import LoRACausalLM, lr_lambda

TINY_LORA = LoRAArgs(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def write_pool(path: Path, n: int = 16) -> Path:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(words[(i + j) % 6] for j in range(2 + i % 3))
            answer = " ".join(words[(i * j) % 6] for j in range(3 + i % 4))
            f.write(json.dumps({"dataset": "toy" if i % 2 else "other", "id": f"r{i}", "messages": [
                {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}) + "\n")
    return path


def fit_tiny(tmp_path, model_dir, pool, epochs=2, batch_size=4, max_steps=-1):
    module = LoRACausalLM(model=str(model_dir), lora=TINY_LORA, optim=OptimArgs(lr=1e-2, warmup_ratio=0.0))
    data = SFTDataModule(train_file=str(pool), tokenizer=str(model_dir), batch_size=batch_size, max_seq_length=64)
    ckpt = WarmupCheckpoint(dirpath=str(tmp_path / "ckpt"))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, max_steps=max_steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[ckpt], enable_model_summary=False)
    pl.seed_everything(0)
    trainer.fit(module, datamodule=data)
    return module, trainer


def test_saved_adam_state_is_name_keyed_and_equals_the_optimizer(tmp_path, tiny_model_dir):
    pool = write_pool(tmp_path / "pool.jsonl")
    module, trainer = fit_tiny(tmp_path, tiny_model_dir, pool, epochs=2)
    manifest = Manifest.load(tmp_path / "ckpt")
    assert [c.epoch for c in manifest.checkpoints] == [1, 2]
    saved = manifest.get(2).load_optimizer_state()
    optimizer = trainer.optimizers[0]
    named = dict(module.model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert set(saved["state"]) == trainable
    for name in trainable:
        live = optimizer.state[named[name]]
        torch.testing.assert_close(saved["state"][name]["exp_avg"], live["exp_avg"])
        torch.testing.assert_close(saved["state"][name]["exp_avg_sq"], live["exp_avg_sq"])
        assert int(saved["state"][name]["step"]) == int(live["step"]) == trainer.global_step
    assert saved["hyper"]["betas"] == [0.9, 0.999] and saved["hyper"]["eps"] == 1e-8


def test_checkpoint_lr_is_the_mean_of_the_epochs_step_lrs(tmp_path, tiny_model_dir):
    pool = write_pool(tmp_path / "pool.jsonl")  # 16 rows, batch 4: 4 steps per epoch
    fit_tiny(tmp_path, tiny_model_dir, pool, epochs=2)
    manifest = Manifest.load(tmp_path / "ckpt")
    fn = lr_lambda(8, 0.0, "linear")
    expected = [sum(1e-2 * fn(s) for s in range(e * 4, e * 4 + 4)) / 4 for e in (0, 1)]
    assert [c.lr for c in manifest.checkpoints] == pytest.approx(expected)
    assert [c.steps for c in manifest.checkpoints] == [4, 4]


def test_saved_adapter_loads_back_with_peft_and_matches(tmp_path, tiny_model_dir):
    from peft import PeftModel

    from rose_pl.hub import load_causal_lm

    pool = write_pool(tmp_path / "pool.jsonl")
    module, _ = fit_tiny(tmp_path, tiny_model_dir, pool, epochs=1)
    manifest, info = resolve_checkpoint(tmp_path / "ckpt" / "epoch-1")
    assert resolve_checkpoint(f"{tmp_path / 'ckpt'}:1")[1].path == info.path
    loaded = PeftModel.from_pretrained(load_causal_lm(str(tiny_model_dir)), str(info.adapter_dir))
    live = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    for n, p in loaded.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p, live[n].detach())


def test_invalid_arguments_are_reported_together():
    with pytest.raises(ConfigError) as e:
        LoRACausalLM(lora=LoRAArgs(r=0, dropout=1.5), optim=OptimArgs(lr=-1))
    assert "lora.r" in str(e.value) and "lora.dropout" in str(e.value) and "optim.lr" in str(e.value)


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, lightning.pytorch as pl
    sys.path.insert(0, {tests!r})
    from test_model import TINY_LORA
    from rose_pl.training.model import LoRACausalLM
    from rose_pl.config import OptimArgs
    from rose_pl.training.checkpoints import WarmupCheckpoint
    from rose_pl.data.datamodule import SFTDataModule
    devices, batch, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    pl.seed_everything(0)
    module = LoRACausalLM(model={model!r}, lora=TINY_LORA, optim=OptimArgs(lr=1e-2, warmup_ratio=0.0))
    data = SFTDataModule(train_file={pool!r}, tokenizer={model!r}, batch_size=batch, max_seq_length=64,
                         group_by_length=True)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[WarmupCheckpoint(dirpath=out)])
    trainer.fit(module, datamodule=data)
""")


@pytest.mark.slow
def test_ddp_two_processes_train_the_same_adapter_as_one(tmp_path, tiny_model_dir):
    pool = write_pool(tmp_path / "pool.jsonl", n=16)
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), model=str(tiny_model_dir), pool=str(pool)))
    for devices, batch, out in ((1, 4, "one"), (2, 2, "two")):
        proc = subprocess.run([sys.executable, str(script), str(devices), str(batch), str(tmp_path / out)],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = Manifest.load(tmp_path / "one"), Manifest.load(tmp_path / "two")
    assert [c.steps for c in one.checkpoints] == [c.steps for c in two.checkpoints] == [4, 4]
    from safetensors.torch import load_file

    a = load_file(one.get(2).adapter_dir / "adapter_model.safetensors")
    b = load_file(two.get(2).adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    sa, sb = one.get(2).load_optimizer_state()["state"], two.get(2).load_optimizer_state()["state"]
    for k in sa:
        torch.testing.assert_close(sa[k]["exp_avg"], sb[k]["exp_avg"], rtol=1e-4, atol=1e-6)


class _Crash(Exception):
    pass


class _CrashAtEpoch(pl.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise _Crash()


def test_a_warmup_resumed_from_its_last_checkpoint_equals_an_uninterrupted_one(tmp_path, tiny_model_dir):
    from lightning.pytorch.callbacks import ModelCheckpoint

    pool = write_pool(tmp_path / "pool.jsonl")

    def fit(out, crash_at=None, ckpt_path=None):
        module = LoRACausalLM(model=str(tiny_model_dir), lora=TINY_LORA, optim=OptimArgs(lr=1e-2, warmup_ratio=0.25))
        data = SFTDataModule(train_file=str(pool), tokenizer=str(tiny_model_dir), batch_size=4, max_seq_length=64)
        callbacks = [WarmupCheckpoint(dirpath=str(out / "ckpt")),
                     ModelCheckpoint(dirpath=str(out / "resume"), save_last=True, save_top_k=1)]
        if crash_at is not None:
            callbacks.append(_CrashAtEpoch(crash_at))
        trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks)
        pl.seed_everything(0)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)

    fit(tmp_path / "whole")
    with pytest.raises(_Crash):
        fit(tmp_path / "killed", crash_at=2)
    last = tmp_path / "killed" / "resume" / "last.ckpt"
    assert last.is_file() and [c.epoch for c in Manifest.load(tmp_path / "killed" / "ckpt").checkpoints] == [1, 2]
    # The resume checkpoint holds the adapter, not the frozen base model.
    assert all("lora_" in k for k in torch.load(last, weights_only=False)["state_dict"])
    fit(tmp_path / "killed", ckpt_path=str(last))

    whole, resumed = Manifest.load(tmp_path / "whole" / "ckpt"), Manifest.load(tmp_path / "killed" / "ckpt")
    assert [c.lr for c in whole.checkpoints] == pytest.approx([c.lr for c in resumed.checkpoints])
    from safetensors.torch import load_file

    a = load_file(whole.get(3).adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.get(3).adapter_dir / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    sa, sb = whole.get(3).load_optimizer_state()["state"], resumed.get(3).load_optimizer_state()["state"]
    for k in sa:
        torch.testing.assert_close(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])
