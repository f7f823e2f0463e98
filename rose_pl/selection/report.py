"""A Markdown report with PNG plots for one selection, and a Markdown table comparing selection methods.

Plots are drawn on `matplotlib.figure.Figure` objects, which render with the Agg canvas without touching
pyplot's global backend, so importing this module never changes a caller's matplotlib state.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from rose_pl.errors import ConfigError

REPORT_FILE = "report.md"
SCORES_PLOT = "scores.png"
DATASET_PLOT = "composition_dataset.png"
TASK_PLOT = "composition_task.png"

_POOL_COLOR, _SELECTED_COLOR = "#9aa5b1", "#d1495b"


def _md(text: Any, limit: int | None = None) -> str:
    """One table cell: single line, pipes escaped, cut to `limit` characters."""
    s = " ".join(str(text).split())
    if limit is not None and len(s) > limit:
        s = s[:limit].rstrip() + "…"
    return s.replace("|", "\\|")


def composition(labels: Sequence[str], selected: Sequence[int] | np.ndarray | None = None) -> dict[str, float]:
    """Percentage of each label among `selected` rows (all rows if None), largest first."""
    labels = list(labels)
    chosen = [labels[i] for i in np.asarray(selected, dtype=np.int64)] if selected is not None else labels
    counts = Counter(chosen)
    total = max(1, len(chosen))
    return {k: 100.0 * v / total for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def _codes(labels) -> tuple[np.ndarray, list[str]]:
    """(one code per row, the names): labels given as a list of names, or as (codes, names) already."""
    if isinstance(labels, tuple):
        return np.asarray(labels[0], dtype=np.int64), list(labels[1])
    names = sorted(set(labels))
    lookup = {n: i for i, n in enumerate(names)}
    return np.asarray([lookup[x] for x in labels], dtype=np.int64), names


def _composition_rows(labels, selected: np.ndarray) -> list[tuple[str, int, float, int, float]]:
    """Per label: pool rows, pool %, selected rows, selected %; counted over codes (no per-row Python objects)."""
    codes, names = _codes(labels)
    pool = np.bincount(codes, minlength=len(names))
    sel = np.bincount(codes[selected], minlength=len(names)) if len(selected) else np.zeros(len(names), np.int64)
    n_pool, n_sel = max(1, len(codes)), max(1, len(selected))
    order = sorted((k for k in range(len(names)) if pool[k]), key=lambda k: (-pool[k], names[k]))
    return [(names[k], int(pool[k]), 100.0 * pool[k] / n_pool, int(sel[k]), 100.0 * sel[k] / n_sel) for k in order]


def _composition_table(rows: list[tuple[str, int, float, int, float]], what: str) -> str:
    lines = [f"| {what} | pool rows | pool % | selected rows | selected % |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {_md(k)} | {p} | {pp:.1f} | {s} | {sp:.1f} |" for k, p, pp, s, sp in rows]
    return "\n".join(lines)


def _plot_scores(path: Path, scores: np.ndarray, selected: np.ndarray, title: str) -> None:
    finite = scores[np.isfinite(scores)]
    edges = np.histogram_bin_edges(finite, bins=60) if finite.size else np.linspace(0, 1, 2)
    threshold = float(np.min(scores[selected])) if selected.size else None
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    ax.hist(finite, bins=edges, color=_POOL_COLOR, label=f"pool (n={scores.size})")
    ax.hist(scores[selected], bins=edges, color=_SELECTED_COLOR, label=f"selected (n={selected.size})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.4g}")
    ax.set_yscale("log")  # the selected tail is a few percent of the pool: invisible on a linear axis
    ax.set_xlabel("score")
    ax.set_ylabel("rows (log scale)")
    ax.set_title(title)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)


def _plot_composition(path: Path, rows: list[tuple[str, int, float, int, float]], what: str) -> None:
    names = [r[0] for r in rows]
    y = np.arange(len(rows))
    fig = Figure(figsize=(7, 1.2 + 0.45 * len(rows)), dpi=120)
    ax = fig.add_subplot()
    h = 0.4
    ax.barh(y - h / 2, [r[2] for r in rows], height=h, color=_POOL_COLOR, label="pool")
    bars = ax.barh(y + h / 2, [r[4] for r in rows], height=h, color=_SELECTED_COLOR, label="selected")
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r[4]:.1f}% ({r[3]})", (bar.get_width(), bar.get_y() + h / 2), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(y, labels=[_md(n, 40) for n in names])
    ax.invert_yaxis()  # largest pool share on top, as in the table
    ax.set_xlabel("% of rows")
    ax.set_xlim(0, max([r[2] for r in rows] + [r[4] for r in rows] + [1.0]) * 1.25)
    ax.set_title(f"Composition by {what}")
    ax.legend(frameon=False, loc="best")
    fig.tight_layout()
    fig.savefig(path)


def _examples_table(rows: Sequence[int], ranks: dict[int, int], ids, dataset_of, scores, texts: dict | None,
                    chars: int) -> str:
    head = "| rank | id | dataset | score |" + (" prompt |" if texts is not None else "")
    lines = [head, "|---:|---|---|---:|" + ("---|" if texts is not None else "")]
    for i in rows:
        cells = [str(ranks[i] + 1), _md(ids[i]), _md(dataset_of(i)), f"{scores[i]:.4g}"]
        if texts is not None:
            cells.append(_md(texts[i], chars))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    out_dir: str | os.PathLike,
    scores: np.ndarray,
    selected: Sequence[int] | np.ndarray,
    datasets,
    ids,
    texts=None,
    best_task: np.ndarray | None = None,
    tasks: Sequence[str] | None = None,
    title: str = "Selection report",
    extra: dict[str, Any] | None = None,
    top_n: int = 5,
    text_chars: int = 200,
) -> Path:
    """Write REPORT_FILE and its plots into `out_dir`; returns the report's path.

    selected: row indices in rank order (as from `selection.select`). datasets: a name per row, or (codes, names).
    ids: anything indexable by row (a list, a StringColumn). texts: a list, or a function from row indices to their
    texts, called only for the rows shown. best_task / tasks (optional) add the composition by best-matching task
    and the top `top_n` selected examples per task; without them the top examples are listed overall. extra:
    settings shown at the end (method, fraction, seed, ...).
    """
    s = np.asarray(scores, dtype=np.float64)
    sel = np.asarray(selected, dtype=np.int64).reshape(-1)
    n = s.shape[0]
    sized = [("datasets", datasets[0] if isinstance(datasets, tuple) else datasets), ("ids", ids),
             ("texts", None if callable(texts) else texts), ("best_task", best_task)]
    problems = [f"{len(v)} {name} for {n} scores" for name, v in sized if v is not None and len(v) != n]
    if (best_task is None) != (tasks is None):
        problems.append("give best_task and tasks together")
    if sel.size and (sel.min() < 0 or sel.max() >= n):
        problems.append(f"selected indices must lie in [0, {n})")
    if problems:
        raise ConfigError(problems)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    codes, names = _codes(datasets)
    ranks = {int(i): r for r, i in enumerate(sel)}
    md = [f"# {_md(title)}", "", "## Summary", "",
          f"- pool rows: {n}",
          f"- selected rows: {sel.size} ({100.0 * sel.size / max(n, 1):.2f}% of the pool)",
          f"- scores, pool: min {np.nanmin(s):.4g} / median {np.nanmedian(s):.4g} / max {np.nanmax(s):.4g}"]
    if sel.size:
        sel_scores = s[sel]
        md += [f"- threshold (lowest selected score): {np.min(sel_scores):.6g}",
               f"- scores, selected: min {np.min(sel_scores):.4g} / median {np.median(sel_scores):.4g} / "
               f"max {np.max(sel_scores):.4g}"]
    md += ["", "## Score distribution", "", f"![score histogram]({SCORES_PLOT})", ""]
    _plot_scores(out / SCORES_PLOT, s, sel, title)

    ds_rows = _composition_rows((codes, names), sel)
    _plot_composition(out / DATASET_PLOT, ds_rows, "source dataset")
    md += ["## Composition by source dataset", "", _composition_table(ds_rows, "dataset"), "",
           f"![composition by dataset]({DATASET_PLOT})", ""]

    if best_task is not None:
        task_names = [str(t) for t in tasks]
        task_rows = _composition_rows((np.asarray(best_task, dtype=np.int64), task_names), sel)
        _plot_composition(out / TASK_PLOT, task_rows, "best-matching task")
        md += ["## Composition by best-matching task", "", _composition_table(task_rows, "task"), "",
               f"![composition by task]({TASK_PLOT})", "", f"## Top {top_n} selected examples per task", ""]
        best = np.asarray(best_task, dtype=np.int64)[sel]
        per_task = {t: [int(i) for i in sel[best == t][:top_n]] for t in range(len(task_names))}
    else:
        per_task = {None: [int(i) for i in sel[:top_n]]}
    shown = sorted({i for rows in per_task.values() for i in rows})
    # Texts of the rows shown only: a report never reads the whole pool.
    if texts is None:
        shown_texts = None
    else:
        shown_texts = dict(zip(shown, texts(shown) if callable(texts) else [texts[i] for i in shown]))
    dataset_of = lambda i: names[codes[i]]  # noqa: E731
    for t, rows in per_task.items():
        if t is None:
            md += [f"## Top {top_n} selected examples", ""]
        else:
            md += [f"### {_md(task_names[t])}", ""]
        md += [_examples_table(rows, ranks, ids, dataset_of, s, shown_texts, text_chars) if rows
               else "No selected row matches this task best.", ""]

    if extra:
        md += ["## Settings", ""] + [f"- {_md(k)}: {_md(v)}" for k, v in extra.items()] + [""]
    path = out / REPORT_FILE
    path.write_text("\n".join(md), encoding="utf-8")
    return path


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return "–" if np.isnan(v) else f"{v:.4g}"  # 0.475, 83.3, 2.93: significant digits, not padding
    return _md(value)


def comparison_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of selection methods side by side, one row per method.

    Columns are the union of the rows' keys in first-seen order ("method" first when present); a dict value
    such as {"composition": {"dolly": 40.0, ...}} becomes one column per key ("composition: dolly").
    Missing values show as "–".
    """
    flat: list[dict[str, Any]] = []
    for row in rows:
        f: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, dict):
                f.update({f"{key}: {k}": v for k, v in value.items()})
            else:
                f[key] = value
        flat.append(f)
    columns: list[str] = []
    for f in flat:
        columns += [c for c in f if c not in columns]
    if "method" in columns:
        columns.remove("method")
        columns.insert(0, "method")
    if not columns:
        return ""
    lines = ["| " + " | ".join(_md(c) for c in columns) + " |",
             "|" + "|".join("---" if c == "method" else "---:" for c in columns) + "|"]
    lines += ["| " + " | ".join(_cell(f.get(c)) for c in columns) + " |" for f in flat]
    return "\n".join(lines)
