"""`compare.md` / `compare.json`: every target's methods side by side, and which method wins where."""

from __future__ import annotations

import math

from rose_pl.config import RunArgs
from rose_pl.evaluation.metrics import EvaluationResult
from rose_pl.files import atomic_write_json, atomic_write_text, jsonable
from rose_pl.layout import BASE, RunLayout
from rose_pl.selection.report import comparison_table, composition
from rose_pl.selection.select import read_selection, selection_meta_path

METRICS = ("pref_accuracy", "reward_accuracy", "reward_margin", "sft_loss", "win_rate", "tie_rate", "loss_rate")
"""Evaluation metrics shown in the comparison (where a test set gives them)."""
RANKED = ("pref_accuracy", "reward_accuracy", "reward_margin", "win_rate")
"""Metrics the cross-target summary ranks methods by (higher is better for each)."""


def _target_rows(layout: RunLayout, methods: list[str], target: str) -> list[dict]:
    L, rows = layout, []
    for method in [BASE, *methods]:
        row: dict = {"method": method}
        selected = L.selected(target, method)
        if method != BASE and selection_meta_path(selected).is_file():
            sidecar = read_selection(selected)
            row["selected"] = sidecar["num_selected"]
            shares = composition([r.get("dataset", "?") for r in sidecar["selected"]])
            row["composition %"] = {k: round(v, 1) for k, v in shares.items()}
        evaluation = L.evaluation(target, method)
        if evaluation.is_file():
            metrics = EvaluationResult.read_json(evaluation).metrics
            row.update({k: metrics[k] for k in METRICS if k in metrics})
            ci = metrics.get("win_rate_ci") or []
            if len(ci) == 2 and None not in ci:
                row["win_rate 95% CI"] = "[{:.3f}, {:.3f}]".format(*ci)
        if len(row) > 1:
            rows.append(row)
    # Every selection gets every source, in name order: the table's columns line up.
    sources = sorted({k for r in rows for k in r.get("composition %", {})})
    for r in rows:
        if "composition %" in r:
            r["composition %"] = {k: r["composition %"].get(k, 0.0) for k in sources}
    return rows


def _winners(sections: dict[str, list[dict]]) -> list[dict]:
    """Per target and metric: the best method, its value, and the base model's value."""
    out = []
    for target, rows in sections.items():
        base = next((r for r in rows if r["method"] == BASE), {})
        for metric in RANKED:
            scored = [(r[metric], r["method"]) for r in rows
                      if r["method"] != BASE and isinstance(r.get(metric), (int, float)) and not math.isnan(r[metric])]
            if not scored:
                continue
            value, method = max(scored)
            ties = sorted(m for v, m in scored if v == value)
            out.append({"target": target, "metric": metric, "best": ", ".join(ties), "value": value,
                        "base": base.get(metric)})
    return out


def write_comparison(args: RunArgs, methods: list[str], scoring: str) -> None:
    """Write compare.json and compare.md for every target of the run (`methods`: the run's method names)."""
    a, L, targets = args, RunLayout(args.output_dir), args.all_targets()
    sections = {t: _target_rows(L, methods, t) for t in targets}
    winners = _winners(sections)
    atomic_write_json(L.compare_json, jsonable({"targets": sections, "winners": winners}, nan_as_null=True),
                      allow_nan=False, sort_keys=False)
    parts = ["# Method comparison", "",
             f"Pool: `{a.pool}`. Composition is the share (%) of each source dataset in a selection. On preference test "
             "sets, pref_accuracy = log pi(chosen) > log pi(rejected) and reward_* use the DPO implicit reward against "
             "the base model; on golden-answer test sets, win_rate is the judge's verdict against the golden answer.", ""]
    for target, rows in sections.items():
        t, sel = targets[target], a.selection_of(targets[target])
        budget = f"{sel.k} rows" if sel.k else f"{sel.fraction:.0%} of the pool"
        parts += [f"## Target `{target}`", "",
                  f"Validation: `{t.validation}`; test: `{t.test}`; budget: {budget}; scoring: {scoring}.", "",
                  comparison_table(rows) or "No result yet.", ""]
    if winners:
        parts += ["## Which method wins where", "", comparison_table(winners), ""]
    atomic_write_text(L.compare_md, "\n".join(parts))
