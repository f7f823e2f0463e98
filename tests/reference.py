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


# --- BM25: the rank-bm25 implementation that rose_pl.selection.baselines.bm25_scores replaced (bm25s) ----------
# Kept as is (BM25Okapi + a postings loop over its per-document dictionaries) so the tests can check that the new
# implementation gives the same scores. rank-bm25 is a test-only dependency from here on.

import re as _re
from collections import Counter as _Counter, defaultdict as _defaultdict

import numpy as _np


def bm25_tokenize(text: str) -> list[str]:
    """Lowercased regex \\w+ tokens (the tokenizer rose_pl's BM25 uses on both sides)."""
    return _re.findall(r"\w+", text.lower(), _re.UNICODE)


def rank_bm25_scores(pool_texts, val_texts, task_ids, k1=1.5, b=0.75, epsilon=0.25):
    """(scores (N,), per_task (N, T), tasks): per_task[:, j] = mean over task j's validation texts of
    rank_bm25.BM25Okapi(pool).get_scores(query), scores = max over the (sorted) tasks. Computed from the index's
    postings (each distinct query token once), which equals averaging get_scores per query."""
    from rank_bm25 import BM25Okapi

    tasks = sorted(set(task_ids))
    inverse = _np.asarray([tasks.index(t) for t in task_ids], dtype=_np.int64)
    bm25 = BM25Okapi([bm25_tokenize(t) for t in pool_texts], k1=k1, b=b, epsilon=epsilon)
    n, num_tasks = bm25.corpus_size, len(tasks)
    sizes = _np.bincount(inverse, minlength=num_tasks).astype(_np.float64)
    weight = _defaultdict(lambda: _np.zeros(num_tasks))
    for text, t in zip(val_texts, inverse):
        for tok, count in _Counter(bm25_tokenize(text)).items():
            weight[tok][t] += count / sizes[t]
    vocab = set(weight)
    docs, tfs = _defaultdict(list), _defaultdict(list)
    for d, freqs in enumerate(bm25.doc_freqs):
        shared = (t for t in vocab if t in freqs) if len(freqs) > len(vocab) else (t for t in freqs if t in vocab)
        for tok in shared:
            docs[tok].append(d)
            tfs[tok].append(freqs[tok])
    doc_len = _np.asarray(bm25.doc_len, dtype=_np.float64)
    norm = bm25.k1 * (1 - bm25.b + bm25.b * doc_len / bm25.avgdl)
    per_task = _np.zeros((n, num_tasks), dtype=_np.float64)
    for tok in sorted(docs):
        d, tf = _np.asarray(docs[tok], dtype=_np.int64), _np.asarray(tfs[tok], dtype=_np.float64)
        idf = bm25.idf.get(tok) or 0  # the lookup rank_bm25.get_scores does
        per_task[d] += (idf * tf * (bm25.k1 + 1) / (tf + norm[d]))[:, None] * weight[tok][None, :]
    return per_task.max(axis=1), per_task, tasks
