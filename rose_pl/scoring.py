"""Scores of every method behind one interface, then selection, report and the side-by-side comparison.

Every method yields an `InfluenceResult` (scores, per-task scores, best task), so selection, the report
and the comparison treat ROSE, LESS, RDS, BM25 and random alike.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rose_pl.errors import ConfigError

if TYPE_CHECKING:
    from rose_pl.pipeline import Pipeline

log = logging.getLogger(__name__)

SCORES_DIR = "scores"
SELECTED_FILE = "selected.jsonl"


def example_text(example) -> str:
    """Plain text of a pool example for lexical matching (all turns, roles dropped)."""
    return "\n".join(m["content"] for m in example.messages)


def checkpoint_weights(train_dirs: list[Path]) -> list[float]:
    """eta_i of each checkpoint, read from the stores' metadata (recorded from the warmup manifest)."""
    from rose_pl.store import FeatureStore

    weights = []
    for d in train_dirs:
        meta = FeatureStore.open(d).meta
        lr = (meta.get("module") or {}).get("checkpoint_lr")
        if lr is None:
            raise ConfigError(f"{d}: store metadata has no checkpoint_lr; pass weights explicitly")
        weights.append(float(lr))
    return weights


def score_method(pipe: "Pipeline", method: str):
    """Scores of `method` for the run of `pipe`; returns (InfluenceResult, pool examples)."""
    from rose_pl.baselines import bm25_scores, random_scores
    from rose_pl.data.formats import read_instructions, read_preferences
    from rose_pl.influence import InfluenceResult, score_stores

    a = pipe.a
    pool = read_instructions(a.pool)
    val = read_preferences(a.validation, shots_per_task=a.shots_per_task)
    task_ids = [v.task for v in val]
    epochs = range(1, a.warmup.epochs + 1)
    if method in ("rose", "less"):
        side = "val_dpo" if method == "rose" else "val_sft"
        train_dirs = [pipe.feature_dir("train", e) for e in epochs]
        val_dirs = [pipe.feature_dir(side, e) for e in epochs]
        result = score_stores(train_dirs, val_dirs, task_ids, checkpoint_weights(train_dirs))
    elif method == "rds":
        result = score_stores([pipe.feature_dir("rds_train")], [pipe.feature_dir("rds_val")], task_ids, [1.0])
    elif method == "bm25":
        val_texts = [f"{v.prompt}\n{v.chosen}" for v in val]
        scores, per_task, tasks = bm25_scores([example_text(e) for e in pool], val_texts, task_ids)
        result = InfluenceResult(scores.astype(np.float32), per_task.astype(np.float32), per_task.argmax(1), tasks,
                                 np.ones(1), {"method": "bm25"})
    elif method == "random":
        scores = random_scores(len(pool), a.selection.seed).astype(np.float32)
        result = InfluenceResult(scores, scores[:, None], np.zeros(len(pool), dtype=np.int64), ["any"], np.ones(1),
                                 {"method": "random"})
    else:
        raise ConfigError(f"unknown method {method!r}")
    if result.num_rows != len(pool):
        raise ConfigError(f"{method}: {result.num_rows} scores for a pool of {len(pool)} rows ({a.pool})")
    return result, pool


def select_and_report(pipe: "Pipeline", method: str, result, pool) -> dict:
    """Save the run's scores of `method`, then select and report (see `write_selection_and_report`)."""
    from rose_pl.influence import save_scores

    a = pipe.a
    out = pipe.selection_dir(method)
    save_scores(out / SCORES_DIR, result, [e.id for e in pool], [e.dataset for e in pool],
                meta={"method": method, "pool": a.pool})
    return write_selection_and_report(
        out, result, pool, source=a.pool, fraction=a.selection.fraction, k=a.selection.k, seed=a.selection.seed,
        title=f"{method.upper()} selection", extra={"method": method, "validation": a.validation},
    )


def write_selection_and_report(out: Path, result, pool, *, source: str, fraction: float | None, k: int | None,
                               seed: int, title: str, extra: dict | None = None, report: bool = True) -> dict:
    """Select the top of `pool` by `result.scores`; write selected.jsonl (the pool's own rows), its sidecar
    and, unless `report` is False, report.md with plots into `out`. Returns a short summary."""
    from rose_pl.report import composition, write_report
    from rose_pl.selection import select, write_selection

    out = Path(out)
    ids = [e.id for e in pool]
    datasets = [e.dataset for e in pool]
    chosen = select(result.scores, fraction=fraction, k=k, seed=seed)
    write_selection([e.raw for e in pool], chosen, out / SELECTED_FILE, scores=result.scores, ids=ids,
                    datasets=datasets, fraction=fraction, k=k, seed=seed, source=source)
    if report:
        write_report(out, result.scores, chosen, datasets, ids, texts=[example_text(e) for e in pool],
                     best_task=result.best_task, tasks=result.tasks, title=title,
                     extra={"fraction": fraction, "k": k, "seed": seed, "pool": source, **(extra or {})})
    summary = {"selected": int(len(chosen)), "composition": composition(datasets, chosen)}
    log.info("%s: selected %d of %d into %s; composition %s", title, len(chosen), len(pool), out / SELECTED_FILE,
             summary["composition"])
    return summary


def write_comparison(pipe: "Pipeline") -> None:
    """compare.md / compare.json: each method's selection composition and evaluation side by side."""
    from rose_pl.atomic import atomic_write_json, atomic_write_text
    from rose_pl.report import comparison_table
    from rose_pl.selection import read_selection

    a = pipe.a
    rows = []
    for m in ["base", *a.methods]:
        row: dict = {"method": m}
        sel_file = pipe.selection_dir(m) / SELECTED_FILE
        if m != "base" and sel_file.is_file():
            sel = read_selection(sel_file)
            row["selected"] = sel["num_selected"]
            row["composition %"] = composition_of([r.get("dataset", "?") for r in sel["selected"]])
        ev = pipe.eval_file(m)
        if ev.is_file():
            metrics = json.loads(ev.read_text())["metrics"]
            row.update({k: metrics[k] for k in ("pref_accuracy", "reward_accuracy", "reward_margin", "sft_loss", "win_rate") if k in metrics})
        if len(row) > 1:
            rows.append(row)
    table = comparison_table(rows)
    atomic_write_json(pipe.p("compare.json"), rows)
    text = (
        "# Method comparison\n\n"
        f"Pool: `{a.pool}`; validation: `{a.validation}`; test: `{a.test}`; budget: "
        f"{a.selection.k if a.selection.k else f'{a.selection.fraction:.0%}'} of the pool.\n\n"
        "Composition is the share (%) of each source dataset in the selection. Evaluation is on held-out "
        "preference pairs: pref_accuracy = log pi(chosen) > log pi(rejected); reward_* use the DPO implicit "
        "reward against the base model.\n\n" + table + "\n"
    )
    atomic_write_text(pipe.p("compare.md"), text)
    print(text)


def composition_of(datasets: list[str]) -> dict[str, float]:
    """Share (%) of each source dataset among selected rows."""
    if not datasets:
        return {}
    values, counts = np.unique(np.asarray(datasets), return_counts=True)
    return {str(v): round(100.0 * c / len(datasets), 1) for v, c in zip(values, counts)}
