"""Checkpoint-weighted influence scores grouped by explicit task id (ROSE Eq. 7, LESS Eq. 2).

For a training row z and a validation task j:

    S(z, j) = sum_i eta_i * < mean_{v in task j} val_i[v], train_i[z] >

where i runs over warmup checkpoints, eta_i is checkpoint i's mean learning rate renormalized to sum to 1,
and train_i / val_i are the projected features at checkpoint i. The score of z is max_j S(z, j).

Training features are streamed from (memory-mapped) N x d arrays block by block, so a pool of any size is
scored in bounded memory. Validation rows are grouped by the task id each row carries, never by position.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rose_pl.errors import ConfigError, DataFormatError, StoreMismatchError
from rose_pl.files import atomic_write
from rose_pl.progress import Progress

log = logging.getLogger(__name__)

SCORES_ARRAYS_FILE = "scores.npz"
"""Arrays of a saved score set: scores, per_task, best_task, weights, ids (utf-8 blob + offsets), dataset codes."""
SCORES_META_FILE = "scores.json"
"""Sidecar of a saved score set: tasks, caller metadata; written last, so its presence means complete."""
SCORES_FORMAT_VERSION = 2

DEFAULT_BLOCK_SIZE = 8192
"""Training rows per block; the block's float32 buffer takes block_size * d * 4 bytes (256 MiB at d=8192)."""


@dataclass
class InfluenceResult:
    """Scores of N training rows against T validation tasks."""

    scores: np.ndarray
    """(N,) float32: max over tasks of the per-task score."""
    per_task: np.ndarray
    """(N, T) float32: the score against each task."""
    best_task: np.ndarray
    """(N,) int64: index into `tasks` of the argmax (lowest index on ties)."""
    tasks: list[str]
    """Task ids, sorted, so their order never depends on the validation rows' order."""
    weights: np.ndarray
    """(C,) float64: checkpoint weights after renormalization to sum 1."""
    info: dict[str, Any] = field(default_factory=dict)
    """How the scores were computed: device, block size, raw weights."""

    @property
    def num_rows(self) -> int:
        return int(self.scores.shape[0])


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` means cuda when available else cpu; the choice is logged. Asking for absent cuda is an error."""
    if device is None:
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("influence: scoring on %s (device=None, chosen automatically)", chosen)
        return chosen
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was requested but CUDA is not available")
    log.info("influence: scoring on %s (requested)", chosen)
    return chosen


def _as_matrix(x: Any) -> Any:
    """An array-like with `.shape` and row slicing: arrays and tensors as given, a store folder opened."""
    if isinstance(x, (str, os.PathLike)):
        from rose_pl.features.store import FeatureStore  # store sits left of us; imported lazily to keep import light

        return FeatureStore.open(x).features()
    if hasattr(x, "features") and callable(x.features):
        return x.features()
    if isinstance(x, torch.Tensor) or (hasattr(x, "shape") and hasattr(x, "__getitem__")):
        return x
    return np.asarray(x)


def _host_tensor(x: Any, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of x as a tensor in their stored dtype, without copying a memmap."""
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    block = np.asarray(x[start:stop])
    if not block.flags.writeable:
        # Read-only memmaps are only read here; torch warns because it cannot mark the tensor read-only.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(block)
    return torch.from_numpy(block)


def _load_rows(x: Any, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """Rows [start, stop) of x as float32 in out[: stop - start] (out lives on the scoring device)."""
    dest = out[: stop - start]
    src = _host_tensor(x, start, stop)
    if src.device != dest.device:
        # Ship the stored (narrow) dtype and widen on the device; a blocking cross-device copy_ with a dtype
        # change would widen on the CPU and move twice the bytes.
        src = src.to(dest.device)
    dest.copy_(src)  # one pass from the stored dtype into a reused float32 buffer
    return dest


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    """Positive, finite checkpoint weights (mean learning rates) rescaled to sum to 1, as LESS does."""
    w = np.asarray(list(weights), dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ConfigError("weights must be a non-empty list with one learning rate per checkpoint")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ConfigError(f"checkpoint weights must be positive and finite, got {w.tolist()}")
    normalized = w / w.sum()
    if not np.isclose(w.sum(), 1.0):
        log.info("influence: checkpoint weights %s renormalized to sum 1: %s", w.tolist(), normalized.tolist())
    return normalized


def task_groups(task_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Sorted unique task ids and, per validation row, the index of its task."""
    ids = list(task_ids)
    bad = [i for i, t in enumerate(ids) if not isinstance(t, str) or not t]
    if bad:
        raise ConfigError(f"task ids must be non-empty strings; rows {bad[:10]} are not")
    tasks, inverse = np.unique(np.asarray(ids, dtype=object).astype(str), return_inverse=True)
    return [str(t) for t in tasks], inverse.astype(np.int64)


def _task_means(val: Any, inverse: np.ndarray, num_tasks: int) -> np.ndarray:
    """(T, d) float64 mean of each task's validation rows (the validation side is small)."""
    v = np.asarray(val[:] if not isinstance(val, torch.Tensor) else val.float().cpu().numpy(), dtype=np.float64)
    membership = np.zeros((num_tasks, v.shape[0]), dtype=np.float64)
    membership[inverse, np.arange(v.shape[0])] = 1.0
    membership /= membership.sum(axis=1, keepdims=True)
    return membership @ v


def _check_shapes(train: list, val: list, num_task_ids: int, weights: Sequence[float], block_size: int) -> None:
    config, mismatch = [], []
    if len(train) == 0:
        config.append("no training feature matrices given (one per checkpoint expected)")
    if len(train) != len(val):
        config.append(f"{len(train)} training checkpoints but {len(val)} validation checkpoints")
    if len(weights) != len(train):
        config.append(f"{len(weights)} weights for {len(train)} checkpoints")
    if not isinstance(block_size, (int, np.integer)) or block_size <= 0:
        config.append(f"block_size must be a positive integer, got {block_size!r}")
    for side, mats in (("train", train), ("val", val)):
        for i, m in enumerate(mats):
            if len(m.shape) != 2:
                config.append(f"{side}[{i}] must be 2-D (rows x dim), got shape {tuple(m.shape)}")
    if config:
        raise ConfigError(config)
    dims = {(side, i): m.shape[1] for side, mats in (("train", train), ("val", val)) for i, m in enumerate(mats)}
    if len(set(dims.values())) > 1:
        mismatch.append("feature dims differ: " + ", ".join(f"{s}[{i}]={d}" for (s, i), d in dims.items()))
    n_train = [m.shape[0] for m in train]
    if len(set(n_train)) > 1:
        mismatch.append(f"training checkpoints have different row counts {n_train}")
    n_val = [m.shape[0] for m in val]
    if len(set(n_val)) > 1:
        mismatch.append(f"validation checkpoints have different row counts {n_val}")
    if mismatch:
        raise StoreMismatchError("; ".join(mismatch))
    if n_val[0] != num_task_ids:
        raise ConfigError(f"{num_task_ids} task ids for {n_val[0]} validation rows (one task id per row expected)")
    if n_train[0] == 0 or n_val[0] == 0:
        raise ConfigError(f"nothing to score: {n_train[0]} training rows, {n_val[0]} validation rows")


def influence_scores(
    train: Sequence[Any],
    val: Sequence[Any],
    task_ids: Sequence[str],
    weights: Sequence[float],
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: str | torch.device | None = None,
) -> InfluenceResult:
    """ROSE Eq. 7 scores, streamed over training rows.

    train / val: one N x d (M x d) array-like per checkpoint (np.memmap, ndarray, tensor, FeatureStore or
    store folder), same checkpoint order on both sides. task_ids: one per validation row. weights: one
    positive learning rate per checkpoint (renormalized). device: "cpu", "cuda" or None (auto, logged).
    """
    train = [_as_matrix(t) for t in train]
    val = [_as_matrix(v) for v in val]
    _check_shapes(train, val, len(task_ids), weights, block_size)
    eta = normalize_weights(weights)
    tasks, inverse = task_groups(task_ids)
    dev = resolve_device(device)

    # Fold eta_i into task means once, so each block costs one (b x d)(d x T) product per checkpoint.
    task_dirs = [
        torch.from_numpy((eta[i] * _task_means(v, inverse, len(tasks))).astype(np.float32)).to(dev)
        for i, v in enumerate(val)
    ]
    n, d = int(train[0].shape[0]), int(train[0].shape[1])
    per_task = np.empty((n, len(tasks)), dtype=np.float32)
    log.info(
        "influence: %d training rows x %d dims x %d checkpoints vs %d validation rows in %d tasks, blocks of %d",
        n, d, len(train), len(task_ids), len(tasks), block_size,
    )
    t0 = time.perf_counter()
    buffer = torch.empty((min(block_size, n), d), dtype=torch.float32, device=dev)
    with torch.no_grad(), Progress(n, "score", every_seconds=30) as progress:
        for start in range(0, n, block_size):
            stop = min(start + block_size, n)
            acc = torch.zeros((stop - start, len(tasks)), dtype=torch.float32, device=dev)
            for mat, dirs in zip(train, task_dirs):
                acc.addmm_(_load_rows(mat, start, stop, buffer), dirs.T)
            per_task[start:stop] = acc.cpu().numpy()
            progress.update(stop - start)
    elapsed = time.perf_counter() - t0
    log.info("influence: scored %d rows in %.1f s (%.0f rows/s)", n, elapsed, n / max(elapsed, 1e-9))

    return _finish(per_task, tasks, eta, {"scoring": "projected", "device": str(dev), "block_size": int(block_size),
                                          "raw_weights": [float(w) for w in weights]})


def _checkpoint_of(meta: dict):
    """The weights a store's features come from (their digest, recorded by the module under "module"), or None."""
    module = meta.get("module")
    return module.get("weights") if isinstance(module, dict) else meta.get("weights")


def check_store_metas(train_metas: Sequence[dict], val_metas: Sequence[dict], train_names: Sequence[str],
                      val_names: Sequence[str]) -> None:
    """Raise StoreMismatchError listing every incompatibility between per-checkpoint train/val store metadata.

    Pairwise (train_i, val_i): the whole projector metadata (kind, dim, seed, parameter layout, normalization,
    algorithm...), dim and, where both carry one, the weights' digest. Across checkpoints: one projector throughout,
    equal training row counts, distinct checkpoints.
    """
    from rose_pl.features.store import compatibility_problems

    if len(train_metas) != len(val_metas):
        raise ConfigError(f"{len(train_metas)} training stores but {len(val_metas)} validation stores")
    problems = []
    for i, (ta, va) in enumerate(zip(train_metas, val_metas)):
        problems += compatibility_problems(ta, va, train_names[i], val_names[i])
        ct, cv = _checkpoint_of(ta), _checkpoint_of(va)
        if ct is not None and cv is not None and ct != cv:
            problems.append(f"checkpoint weights {ct!r} ({train_names[i]}) != {cv!r} ({val_names[i]})")
        if i > 0:
            problems += compatibility_problems(train_metas[0], ta, train_names[0], train_names[i])
            if ta.get("num_rows") != train_metas[0].get("num_rows"):
                problems.append(f"num_rows {ta.get('num_rows')} ({train_names[i]}) != "
                                f"{train_metas[0].get('num_rows')} ({train_names[0]})")
    seen: dict[str, str] = {}
    for name, meta in zip(train_names, train_metas):
        if _checkpoint_of(meta) is not None:
            key = json.dumps(_checkpoint_of(meta), sort_keys=True, default=str)
            if key in seen:
                problems.append(f"{name} and {seen[key]} come from the same checkpoint (weights {_checkpoint_of(meta)!r})")
            seen[key] = name
    if problems:
        raise StoreMismatchError("feature stores do not fit together:\n  - " + "\n  - ".join(problems))


def checkpoint_lrs(metas: Sequence[dict], names: Sequence[str]) -> list[float]:
    """eta_i of each checkpoint: the mean learning rate the feature module recorded from the warmup manifest."""
    lrs, missing = [], []
    for name, meta in zip(names, metas):
        lr = (meta.get("module") or {}).get("checkpoint_lr")
        if lr is None:
            missing.append(name)
        lrs.append(lr)
    if missing:
        raise ConfigError(f"stores {missing} record no checkpoint_lr: pass the checkpoint weights explicitly")
    return [float(x) for x in lrs]


def score_stores(
    train_dirs: Sequence[str | os.PathLike],
    val_dirs: Sequence[str | os.PathLike],
    task_ids: Sequence[str],
    weights: Sequence[float] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: str | torch.device | None = None,
) -> InfluenceResult:
    """Open one training and one validation FeatureStore folder per checkpoint, check they fit, and score.

    `weights` default to each checkpoint's mean learning rate from the training stores' metadata."""
    from rose_pl.features.store import FeatureStore  # lazily: store is a stage to our left, heavy to import

    if len(train_dirs) != len(val_dirs):
        raise ConfigError(f"{len(train_dirs)} training stores but {len(val_dirs)} validation stores")
    train_stores = [FeatureStore.open(p) for p in train_dirs]
    val_stores = [FeatureStore.open(p) for p in val_dirs]
    check_store_metas([s.meta for s in train_stores], [s.meta for s in val_stores],
                      [str(p) for p in train_dirs], [str(p) for p in val_dirs])
    if weights is None:
        weights = checkpoint_lrs([s.meta for s in train_stores], [str(p) for p in train_dirs])
    # Rows a store was finalized without (dropped on request by the datamodule) hold zeros, not features.
    # A dropped validation row must not pull its task's mean toward zero: leave it out of every checkpoint.
    val_drop = np.unique(np.concatenate([s.excluded_indices() for s in val_stores]))
    val = [s.features() for s in val_stores]
    if val_drop.size:
        if len(task_ids) != val[0].shape[0]:
            raise ConfigError(f"{len(task_ids)} task ids for {val[0].shape[0]} validation rows")
        keep = np.setdiff1d(np.arange(len(task_ids)), val_drop)
        log.warning("influence: %d validation rows were dropped when their features were computed; "
                    "scoring without them: %s", val_drop.size, val_drop[:10].tolist())
        val = [np.asarray(v)[keep] for v in val]
        task_ids = [task_ids[i] for i in keep]
    result = influence_scores([s.features() for s in train_stores], val, task_ids, weights,
                              block_size=block_size, device=device)
    # A dropped training row has no features: it must never be selected.
    train_drop = np.unique(np.concatenate([s.excluded_indices() for s in train_stores]))
    if train_drop.size:
        log.warning("influence: %d training rows have no features (dropped); their score is -inf: %s",
                    train_drop.size, train_drop[:10].tolist())
        result.scores[train_drop] = -np.inf
        result.per_task[train_drop] = -np.inf
    result.info["dropped_train_rows"] = train_drop.tolist()
    result.info["dropped_val_rows"] = val_drop.tolist()
    result.info["train_stores"] = [str(p) for p in train_dirs]
    result.info["val_stores"] = [str(p) for p in val_dirs]
    return result


def _finish(per_task: np.ndarray, tasks: list[str], eta: np.ndarray, info: dict) -> InfluenceResult:
    bad = int(np.count_nonzero(~np.isfinite(per_task)))
    if bad:
        log.warning("influence: %d non-finite per-task scores (non-finite features?)", bad)
    return InfluenceResult(scores=per_task.max(axis=1), per_task=per_task, best_task=per_task.argmax(axis=1).astype(np.int64),
                           tasks=tasks, weights=eta, info=info)


def exact_scores(store_dirs: Sequence[str | os.PathLike], side: str, weights: Sequence[float] | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> InfluenceResult:
    """Eq. 7 from exact score stores (`rose_pl.features.exact`), one per checkpoint, for validation `side`.

    At checkpoint i the score of row z for task t is inner_i(z, t) / sqrt(norm2_i(z)); the checkpoints are
    combined with their learning rates (from the stores' metadata unless `weights` are given), renormalized.
    A row whose gradient is zero scores 0; a row the pass dropped scores -inf (never selected).
    """
    from rose_pl.features.exact import NORM_COLUMN
    from rose_pl.features.store import FeatureStore

    stores = [FeatureStore.open(p) for p in store_dirs]
    if not stores:
        raise ConfigError("exact_scores: no stores given (one per checkpoint expected)")
    layouts, problems = [], []
    for store in stores:
        columns = (store.meta.get("exact") or {}).get("columns")
        if not columns:
            raise StoreMismatchError(f"{store.path}: not an exact score store (no exact.columns in its metadata)")
        picked = [c for c in columns if c.startswith(side + "/")]
        if not picked:
            problems.append(f"{store.path}: no columns of side {side!r} (has {sorted({c.split('/')[0] for c in columns})})")
        layouts.append(columns)
    if any(c != layouts[0] for c in layouts[1:]):
        problems.append(f"exact stores {[str(s.path) for s in stores]} have different columns (other task means)")
    if len({s.num_rows for s in stores}) > 1:
        problems.append(f"exact stores have different row counts {[s.num_rows for s in stores]}")
    checkpoints = [_checkpoint_of(s.meta) for s in stores]
    if len(set(map(str, checkpoints))) != len(checkpoints):
        problems.append(f"exact stores repeat a checkpoint: {checkpoints}")
    if problems:
        raise StoreMismatchError("exact score stores do not fit together:\n  - " + "\n  - ".join(problems))
    columns = layouts[0]
    picked = [i for i, c in enumerate(columns) if c.startswith(side + "/")]
    tasks = [columns[i][len(side) + 1:] for i in picked]
    order = np.argsort(np.asarray(tasks, dtype=object).astype(str), kind="stable")  # tasks sorted, as task_groups
    picked, tasks = [picked[i] for i in order], [tasks[i] for i in order]
    norm = columns.index(NORM_COLUMN)
    if weights is None:
        weights = checkpoint_lrs([s.meta for s in stores], [str(s.path) for s in stores])
    if len(weights) != len(stores):
        raise ConfigError(f"{len(weights)} weights for {len(stores)} checkpoints")
    eta = normalize_weights(weights)
    n = stores[0].num_rows
    per_task = np.zeros((n, len(tasks)), dtype=np.float64)
    with Progress(n * len(stores), "score", every_seconds=30) as progress:
        for w, store in zip(eta, stores):
            _add_exact(per_task, store.features(), w, picked, norm, block_size, progress)
    per_task = per_task.astype(np.float32)
    dropped = np.unique(np.concatenate([s.excluded_indices() for s in stores]))
    if dropped.size:
        log.warning("influence: %d training rows have no scores (dropped); their score is -inf: %s",
                    dropped.size, dropped[:10].tolist())
        per_task[dropped] = -np.inf
    info = {"scoring": "exact", "side": side, "raw_weights": [float(x) for x in weights],
            "stores": [str(s.path) for s in stores], "dropped_train_rows": dropped.tolist()}
    return _finish(per_task, tasks, eta, info)


def _add_exact(per_task: np.ndarray, mat, weight: float, picked: list[int], norm: int, block_size: int,
               progress) -> None:
    """per_task += weight * inner / sqrt(norm2), block by block (a zero gradient adds 0)."""
    for start in range(0, mat.shape[0], block_size):
        block = np.asarray(mat[start:start + block_size], dtype=np.float64)
        length = np.sqrt(block[:, norm])
        per_task[start:start + block.shape[0]] += weight * np.divide(
            block[:, picked], length[:, None], out=np.zeros((block.shape[0], len(picked))), where=length[:, None] > 0)
        progress.update(block.shape[0])


@dataclass
class SavedScores:
    """A score set read back from disk: the result plus the ids/datasets of its rows and caller metadata."""

    result: InfluenceResult
    ids: Any
    """Each row's id: a StringColumn (list-like: `[i]`, `len`, `tolist()`)."""
    dataset_codes: np.ndarray
    dataset_names: list[str]
    meta: dict[str, Any]

    @property
    def datasets(self) -> list[str]:
        """Each row's source dataset (O(N) strings: prefer the codes and names for a large pool)."""
        return [self.dataset_names[c] for c in self.dataset_codes]


def save_scores(path: str | os.PathLike, result: InfluenceResult, ids, datasets,
                meta: dict[str, Any] | None = None) -> Path:
    """Write `result` into folder `path` (SCORES_ARRAYS_FILE, then SCORES_META_FILE), each atomically.

    ids: a list of strings or a StringColumn (a million ids take a few MB, never a Python list); datasets: a list of
    names, or (codes, names) with one code per row."""
    from rose_pl.data.table import StringColumn

    n = result.num_rows
    column = ids if isinstance(ids, StringColumn) else StringColumn.of(list(ids))
    if isinstance(datasets, tuple):
        codes, names = np.asarray(datasets[0], dtype=np.uint32), list(datasets[1])
    else:
        names = sorted(set(datasets))
        lookup = {name: i for i, name in enumerate(names)}
        codes = np.asarray([lookup[d] for d in datasets], dtype=np.uint32)
    if len(column) != n or len(codes) != n:
        raise ConfigError(f"{n} scores but {len(column)} ids and {len(codes)} datasets")
    folder = Path(path)
    arrays = {
        "scores": result.scores, "per_task": result.per_task, "best_task": result.best_task,
        "weights": result.weights, "ids_blob": np.asarray(column.blob), "ids_offsets": np.asarray(column.offsets),
        "dataset_codes": codes,
    }
    atomic_write(folder / SCORES_ARRAYS_FILE, lambda f: np.savez(f, **arrays))
    sidecar = {"format_version": SCORES_FORMAT_VERSION, "num_rows": n, "tasks": list(result.tasks),
               "dataset_names": names, "info": result.info, "meta": meta or {}}
    text = json.dumps(sidecar, indent=2, default=str).encode()
    atomic_write(folder / SCORES_META_FILE, lambda f: f.write(text))
    return folder


def load_scores(path: str | os.PathLike) -> SavedScores:
    """Read a folder written by `save_scores`."""
    from rose_pl.data.table import StringColumn

    folder = Path(path)
    meta_path, arrays_path = folder / SCORES_META_FILE, folder / SCORES_ARRAYS_FILE
    if not meta_path.exists() or not arrays_path.exists():
        raise DataFormatError(folder, None, f"not a complete score set ({SCORES_ARRAYS_FILE} + {SCORES_META_FILE})")
    try:
        sidecar = json.loads(meta_path.read_text())
    except ValueError as e:
        raise DataFormatError(meta_path, None, f"not valid JSON ({e})") from None
    if sidecar.get("format_version") != SCORES_FORMAT_VERSION:
        raise DataFormatError(meta_path, "format_version", f"expected {SCORES_FORMAT_VERSION}, "
                                                           f"got {sidecar.get('format_version')!r}")
    try:
        with np.load(arrays_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:  # a truncated or foreign file
        raise DataFormatError(arrays_path, None, f"cannot be read ({type(e).__name__}: {e})") from None
    if arrays["scores"].shape[0] != sidecar["num_rows"]:
        raise DataFormatError(arrays_path, "scores", f"{arrays['scores'].shape[0]} rows, sidecar says "
                                                     f"{sidecar['num_rows']}")
    result = InfluenceResult(scores=arrays["scores"], per_task=arrays["per_task"], best_task=arrays["best_task"],
                             tasks=list(sidecar["tasks"]), weights=arrays["weights"], info=sidecar.get("info", {}))
    return SavedScores(result=result, ids=StringColumn(arrays["ids_blob"], arrays["ids_offsets"]),
                       dataset_codes=arrays["dataset_codes"], dataset_names=sidecar["dataset_names"],
                       meta=sidecar.get("meta", {}))
