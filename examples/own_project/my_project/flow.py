"""The project's selection flow with rose_pl's pieces, in Python, no YAML:

1. train the project's own MyLM with rose_pl's WarmupCheckpoint (per epoch: adapter, Adam state, mean lr);
2. per checkpoint, exact scoring: the task means of the validation side's gradients under the project's own
   objective, then one pass over the pool with the Adam direction (IndexedData wraps the project's data and
   renames its keys to rose_pl's);
3. ROSE/LESS Eq. 7 over the checkpoints, the top of the pool, written with rose_pl's selection writer.

    python -m my_project.flow --model embedded:smollm2-135m-instruct --out runs/example
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl

from my_project.data import MyData
from my_project.model import MyLM
from my_project.objective import SummedAnswerLoss
from rose_pl import (AdamDirection, IndexedData, Manifest, WarmupCheckpoint, compute_exact_scores,
                     compute_features, compute_task_means, exact_scores, score_stores, select, write_selection)
from rose_pl.hub import resolve_model_path

HERE = Path(__file__).resolve().parents[1]
KEYS = {"ids": "input_ids", "mask": "attention_mask", "target": "labels"}
"""The project's batch keys -> rose_pl's."""
SIDE = "answer_sum"
"""The name of this validation side (score columns are <side>/<task>)."""


def warmup(model: str, pool: str, out: Path, epochs: int = 2) -> Manifest:
    """Train MyLM on the pool; rose_pl's WarmupCheckpoint saves a checkpoint per epoch into out/warmup."""
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
                         callbacks=[WarmupCheckpoint(str(out / "warmup"), base_model=model)])
    trainer.fit(MyLM(model), datamodule=MyData(pool, model))
    return Manifest.load(out / "warmup")


def pool_data(pool: str, model: str) -> IndexedData:
    return IndexedData(MyData(pool, model, shuffle=False), keys=KEYS)


def validation_data(validation: str, model: str) -> IndexedData:
    data = MyData(validation, model, shuffle=False)
    data.setup()
    return IndexedData(data, keys=KEYS, task_ids=data.rows.tasks)


def exact_selection(model: str, pool: str, validation: str, out: Path, manifest: Manifest, fraction: float = 0.25):
    """Exact scores (no projection) at every checkpoint, Eq. 7, the top `fraction` written to out/selected.jsonl."""
    stores = []
    for ckpt in manifest.checkpoints:
        means = compute_task_means(model, validation_data(validation, model), out / "means" / f"epoch-{ckpt.epoch}",
                                   side=SIDE, objective=SummedAnswerLoss(), checkpoint=str(ckpt.path), device="cpu")
        store = compute_exact_scores(model, pool_data(pool, model), out / "exact" / f"epoch-{ckpt.epoch}",
                                     means=[means.path], transform=AdamDirection(), checkpoint=str(ckpt.path),
                                     device="cpu")
        stores.append(store.path)
    result = exact_scores(stores, SIDE)  # weights: each checkpoint's mean learning rate, recorded in the stores
    chosen = select(result.scores, fraction=fraction)
    rows = [json.loads(line) for line in open(pool, encoding="utf-8") if line.strip()]
    write_selection(rows, chosen, out / "selected.jsonl", scores=result.scores, fraction=fraction, source=pool)
    return result, chosen


def projected_scores(model: str, pool: str, validation: str, out: Path, manifest: Manifest, dim: int = 1024):
    """The same with 1024-dim CountSketch features (the paper's way, at a small dim): stores per checkpoint."""
    val = validation_data(validation, model)
    train, valid = [], []
    for ckpt in manifest.checkpoints:
        train.append(compute_features(model, pool_data(pool, model), out / "features" / "train" / f"epoch-{ckpt.epoch}",
                                      transform=AdamDirection(), checkpoint=str(ckpt.path), dim=dim, device="cpu").path)
        valid.append(compute_features(model, val, out / "features" / SIDE / f"epoch-{ckpt.epoch}",
                                      objective=SummedAnswerLoss(), checkpoint=str(ckpt.path), dim=dim,
                                      device="cpu").path)
    return score_stores(train, valid, val.task_ids, device="cpu")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--pool", default=str(HERE / "data" / "pool.jsonl"))
    parser.add_argument("--validation", default=str(HERE / "data" / "validation.jsonl"))
    parser.add_argument("--out", default="runs/example")
    args = parser.parse_args(argv)
    model = resolve_model_path(args.model)  # the embedded default as a local folder for transformers
    out = Path(args.out)
    manifest = warmup(model, args.pool, out)
    result, chosen = exact_selection(model, args.pool, args.validation, out, manifest)
    print(f"selected {len(chosen)} of {result.num_rows} rows into {out / 'selected.jsonl'}; tasks {result.tasks}")


if __name__ == "__main__":
    main()
