"""Memory-mapped feature store (one folder per dataset x checkpoint x mode) and its prediction writer.

Layout: `meta.json` (what defines the features), `features.bin` (raw row-major N x d, row i = dataset
index i), `written.bin` (one uint8 flag per row), `complete.json` (written last, atomically). A row is
flagged only after its bytes are flushed, so after a crash a flagged row is always a valid row and a
resumed run recomputes exactly the unflagged ones.

Several processes on one host (DDP ranks) write disjoint rows of the same files. Across nodes the
folder must be on a shared filesystem: feature rows are d * itemsize bytes (16 KiB at d=8192, fp16),
so rows of different ranks never share a page, but flags do; a stale flag page written back by another
node can only clear flags (the row is then recomputed), never set one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from rose_pl.files import atomic_write_json, jsonable
from rose_pl.errors import ConfigError, StoreMismatchError
from rose_pl.features.protocols import DATA_MEMBERS, MODULE_MEMBERS, check_members

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
FEATURES_FILE = "features.bin"
WRITTEN_FILE = "written.bin"
COMPLETE_FILE = "complete.json"

# meta.json keys set by the store itself; the caller's metadata may not redefine them.
KEY_FORMAT = "format_version"
KEY_NUM_ROWS = "num_rows"
KEY_DIM = "dim"
KEY_DTYPE = "dtype"
# keys set by FeatureStoreWriter.
KEY_MODULE = "module"
KEY_PROJECTOR = "projector"
KEY_DATASET = "dataset_fingerprint"
KEY_DATA = "data"
STORE_KEYS = (KEY_FORMAT, KEY_NUM_ROWS, KEY_DIM, KEY_DTYPE)
COMPATIBILITY_KEYS = (KEY_PROJECTOR, KEY_DIM)
DTYPES = ("float16", "float32")


# ---- small helpers ----------------------------------------------------------------------------------
def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


_ABSENT = "<absent>"


def meta_differences(stored: dict, requested: dict, keys: Iterable[str] | None = None) -> list[str]:
    """'key: stored X, requested Y' for every differing leaf (all leaves, or those under `keys`)."""
    a, b = _flatten(jsonable(stored)), _flatten(jsonable(requested))
    names = sorted(set(a) | set(b))
    if keys is not None:
        keys = list(keys)
        names = [n for n in names if any(n == k or n.startswith(k + ".") for k in keys)]
    return [f"{n}: stored {a.get(n, _ABSENT)!r}, requested {b.get(n, _ABSENT)!r}"
            for n in names if a.get(n, _ABSENT) != b.get(n, _ABSENT)]


def compatibility_problems(meta_a: dict, meta_b: dict, name_a: str = "first", name_b: str = "second",
                           keys: Iterable[str] = COMPATIBILITY_KEYS) -> list[str]:
    """Why two stores' features cannot be compared: every differing leaf of the projector metadata (kind,
    seed, dim, parameter layout, normalization...) and of the dim."""
    return [d.replace(": stored", f": {name_a}").replace(", requested", f", {name_b}")
            for d in meta_differences(meta_a, meta_b, keys)]


def check_compatible(meta_a: dict, meta_b: dict, keys: Iterable[str] = COMPATIBILITY_KEYS) -> None:
    """Raise StoreMismatchError unless the two stores' projector (kind, seed, dim, layout, normalize...) and dim agree."""
    problems = compatibility_problems(meta_a, meta_b, keys=keys)
    if problems:
        raise StoreMismatchError("feature stores are not comparable:\n  - " + "\n  - ".join(problems))


# ---- the store --------------------------------------------------------------------------------------
class FeatureStore:
    """An N x d feature matrix on disk with a written-rows mask; use `create` or `open`."""

    def __init__(self, path: Path, meta: dict, mode: str, durable: bool):
        self.path, self.meta, self.mode, self.durable = path, meta, mode, durable
        self.num_rows: int = meta[KEY_NUM_ROWS]
        self.dim: int = meta[KEY_DIM]
        self.dtype = np.dtype(meta[KEY_DTYPE]).newbyteorder("<")
        self.row_bytes = self.dim * self.dtype.itemsize
        self._fds: dict[str, int] = {}
        if mode == "r+":
            for name in (FEATURES_FILE, WRITTEN_FILE):
                self._fds[name] = os.open(path / name, os.O_RDWR)

    # ---- opening -----------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, num_rows: int, dim: int, meta: dict, dtype: str = "float16",
               overwrite: bool = False, durable: bool = True) -> "FeatureStore":
        """A new empty store, or the existing one at `path` if its metadata is equal (resume).

        Different metadata (or damaged files) raise StoreMismatchError listing every differing key, unless
        overwrite=True, which discards that store; a store with equal metadata is always resumed (delete
        the folder to recompute it). durable=False skips fsync (safe against process crashes only).
        """
        problems = []
        if not isinstance(num_rows, (int, np.integer)) or num_rows < 0:
            problems.append(f"num_rows must be a non-negative integer, got {num_rows!r}")
        if not isinstance(dim, (int, np.integer)) or dim <= 0:
            problems.append(f"dim must be a positive integer, got {dim!r}")
        if dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {dtype!r}")
        clash = [k for k in STORE_KEYS if k in meta]
        if clash:
            problems.append(f"metadata may not set the store's own keys {clash}")
        if problems:
            raise ConfigError(problems)
        path = Path(path)
        full = jsonable({**meta, KEY_FORMAT: FORMAT_VERSION, KEY_NUM_ROWS: int(num_rows), KEY_DIM: int(dim),
                          KEY_DTYPE: dtype})
        if (path / META_FILE).exists():
            diffs = meta_differences(_read_json(path / META_FILE), full)
            if not diffs:
                try:
                    store = cls.open(path, mode="r+", durable=durable)
                    log.info("feature store %s exists with the same metadata: resuming", path)
                    return store
                except StoreMismatchError as e:  # damaged files
                    if not overwrite:
                        raise
                    diffs = [str(e)]
            if not overwrite:
                raise StoreMismatchError(
                    f"{path / META_FILE} describes other features than requested:\n  - " + "\n  - ".join(diffs)
                    + "\n(use another folder, or overwrite=True to discard the stored features)")
            log.warning("feature store %s: discarding it (%s)", path, "; ".join(diffs))
        path.mkdir(parents=True, exist_ok=True)
        # complete.json goes first and meta.json last: a folder with meta.json always has its data files.
        for name in (COMPLETE_FILE, META_FILE, FEATURES_FILE, WRITTEN_FILE):
            (path / name).unlink(missing_ok=True)
        itemsize = np.dtype(dtype).itemsize
        for name, size in ((FEATURES_FILE, int(num_rows) * int(dim) * itemsize), (WRITTEN_FILE, int(num_rows))):
            with open(path / name, "wb") as f:
                f.truncate(size)  # sparse zeros: no time or disk spent on rows not yet written
                os.fsync(f.fileno())
        atomic_write_json(path / META_FILE, full)
        return cls.open(path, mode="r+", durable=durable)

    @classmethod
    def open(cls, path: str | Path, expected_meta: dict | None = None, mode: str = "r",
             durable: bool = True) -> "FeatureStore":
        """Open an existing store; `expected_meta` keys must match (StoreMismatchError lists the differences)."""
        if mode not in ("r", "r+"):
            raise ConfigError(f"FeatureStore.open: mode must be 'r' or 'r+', got {mode!r}")
        path = Path(path)
        if not (path / META_FILE).exists():
            raise FileNotFoundError(f"{path}: not a feature store (no {META_FILE})")
        meta = _read_json(path / META_FILE)
        if meta.get(KEY_FORMAT) != FORMAT_VERSION:
            raise StoreMismatchError(f"{path / META_FILE}: {KEY_FORMAT} is {meta.get(KEY_FORMAT)!r}, "
                                     f"this rose_pl reads {FORMAT_VERSION}")
        if expected_meta is not None:
            diffs = meta_differences(meta, expected_meta, keys=_flatten(jsonable(expected_meta)).keys())
            if diffs:
                raise StoreMismatchError(f"{path / META_FILE} differs from the expected metadata:\n  - "
                                         + "\n  - ".join(diffs))
        itemsize = np.dtype(meta[KEY_DTYPE]).itemsize
        for name, size in ((FEATURES_FILE, meta[KEY_NUM_ROWS] * meta[KEY_DIM] * itemsize),
                           (WRITTEN_FILE, meta[KEY_NUM_ROWS])):
            actual = (path / name).stat().st_size if (path / name).exists() else None
            if actual != size:
                raise StoreMismatchError(
                    f"{path / name}: {'missing' if actual is None else f'{actual} bytes'}, expected {size} bytes "
                    f"for {meta[KEY_NUM_ROWS]} rows x {meta[KEY_DIM]} {meta[KEY_DTYPE]} (truncated or foreign file)")
        return cls(path, meta, mode, durable)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_fds", None):
            self.close()

    # ---- writing -----------------------------------------------------------------------------------
    def write(self, indices, features) -> None:
        """Write `features[j]` at row `indices[j]`, flush, then flag those rows as written."""
        if self.mode != "r+":
            raise PermissionError(f"{self.path}: opened read-only")
        idx = np.asarray(indices.cpu() if torch.is_tensor(indices) else indices).astype(np.int64).reshape(-1)
        if torch.is_tensor(features):
            features = features.detach().to("cpu", torch.float32).numpy()
        feats = np.asarray(features, dtype=np.float32)
        if feats.shape != (idx.size, self.dim):
            raise StoreMismatchError(f"{self.path}: got features of shape {feats.shape} for {idx.size} indices, "
                                     f"the store holds rows of dim {self.dim}")
        bad = idx[(idx < 0) | (idx >= self.num_rows)]
        if bad.size:
            raise IndexError(f"{self.path}: row indices outside [0, {self.num_rows}): {bad[:10].tolist()}")
        if np.unique(idx).size != idx.size:
            raise ValueError(f"{self.path}: duplicate row indices in one write")
        with np.errstate(over="ignore"):  # overflow is detected and reported just below
            rows = feats.astype(self.dtype)
        bad_rows = ~np.isfinite(rows).all(axis=1)
        if bad_rows.any():
            overflow = bad_rows & np.isfinite(feats).all(axis=1)
            if overflow.any():
                raise ValueError(f"{self.path}: rows {idx[overflow][:10].tolist()} overflow {self.dtype.name} "
                                 "(unnormalized features? use dtype float32)")
            log.warning("%s: non-finite features at rows %s", self.path, idx[bad_rows][:10].tolist())
        order = np.argsort(idx, kind="stable")
        fd = self._fds[FEATURES_FILE]
        for start, stop in _runs(idx[order]):
            os.pwrite(fd, rows[order[start:stop]].tobytes(), int(idx[order[start]]) * self.row_bytes)
        if self.durable:
            os.fdatasync(fd)
        fd = self._fds[WRITTEN_FILE]
        for start, stop in _runs(idx[order]):
            os.pwrite(fd, b"\x01" * (stop - start), int(idx[order[start]]))
        if self.durable:
            os.fdatasync(fd)

    def finalize(self, excluded: Iterable[int] = (), reasons: dict[int, dict] | None = None) -> None:
        """Mark the store complete; refuses while rows are missing. `excluded` rows may stay unwritten (zero);
        `reasons[i]` (e.g. {"id", "reason"}) is recorded for each excluded row that has one."""
        excluded = sorted({int(i) for i in excluded})
        missing = np.setdiff1d(self.missing_indices(), np.asarray(excluded, dtype=np.int64))
        if missing.size:
            raise StoreMismatchError(f"{self.path}: cannot finalize, {missing.size} of {self.num_rows} rows are "
                                     f"not written, first ones: {missing[:10].tolist()}")
        for name in (FEATURES_FILE, WRITTEN_FILE):
            with open(self.path / name, "rb+") as f:
                os.fsync(f.fileno())
        details = [{"index": i, **(reasons or {}).get(i, {})} for i in excluded]
        atomic_write_json(self.path / COMPLETE_FILE, {"num_rows": self.num_rows, "excluded_rows": excluded,
                                                      "excluded": details,
                                                      "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    # ---- reading -----------------------------------------------------------------------------------
    def written_mask(self) -> np.ndarray:
        """Bool per row, read from disk each time (other processes may be writing)."""
        return np.fromfile(self.path / WRITTEN_FILE, dtype=np.uint8, count=self.num_rows) != 0

    def written_indices(self) -> np.ndarray:
        return np.flatnonzero(self.written_mask())

    def missing_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.written_mask())

    @property
    def is_complete(self) -> bool:
        return (self.path / COMPLETE_FILE).exists()

    def excluded_indices(self) -> np.ndarray:
        """Rows finalized without features (e.g. dropped by the datamodule); empty unless complete."""
        if not self.is_complete:
            return np.zeros(0, dtype=np.int64)
        return np.asarray(_read_json(self.path / COMPLETE_FILE).get("excluded_rows", []), dtype=np.int64)

    def excluded(self) -> list[dict]:
        """Each row finalized without features, with its id and the reason where known."""
        if not self.is_complete:
            return []
        done = _read_json(self.path / COMPLETE_FILE)
        return done.get("excluded", [{"index": i} for i in done.get("excluded_rows", [])])

    def features(self, allow_incomplete: bool = False) -> np.memmap:
        """Read-only (N, d) memmap; refuses an unfinished store unless allow_incomplete=True."""
        if not allow_incomplete and not self.is_complete:
            raise StoreMismatchError(f"{self.path}: the store is not complete ({self.missing_indices().size} "
                                     f"rows missing); pass allow_incomplete=True to read it anyway")
        if self.num_rows == 0:
            return np.zeros((0, self.dim), dtype=self.dtype)
        return np.memmap(self.path / FEATURES_FILE, dtype=self.dtype, mode="r", shape=(self.num_rows, self.dim))

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, rows={self.num_rows}, dim={self.dim}, dtype={self.dtype.name})"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreMismatchError(f"{path}: not valid JSON ({e})") from e


def _runs(sorted_idx: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) positions of runs of consecutive row indices, to write each run with one call."""
    if sorted_idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
    bounds = np.concatenate([[0], breaks, [sorted_idx.size]])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


# ---- the Lightning writer ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreOutput:
    """One store a writer fills: where, its width and metadata, and which columns of the batch features go there."""

    path: str
    dim: int
    meta: dict
    columns: slice | None = None
    """Columns of each batch's features written to this store (None: all)."""


class FeatureStoreWriter(BasePredictionWriter):
    """Writes each predict batch's `{"index", "features"}` into a FeatureStore; resumes unfinished stores.

    Subclasses write several stores from one pass by returning several `StoreOutput`s from `outputs()`.
    """

    def __init__(self, output_dir: str, dtype: str = "float16", overwrite: bool = False):
        """
        Args:
            output_dir: The store folder (one per dataset x checkpoint x features). Fields of the module's
                feature metadata may be named in braces and are filled in at setup, e.g.
                `runs/x/features/train/epoch-{checkpoint_epoch}` follows `--model.init_args.checkpoint`.
            dtype: Stored feature dtype, float16 or float32.
            overwrite: Discard a store in output_dir made under other metadata instead of refusing it (a store
                with the same metadata is always resumed).
        """
        super().__init__(write_interval="batch")
        if dtype not in DTYPES:
            raise ConfigError(f"{type(self).__name__}: dtype must be one of {DTYPES}, got {dtype!r}")
        self.output_dir, self.dtype, self.overwrite = output_dir, dtype, overwrite
        self.stores: list[tuple[StoreOutput, FeatureStore]] = []
        self._excluded: list[int] = []
        self._reasons: dict[int, dict] = {}

    @property
    def store(self) -> FeatureStore | None:
        """The (first) store being written."""
        return self.stores[0][1] if self.stores else None

    @staticmethod
    def data_metadata(trainer: pl.Trainer) -> tuple[int, dict]:
        """(rows, metadata) of the datamodule's dataset: its fingerprint and, where it has them, its settings."""
        dm = trainer.datamodule
        num_rows = dm.num_examples() if callable(dm.num_examples) else dm.num_examples
        meta = {KEY_DATASET: dm.fingerprint()}
        if hasattr(dm, "settings"):
            meta[KEY_DATA] = dm.settings()
        return int(num_rows), meta

    def outputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[StoreOutput]:
        """The store: dim from the ProjectionCallback (or the module's `feature_dim()`), module metadata."""
        from rose_pl.features.projection import ProjectionCallback  # projection sits left of store

        projections = [c for c in trainer.callbacks if isinstance(c, ProjectionCallback)]
        if len(projections) > 1:
            raise ConfigError(f"{type(self).__name__} found {len(projections)} ProjectionCallbacks, expected at most one")
        if projections:
            projections[0].prepare(pl_module, trainer.strategy.root_device)
            projector = projections[0].metadata()
            dim = projector["dim"]
        else:  # features that need no projection (e.g. hidden states) declare their width
            projector = None
            dim = pl_module.feature_dim() if hasattr(pl_module, "feature_dim") else None
            if not dim:
                raise ConfigError(f"{type(self).__name__} needs a ProjectionCallback, or the module's feature_dim()")
        _, data = self.data_metadata(trainer)
        meta = {KEY_MODULE: pl_module.feature_metadata(), KEY_PROJECTOR: projector, **data}
        return [StoreOutput(self._fill(self.output_dir, meta[KEY_MODULE]), int(dim), meta)]

    @staticmethod
    def _fill(output_dir: str, module_meta: dict) -> str:
        try:
            return str(output_dir).format(**module_meta)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"store output_dir {output_dir!r}: cannot fill {e} from the module's feature metadata "
                              f"(fields: {sorted(module_meta)})") from None

    def _open(self, trainer: pl.Trainer, num_rows: int, out: StoreOutput) -> FeatureStore:
        # Rank 0 creates or validates; its error (if any) is broadcast so no rank waits forever.
        failure, message = None, None
        if trainer.is_global_zero:
            try:
                FeatureStore.create(out.path, num_rows, out.dim, out.meta, self.dtype, self.overwrite).close()
            except Exception as e:  # re-raised below: as is on rank 0, as a message elsewhere
                failure, message = e, f"{type(e).__name__}: {e}"
        message = trainer.strategy.broadcast(message, src=0)
        if failure is not None:
            raise failure
        if message is not None:
            raise StoreMismatchError(f"feature store {out.path} (rank 0 failed): {message}")
        expected = {**out.meta, KEY_NUM_ROWS: num_rows, KEY_DIM: out.dim, KEY_DTYPE: self.dtype}
        return FeatureStore.open(out.path, expected_meta=expected, mode="r+")

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every member this writer needs of the module and the data (rose_pl.features.protocols), or one error."""
        from rose_pl.features.projection import ProjectionCallback

        projected = any(isinstance(c, ProjectionCallback) for c in trainer.callbacks)
        module_needs = MODULE_MEMBERS if projected else {"feature_metadata": MODULE_MEMBERS["feature_metadata"]}
        if not projected and not hasattr(pl_module, "feature_dim"):
            module_needs = {**module_needs, "feature_dim": "feature_dim() -> width of its features (or add a "
                                                           "ProjectionCallback to project gradients)"}
        check_members(type(self).__name__, pl_module, module_needs, trainer.datamodule, DATA_MEMBERS)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self.check(trainer, pl_module)
        num_rows, _ = self.data_metadata(trainer)
        outputs = self.outputs(trainer, pl_module)
        self.stores = [(out, self._open(trainer, num_rows, out)) for out in outputs]
        # A row counts as done only when every store has it (a crash between two stores' writes redoes it).
        done = np.logical_and.reduce([store.written_mask() for _, store in self.stores])
        dm = trainer.datamodule
        where = ", ".join(out.path for out in outputs)
        written = np.flatnonzero(done)
        if written.size:
            log.info("feature store %s: %d of %d rows already written, computing the rest", where, written.size,
                     num_rows)
            dm.skip_indices = set(dm.skip_indices or ()) | set(written.tolist())
        # Rows the datamodule will never yield (dropped on request) are recorded as excluded, not awaited.
        planned = getattr(dm, "predict_indices", None)
        if planned is None:
            self._excluded = []
        else:
            covered = done.copy()
            covered[np.asarray(planned, dtype=np.int64)] = True
            self._excluded = np.flatnonzero(~covered).tolist()
        self._reasons = _drop_reasons(dm, self._excluded)
        if self._excluded:
            log.warning("feature store %s: %d rows are dropped by the datamodule and get no features, e.g. %s",
                        where, len(self._excluded), [self._reasons.get(i, {}).get("id", i) for i in self._excluded[:10]])

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        # Rows go where prediction["index"] says, never by position in the batch or the loader.
        features = prediction["features"]
        for out, store in self.stores:
            store.write(prediction["index"], features if out.columns is None else features[:, out.columns])

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Not on_predict_end: a rank given no rows (fewer rows than ranks) skips the predict hooks but not this one.
        if stage != "predict" or not self.stores:
            return
        trainer.strategy.barrier("feature_store_finalize")
        message = None
        if trainer.is_global_zero:
            try:
                for _, store in self.stores:
                    store.finalize(self._excluded, self._reasons)
            except StoreMismatchError as e:
                message = str(e)
        message = trainer.strategy.broadcast(message, src=0)
        for _, store in self.stores:
            store.close()
        if message is not None:
            raise StoreMismatchError(message)


def _drop_reasons(dm, excluded: list[int]) -> dict[int, dict]:
    """{row index: {"id", "reason"}} of excluded rows, from the datamodule's record of what it dropped."""
    if not excluded:
        return {}
    if hasattr(dm, "drop_records"):  # by row index (a token cache's record): no list of every id is needed
        records = {d["index"]: d for d in dm.drop_records()}
        return {i: {"id": records[i]["id"], "reason": records[i]["reason"]} for i in excluded if i in records}
    dropped = {d.id: d.reason for d in getattr(dm, "dropped", [])}
    ids = getattr(dm, "ids", None)
    if not excluded or not dropped or ids is None:
        return {}
    return {i: {"id": ids[i], "reason": dropped.get(ids[i], "dropped")} for i in excluded}
