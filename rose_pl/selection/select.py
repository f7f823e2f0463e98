"""Top-p / top-k selection with seeded, deterministic tie-breaking, and the selected pool written back as JSONL.

The budget is global: one ranking across every training source. A fraction p selects ceil(p * N) rows (at
least 1), so a small pool never rounds to an empty selection and the budget is never below p. Equal scores
are ordered by a random key drawn from `seed`, so ties do not favor file order yet the same seed always
gives the same selection.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rose_pl.errors import ConfigError
from rose_pl.files import atomic_write_text
from rose_pl.layout import SELECTED_FILE

log = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.05
"""Fraction of the pool selected when neither fraction nor k is given (ROSE and LESS use 5%)."""
SELECTION_META_FILE = "selection.json"
"""Sidecar written next to the selected JSONL: indices, ids, scores, ranks and the selection settings."""


def selection_meta_path(jsonl_path: str | os.PathLike) -> Path:
    """Where `write_selection` puts the sidecar of `jsonl_path`."""
    return Path(jsonl_path).parent / SELECTION_META_FILE


def budget(num_rows: int, *, fraction: float | None = DEFAULT_FRACTION, k: int | None = None) -> int:
    """Number of rows selected from `num_rows`: k, or ceil(fraction * num_rows) clipped to [1, num_rows].

    k, when given, replaces the default fraction; giving k together with a non-default fraction is an error.
    """
    problems = []
    if k is not None and fraction is not None and fraction != DEFAULT_FRACTION:
        problems.append(f"give fraction or k, not both (fraction={fraction}, k={k}): set fraction to null to keep k rows")
    if k is None and fraction is None:
        problems.append("give fraction or k")
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_rows):
        problems.append(f"k must be an integer in [1, {num_rows}], got {k!r}")
    if k is None and fraction is not None and not (0.0 < float(fraction) <= 1.0):
        problems.append(f"fraction must be in (0, 1], got {fraction!r}")
    if num_rows <= 0:
        problems.append("the pool is empty")
    if problems:
        raise ConfigError(problems)
    if k is not None:
        return int(k)
    # Round p*N before ceil so that e.g. 0.07 * 100 = 7.000000000000001 does not become 8.
    asked = round(float(fraction) * num_rows, 9)
    rows = int(min(num_rows, max(1, math.ceil(asked))))
    if rows > 1.1 * asked:
        log.warning("fraction %s of %d rows is %.3g rows: selecting %d (%.3g%% of the pool); set k for an exact count",
                    fraction, num_rows, asked, rows, 100.0 * rows / num_rows)
    elif rows != asked:
        log.info("fraction %s of %d rows is %.6g rows: selecting %d", fraction, num_rows, asked, rows)
    return rows


def rank(scores: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """All row indices, best first; equal scores in the order of a random key drawn from `seed`."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ConfigError(f"scores must be 1-D, got shape {s.shape}")
    nan = int(np.count_nonzero(np.isnan(s)))
    if nan:
        raise ConfigError(f"{nan} of {s.size} scores are NaN; fix the features or scores before selecting")
    tiebreak = np.random.default_rng(seed).permutation(s.size)
    # lexsort sorts by the last key first: descending score, then the seeded key.
    return np.lexsort((tiebreak, -s)).astype(np.int64)


def select(scores: np.ndarray, *, fraction: float | None = DEFAULT_FRACTION, k: int | None = None,
           seed: int = 0) -> np.ndarray:
    """Indices of the selected rows in rank order (best first): top-k if k is given, else top ceil(p*N)."""
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ConfigError(f"scores must be 1-D, got shape {s.shape}")
    return rank(s, seed=seed)[: budget(s.shape[0], fraction=fraction, k=k)]


def write_sidecar(folder: str | os.PathLike, selected: np.ndarray, num_rows: int, file: str, *, ids=None,
                  dataset_of=None, scores: np.ndarray | None = None, fraction: float | None = None,
                  k: int | None = None, seed: int | None = None, source=None) -> Path:
    """selection.json beside the selected rows: each selected row's rank, index, id, dataset and score (best first),
    the settings, the source, and the name of the file holding the rows."""
    rows = []
    for r, i in enumerate(selected.tolist()):
        entry: dict[str, Any] = {"rank": r, "index": i, "id": ids[i] if ids is not None else None}
        if dataset_of is not None:
            entry["dataset"] = dataset_of(i)
        if scores is not None:
            entry["score"] = float(scores[i])
        rows.append(entry)
    if source is None or isinstance(source, (str, os.PathLike)):
        sources = None if source is None else [str(source)]
    else:
        sources = [str(s) for s in source]
    sidecar = {
        "file": file, "jsonl": file, "pool_size": num_rows, "num_selected": int(selected.size), "fraction": fraction,
        "k": k, "seed": seed, "source": sources,
        "threshold": float(min(float(scores[i]) for i in selected)) if scores is not None and selected.size else None,
        "selected": rows,
    }
    path = Path(folder) / SELECTION_META_FILE
    atomic_write_text(path, json.dumps(sidecar, indent=1, ensure_ascii=False))
    return path


def write_selection(
    pool_rows: Sequence[dict[str, Any]],
    selected: Sequence[int] | np.ndarray,
    path: str | os.PathLike,
    *,
    scores: np.ndarray | None = None,
    ids: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    fraction: float | None = None,
    k: int | None = None,
    seed: int | None = None,
    source: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> Path:
    """Write the selected rows of an in-memory pool, unchanged and in rank order, as JSONL at `path`, plus the
    sidecar (`selection_meta_path(path)`). For a pool on disk of any size and format, `select_and_write` writes
    the rows in the pool's own format from its source instead.

    pool_rows: the original JSON rows of the whole pool (row i = dataset index i). ids default to each row's "id"
    key. Both files are written atomically.
    """
    idx = np.asarray(selected, dtype=np.int64).reshape(-1)
    n = len(pool_rows)
    problems = []
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        problems.append(f"selected indices must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
    if np.unique(idx).size != idx.size:
        problems.append(f"{idx.size - np.unique(idx).size} selected indices are repeated")
    for name, values in (("scores", scores), ("ids", ids), ("datasets", datasets)):
        if values is not None and len(values) != n:
            problems.append(f"{len(values)} {name} for a pool of {n} rows")
    if problems:
        raise ConfigError(problems)

    out = Path(path)
    lines = [json.dumps(pool_rows[i], ensure_ascii=False) for i in idx.tolist()]
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    write_sidecar(out.parent, idx, n, out.name, ids=ids if ids is not None else [r.get("id") for r in pool_rows],
                  dataset_of=(lambda i: datasets[i]) if datasets is not None else None, scores=scores,
                  fraction=fraction, k=k, seed=seed, source=source)
    return out


def read_selection(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of the selected JSONL at `path`."""
    return json.loads(selection_meta_path(path).read_text(encoding="utf-8"))


def select_and_write(out: str | os.PathLike, result, pool, *, source: str, fraction: float | None, k: int | None,
                     seed: int, title: str, extra: dict | None = None, report: bool = True) -> dict:
    """Select the top of `pool` (a `rose_pl.data.table.PoolTable`) by `result.scores`; write the selected rows in the
    pool's own format (JSONL lines unchanged, Parquet, or a saved dataset) with their sidecar into folder `out`, and
    unless `report` is False, report.md with plots. Only the selected rows and the report's examples are read.
    Returns a summary: how many rows, the composition by source dataset, the file."""
    from rose_pl.selection.report import composition, write_report

    out = Path(out)
    chosen = select(result.scores, fraction=fraction, k=k, seed=seed)
    unusable = int(np.count_nonzero(np.isneginf(np.asarray(result.scores)[chosen])))
    if unusable:
        raise ConfigError(f"{title}: the budget reaches {unusable} rows without scores (dropped when their features "
                          "were computed); lower it (selection.fraction or selection.k, or the target's)")
    path = pool.write_rows(chosen, out, result.scores)
    codes, names = np.asarray(pool.dataset_codes), pool.dataset_names
    write_sidecar(out, chosen, pool.num_rows, path.name, ids=pool.ids, dataset_of=lambda i: names[codes[i]],
                  scores=result.scores, fraction=fraction, k=k, seed=seed, source=source)
    if report:
        write_report(out, result.scores, chosen, (codes, names), pool.ids,
                     texts=lambda rows: next(pool.texts(rows)), best_task=result.best_task, tasks=result.tasks,
                     title=title, extra={"fraction": fraction, "k": k, "seed": seed, "pool": source, **(extra or {})})
    chosen_names = [names[c] for c in codes[chosen]]
    summary = {"selected": int(len(chosen)), "file": str(path),
               "composition": {d: round(p, 1) for d, p in composition(chosen_names).items()}}
    log.info("%s: selected %d of %d into %s; composition %s", title, len(chosen), pool.num_rows, path,
             summary["composition"])
    return summary
