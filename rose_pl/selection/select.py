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
    """Write the selected pool rows, unchanged and in rank order, as JSONL at `path`, plus the sidecar.

    pool_rows: the original JSON rows of the whole pool (row i = dataset index i). ids default to each
    row's "id" key. The sidecar (`selection_meta_path(path)`) records index, id, score and rank of each
    selected row and the settings (fraction / k, seed, source files). Both files are written atomically.
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

    rows = []
    for r, i in enumerate(idx.tolist()):
        entry: dict[str, Any] = {"rank": r, "index": i,
                                 "id": ids[i] if ids is not None else pool_rows[i].get("id")}
        if datasets is not None:
            entry["dataset"] = datasets[i]
        if scores is not None:
            entry["score"] = float(scores[i])
        rows.append(entry)
    if source is None or isinstance(source, (str, os.PathLike)):
        sources = None if source is None else [str(source)]
    else:
        sources = [str(s) for s in source]
    sidecar = {
        "jsonl": out.name, "pool_size": n, "num_selected": int(idx.size), "fraction": fraction, "k": k,
        "seed": seed, "source": sources,
        "threshold": float(min(float(scores[i]) for i in idx)) if scores is not None and idx.size else None,
        "selected": rows,
    }
    atomic_write_text(selection_meta_path(out), json.dumps(sidecar, indent=1, ensure_ascii=False))
    return out


def read_selection(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of the selected JSONL at `path`."""
    return json.loads(selection_meta_path(path).read_text(encoding="utf-8"))


def select_and_write(out: str | os.PathLike, result, pool, *, source: str, fraction: float | None, k: int | None,
                     seed: int, title: str, extra: dict | None = None, report: bool = True,
                     jsonl_name: str = SELECTED_FILE) -> dict:
    """Select the top of `pool` (InstructionExamples) by `result.scores`; write the selected rows (the pool's
    own JSON) and their sidecar into folder `out`, and unless `report` is False, report.md with plots.
    Returns a summary: how many rows, the composition by source dataset, the file."""
    from rose_pl.selection.report import composition, write_report

    out = Path(out)
    ids = [e.id for e in pool]
    datasets = [e.dataset for e in pool]
    chosen = select(result.scores, fraction=fraction, k=k, seed=seed)
    unusable = int(np.count_nonzero(np.isneginf(np.asarray(result.scores)[chosen])))
    if unusable:
        raise ConfigError(f"{title}: the budget reaches {unusable} rows without scores (dropped when their features "
                          "were computed); lower it (selection.fraction or selection.k, or the target's)")
    path = write_selection([e.raw for e in pool], chosen, out / jsonl_name, scores=result.scores, ids=ids,
                           datasets=datasets, fraction=fraction, k=k, seed=seed, source=source)
    if report:
        write_report(out, result.scores, chosen, datasets, ids, texts=[e.text for e in pool],
                     best_task=result.best_task, tasks=result.tasks, title=title,
                     extra={"fraction": fraction, "k": k, "seed": seed, "pool": source, **(extra or {})})
    summary = {"selected": int(len(chosen)), "file": str(path),
               "composition": {d: round(p, 1) for d, p in composition(datasets, chosen).items()}}
    log.info("%s: selected %d of %d into %s; composition %s", title, len(chosen), len(pool), path,
             summary["composition"])
    return summary
