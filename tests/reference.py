"""Independent references for the gradient tests: a tiny warmup run, and per-sample gradients by one backward
pass per example (the LESS-style loop the batched code must equal)."""

import json
from pathlib import Path

import lightning.pytorch as pl
import torch

from rose_pl.config import LoRAArgs, OptimArgs
from rose_pl.data.datamodule import SFTDataModule
from rose_pl.hub import load_causal_lm
from rose_pl.training.checkpoints import WarmupCheckpoint
from rose_pl.training.model import LoRACausalLM

LORA = LoRAArgs(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def trainer(**kw):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, **kw)


def write_warmup_data(root: Path) -> tuple[Path, Path]:
    """10 pool rows in two datasets, and 5 preference pairs in two tasks of unequal size, in shuffled order."""
    pool, prefs = root / "pool.jsonl", root / "prefs.jsonl"
    with open(pool, "w") as f:
        for i in range(10):
            f.write(json.dumps({"dataset": "a" if i < 5 else "b", "id": f"p{i}", "messages": [
                {"role": "user", "content": "question " + "x" * (i % 4 + 1)},
                {"role": "assistant", "content": "answer " + "y" * (3 + 2 * i)}]}) + "\n")
    with open(prefs, "w") as f:
        for i, task in enumerate(["t0", "t1", "t0", "t1", "t0"]):
            f.write(json.dumps({"id": f"v{i}", "task": task, "prompt": "ask " + "q" * i,
                                "chosen": "good " + "g" * (i + 2), "rejected": "bad " + "b" * (2 * i + 1)}) + "\n")
    return pool, prefs


def warmup(root: Path, model_dir: Path) -> tuple[Path, Path, Path]:
    """A 2-epoch AdamW warmup of the tiny model: (checkpoint folder, pool file, preference file)."""
    pool, prefs = write_warmup_data(root)
    module = LoRACausalLM(model=str(model_dir), lora=LORA, optim=OptimArgs(lr=1e-2, warmup_ratio=0.0))
    data = SFTDataModule(train_file=str(pool), tokenizer=str(model_dir), batch_size=2, max_seq_length=64)
    pl.seed_everything(0)
    trainer(max_epochs=2, callbacks=[WarmupCheckpoint(dirpath=str(root / "ckpt"))]).fit(module, datamodule=data)
    return root / "ckpt", pool, prefs


def peft_from(ckpt_dir: Path, model_dir: Path):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(str(model_dir)), str(Path(ckpt_dir) / "adapter"), is_trainable=True)
    return model.eval()


def all_rows(dm) -> dict:
    """Every predict batch of a FeatureDataModule merged into one batch, in row-index order."""
    batches = list(dm.predict_dataloader())
    keys = [k for k in batches[0] if torch.is_tensor(batches[0][k])]
    width = max(b["input_ids" if "input_ids" in b else "chosen_input_ids"].shape[1] for b in batches)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) if t.dim() == 2 else t

    fill = {"labels": -100, "attention_mask": 0}
    merged = {k: torch.cat([pad(b[k], next((v for s, v in fill.items() if k.endswith(s)), 0)) for b in batches])
              for k in keys}
    order = merged["index"].argsort()
    return {k: v[order] for k, v in merged.items()}


def single_example_grads(model, objective, batch) -> torch.Tensor:
    """One backward pass per example; gradients flattened in named_parameters order: (N, params)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(batch["index"].numel()):
        one = {k: v[i: i + 1] for k, v in batch.items() if torch.is_tensor(v) and k != "index"}
        loss = objective(model, one).losses.sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)
