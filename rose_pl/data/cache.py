"""The token cache: a dataset read, validated and tokenized once, then memory-mapped by every stage and every rank.

One folder per (dataset content, tokenizer, encoding settings):

```
meta.json                  what it was made from: the source, its fingerprint, the tokenizer, the settings, its key
complete.json              written last: rows kept / dropped, truncation, tokens, build time (its presence = complete)
builds.jsonl               one line per build (host, pid, rows, seconds): a run tokenizes its pool once
<p>tokens.bin, <p>loss.bin token ids (int32) and loss flags (uint8; labels are the ids where 1, -100 elsewhere) of all
                           rows back to back, per sequence: p = "" (instruction rows) or "chosen_" / "rejected_" (pairs)
<p>offsets.npy             int64, rows + 1: row i is [offsets[i], offsets[i + 1])
length.npy, truncated.npy  int32 per row: its longest sequence (0 when dropped); tokens truncation removed
dropped.npy                bool per row (no loss token left: dropped on request, recorded in drops.json with why)
ids.bin, ids_offsets.npy   each row's id (utf-8), renamed repeats included (duplicate_ids: rename)
datasets.npy + .json       each row's source dataset, as codes into the names
tasks.npy + tasks.json     each row's task (preference sets)
where.npy                  the JSONL line of each row (-1 for other sources: rows are named by index)
```

A rank touches only the pages of its own rows: nothing here is held as Python objects. The build streams the source
in shards (`shards/<k>/`, each finished atomically, so a killed build resumes at the next shard), optionally over
`num_proc` worker processes, with batched fast-tokenizer calls, then concatenates the shards. A file lock beside the
folder makes concurrent builders (several nodes on shared storage) wait for the first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np

from rose_pl.config import Dataset, DatasetSpec, dataset_spec
from rose_pl.errors import ConfigError, DataFormatError
from rose_pl.files import FILE_MODE, atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
META_FILE, COMPLETE_FILE, BUILDS_FILE, DROPS_FILE = "meta.json", "complete.json", "builds.jsonl", "drops.json"
SHARD_ROWS = 8192
"""Rows per shard of a build (the unit of resume and of parallelism)."""
IGNORE_INDEX = -100


@dataclass(frozen=True)
class CacheSettings:
    """Everything besides the rows' bytes and the tokenizer that changes what the cache holds."""

    kind: Literal["sft", "preference", "preference_sft"] = "sft"
    max_seq_length: int = 2048
    chat_template: str = "tulu"
    prompt_truncation: str = "keep_start"
    on_empty: str = "drop"
    duplicate_ids: str = "error"
    shots_per_task: int | str | None = None
    all_pairs: bool = False
    on_invalid_pair: str = "error"
    preference_format: str | None = None
    max_prompt_length: int = 256

    @property
    def prefixes(self) -> tuple[str, ...]:
        return ("chosen_", "rejected_") if self.kind == "preference" else ("",)


def tokenizer_id(tokenizer) -> str:
    """A digest of what the tokenizer does (its vocabulary, merges, specials and chat template)."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    digest.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                              getattr(tokenizer, "chat_template", None)], default=str).encode())
    return digest.hexdigest()[:16]


def cache_key(source_fingerprint: str, tokenizer: str, settings: CacheSettings) -> str:
    text = json.dumps({"source": source_fingerprint, "tokenizer": tokenizer, "settings": asdict(settings),
                       "format": CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- reading a finished cache --------------------------------------------------------------------------------
class TokenCache:
    """A finished cache folder, memory-mapped on first use."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / COMPLETE_FILE).is_file():
            raise DataFormatError(self.folder, None, "not a finished token cache (no complete.json): build it again")
        self.meta = json.loads((self.folder / META_FILE).read_text())
        if self.meta.get("format") != CACHE_FORMAT:
            raise DataFormatError(self.folder / META_FILE, "format", f"token cache format {self.meta.get('format')!r},"
                                                                     f" this rose_pl reads {CACHE_FORMAT}")
        self.complete = json.loads((self.folder / COMPLETE_FILE).read_text())
        self.settings = CacheSettings(**self.meta["settings"])
        self.num_rows = int(self.meta["rows"])
        self._arrays: dict[str, np.ndarray] = {}

    def _array(self, name: str, dtype=None) -> np.ndarray:
        if name not in self._arrays:
            path = self.folder / name
            if name.endswith(".npy"):
                self._arrays[name] = np.load(path, mmap_mode="r")
            elif path.stat().st_size == 0:
                self._arrays[name] = np.zeros(0, dtype=dtype)
            else:
                self._arrays[name] = np.memmap(path, dtype=dtype, mode="r")
        return self._arrays[name]

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def lengths(self) -> np.ndarray:
        return self._array("length.npy")

    @property
    def dropped(self) -> np.ndarray:
        return self._array("dropped.npy")

    @property
    def truncated(self) -> np.ndarray:
        return self._array("truncated.npy")

    def kept(self) -> np.ndarray:
        """Indices of the rows not dropped."""
        return np.flatnonzero(~self.dropped)

    def id(self, i: int) -> str:
        offsets = self._array("ids_offsets.npy")
        return bytes(self._array("ids.bin", np.uint8)[offsets[i]:offsets[i + 1]]).decode("utf-8")

    def ids(self, indices: Sequence[int] | None = None) -> list[str]:
        """Ids of `indices` (all rows when None: O(N) Python strings, for small sets)."""
        offsets, blob = self._array("ids_offsets.npy"), self._array("ids.bin", np.uint8)
        rows = range(self.num_rows) if indices is None else indices
        return [bytes(blob[offsets[i]:offsets[i + 1]]).decode("utf-8") for i in rows]

    def _names(self, what: str) -> list[str]:
        return json.loads((self.folder / f"{what}.json").read_text())

    def dataset_names(self) -> list[str]:
        return self._names("datasets")

    @property
    def dataset_codes(self) -> np.ndarray:
        return self._array("datasets.npy")

    def datasets(self, indices: Sequence[int] | None = None) -> list[str]:
        names, codes = self.dataset_names(), self.dataset_codes
        rows = range(self.num_rows) if indices is None else indices
        return [names[codes[i]] for i in rows]

    def tasks(self) -> list[str] | None:
        """Task of every row (preference sets), or None."""
        if not (self.folder / "tasks.npy").is_file():
            return None
        names = self._names("tasks")
        return [names[c] for c in self._array("tasks.npy")]

    def where(self, i: int) -> Any:
        line = int(self._array("where.npy")[i])
        return line if line >= 0 else f"row {i}"

    def drops(self) -> list[dict]:
        """The rows dropped (no loss token left), each with its index, id, where and why."""
        return json.loads((self.folder / DROPS_FILE).read_text())["dropped"]

    def invalid_pairs(self) -> list[dict]:
        """Preference pairs left out when reading (on_invalid_pair: drop), with where and why."""
        return json.loads((self.folder / DROPS_FILE).read_text()).get("invalid", [])

    def row(self, i: int) -> dict[str, Any]:
        """Row i as a feature dict: [prefix]input_ids and [prefix]labels (int32 arrays) and its index."""
        out: dict[str, Any] = {"index": int(i)}
        for p in self.settings.prefixes:
            offsets = self._array(f"{p}offsets.npy")
            a, b = int(offsets[i]), int(offsets[i + 1])
            ids = np.array(self._array(f"{p}tokens.bin", np.int32)[a:b])
            loss = self._array(f"{p}loss.bin", np.uint8)[a:b]
            out[f"{p}input_ids"] = ids
            out[f"{p}labels"] = np.where(loss != 0, ids, IGNORE_INDEX).astype(np.int32)
        return out

    def figures(self) -> dict:
        """What the build recorded: rows kept and dropped, rows and tokens truncation cut, tokens."""
        return dict(self.complete.get("figures", {}))


# ---- building one -------------------------------------------------------------------------------------------
class _Shard:
    """One shard's rows being built, then written as its own folder."""

    def __init__(self, prefixes: Sequence[str]):
        self.prefixes = prefixes
        self.tokens = {p: [] for p in prefixes}
        self.loss = {p: [] for p in prefixes}
        self.lengths = {p: [] for p in prefixes}
        self.length, self.truncated, self.dropped, self.where = [], [], [], []
        self.ids, self.datasets, self.tasks, self.drops = [], [], [], []

    def add(self, index: int, where, id_: str, dataset: str, task: str | None, encoded, truncated: int,
            reason: str | None) -> None:
        longest = 0
        for p in self.prefixes:
            ids = [] if encoded is None else encoded[f"{p}input_ids"]
            labels = [] if encoded is None else encoded[f"{p}labels"]
            self.tokens[p].append(np.asarray(ids, dtype=np.int32))
            self.loss[p].append(np.asarray(labels, dtype=np.int64) != IGNORE_INDEX)
            self.lengths[p].append(len(ids))
            longest = max(longest, len(ids))
        self.length.append(longest)
        self.truncated.append(truncated)
        self.dropped.append(reason is not None)
        self.where.append(where if isinstance(where, int) else -1)
        self.ids.append(id_)
        self.datasets.append(dataset)
        self.tasks.append(task)
        if reason is not None:
            self.drops.append({"index": index, "id": id_, "where": where, "reason": reason})

    def write(self, folder: Path) -> None:
        with atomic_dir(folder) as tmp:
            for p in self.prefixes:
                flat = np.concatenate(self.tokens[p]) if self.tokens[p] else np.zeros(0, np.int32)
                flat.astype(np.int32).tofile(tmp / f"{p}tokens.bin")
                (np.concatenate(self.loss[p]) if self.loss[p] else np.zeros(0, bool)).astype(np.uint8).tofile(
                    tmp / f"{p}loss.bin")
                np.save(tmp / f"{p}lengths.npy", np.asarray(self.lengths[p], dtype=np.int64))
            np.save(tmp / "length.npy", np.asarray(self.length, dtype=np.int32))
            np.save(tmp / "truncated.npy", np.asarray(self.truncated, dtype=np.int32))
            np.save(tmp / "dropped.npy", np.asarray(self.dropped, dtype=bool))
            np.save(tmp / "where.npy", np.asarray(self.where, dtype=np.int64))
            (tmp / "rows.json").write_text(json.dumps({"ids": self.ids, "datasets": self.datasets,
                                                       "tasks": self.tasks, "drops": self.drops}))


def _encoder(tokenizer, settings: CacheSettings):
    from rose_pl.data.encoding import Encoder

    return Encoder(tokenizer, settings.max_seq_length, settings.chat_template, settings.prompt_truncation,
                   settings.preference_format if settings.kind == "preference" else None, settings.max_prompt_length)


def _keep_or_drop(name: str, settings: CacheSettings, example, result) -> tuple[Any, int, str | None]:
    from rose_pl.data.encoding import EmptyLossError

    encoded, truncated = result
    if isinstance(encoded, EmptyLossError):
        if settings.on_empty == "error":
            raise DataFormatError(name, example.where, f"id {example.id!r}: {encoded} (on_empty='drop' skips such rows)")
        return None, truncated, str(encoded)
    return encoded, truncated, None


def _build_instruction_shard(source, tokenizer, settings: CacheSettings, start: int, stop: int, folder: Path) -> None:
    from rose_pl.data.formats import instruction_from_row, rename_columns, stem_of

    encoder, stem, shard = _encoder(tokenizer, settings), stem_of(source.spec), _Shard(settings.prefixes)
    for batch in source.batches(start, stop, size=512):
        examples = [instruction_from_row(source.name, stem, where, i, rename_columns(row, source.spec.columns))
                    for i, where, row in batch]
        for (index, _, _), example, result in zip(batch, examples,
                                                  encoder.encode_messages_batch([e.messages for e in examples])):
            encoded, truncated, reason = _keep_or_drop(source.name, settings, example, result)
            shard.add(index, example.where, example.id, example.dataset, None, encoded, truncated, reason)
    shard.write(folder)


_WORKER: dict = {}


def _worker_init(spec: dict, tokenizer_name: str, settings: dict) -> None:
    from rose_pl.data.sources import open_source
    from rose_pl.hub import load_tokenizer

    _WORKER.update(source=open_source(DatasetSpec(**spec)), tokenizer=load_tokenizer(tokenizer_name),
                   settings=CacheSettings(**settings))


def _worker_shard(start: int, stop: int, folder: str) -> int:
    _build_instruction_shard(_WORKER["source"], _WORKER["tokenizer"], _WORKER["settings"], start, stop, Path(folder))
    return stop - start


class _Lock:
    """An exclusive flock on a file beside the cache folder, waited for (another builder finishes first)."""

    def __init__(self, folder: Path):
        self.file = folder.parent / f".{folder.name}.lock"

    def __enter__(self):
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.file, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("token cache %s: another process is building it, waiting", self.file.parent)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _concat_into(out: Path, parts: list[Path]) -> None:
    with open(out, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 24)


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _renamed_ids(folder: Path, digests: np.ndarray, name: str, duplicate_ids: str) -> dict[int, str]:
    """{row: new id} for rows that repeat an id: an error naming both rows, or id#2, id#3... in row order (logged).
    Repeats are found through 64-bit digests of the ids, so no set of every id is held."""
    from rose_pl.data.formats import unique_id

    values, counts = np.unique(digests, return_counts=True)
    candidates = np.flatnonzero(np.isin(digests, values[counts > 1]))
    if not candidates.size:
        return {}
    offsets = np.load(folder / "ids_offsets.npy", mmap_mode="r")
    blob = np.memmap(folder / "ids.bin", dtype=np.uint8, mode="r")
    where = np.load(folder / "where.npy", mmap_mode="r")
    seen: dict[str, Any] = {}
    renamed: list[str] = []
    out = {}
    for i in candidates.tolist():
        id_ = bytes(blob[offsets[i]:offsets[i + 1]]).decode("utf-8")
        at = int(where[i]) if where[i] >= 0 else f"row {i}"
        new = unique_id(id_, seen, at, name, duplicate_ids, renamed)
        seen[new] = at
        if new != id_:
            out[i] = new
    if renamed:
        log.warning("%s: %d duplicate ids renamed: %s", name, len(renamed), "; ".join(renamed[:20]))
    return out


def build_cache(data: Dataset, tokenizer_name: str, settings: CacheSettings, folder: str | Path,
                num_proc: int = 1, source=None, tokenizer=None) -> TokenCache:
    """Read, validate and tokenize `data` into `folder` (resuming a killed build); returns the finished cache.
    A finished folder of the same key is returned as it is. `tokenizer`: the one named `tokenizer_name`, loaded
    already (worker processes load it by name)."""
    from rose_pl.data.sources import data_fingerprint, open_source
    from rose_pl.hub import load_tokenizer

    folder = Path(folder)
    spec = dataset_spec(data)
    with _Lock(folder):
        start = time.perf_counter()
        if settings.kind == "sft":
            source = source or open_source(spec)
        fingerprint = source.fingerprint() if source is not None else data_fingerprint(spec)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_name)
        key = cache_key(fingerprint, tokenizer_id(tokenizer), settings)
        if (folder / COMPLETE_FILE).is_file():
            existing = json.loads((folder / META_FILE).read_text())
            if existing.get("key") == key:
                return TokenCache(folder)
            log.warning("token cache %s holds other data or settings (key %s, wanted %s): building it again", folder,
                        existing.get("key"), key)
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": CACHE_FORMAT, "key": key,
                "source": {**asdict(spec), "format": source.format if source is not None else "preferences",
                           "fingerprint": fingerprint},
                "tokenizer": {"name": tokenizer_name, "id": tokenizer_id(tokenizer)}, "settings": asdict(settings)}
        if (folder / META_FILE).is_file() and json.loads((folder / META_FILE).read_text()).get("key") != key:
            shutil.rmtree(folder)  # shards of another build: never resumed into
            folder.mkdir(parents=True)
        atomic_write_json(folder / META_FILE, meta)
        if settings.kind == "sft":
            rows, built = _build_instruction_shards(source, tokenizer, tokenizer_name, settings, folder, num_proc)
            extra: dict = {}
        else:
            rows, extra = _build_preferences(spec, tokenizer, settings, folder)
            built = rows
        _merge(folder, settings, rows, spec.name, extra)
        atomic_write_json(folder / META_FILE, {**meta, "rows": rows})
        seconds = time.perf_counter() - start
        with open(folder / BUILDS_FILE, "a") as f:
            f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "rows": built,
                                "seconds": round(seconds, 2), "time": time.time()}) + "\n")
        figures = _figures(folder, settings)
        atomic_write_json(folder / COMPLETE_FILE, {"figures": figures, "seconds": round(seconds, 2)})
        cache = TokenCache(folder)
        log.info("token cache %s: %d rows (%d dropped, %d truncated) in %.1f s", folder, rows, figures["dropped"],
                 figures["truncated_rows"], seconds)
        return cache


def _build_instruction_shards(source, tokenizer, tokenizer_name: str, settings: CacheSettings, folder: Path,
                              num_proc: int) -> tuple[int, int]:
    """Build every unfinished shard; returns (rows of the source, rows tokenized now)."""
    n = len(source)
    if n == 0:
        raise DataFormatError(source.name, None, "no rows")
    shards = [(s, min(s + SHARD_ROWS, n), folder / "shards" / f"{k:06d}") for k, s in enumerate(range(0, n, SHARD_ROWS))]
    todo = [(a, b, f) for a, b, f in shards if not f.is_dir()]
    if len(todo) < len(shards):
        log.info("token cache %s: %d of %d shards done already, building the rest", folder, len(shards) - len(todo),
                 len(shards))
    if num_proc > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(num_proc, len(todo)), mp_context=context, initializer=_worker_init,
                                 initargs=(asdict(source.spec), tokenizer_name, asdict(settings))) as pool:
            for _ in pool.map(_worker_shard, [a for a, _, _ in todo], [b for _, b, _ in todo],
                              [str(f) for _, _, f in todo]):
                pass
    else:
        from rose_pl.progress import Progress

        with Progress(sum(b - a for a, b, _ in todo), f"tokenize {source.name}", every_seconds=30) as progress:
            for a, b, f in todo:
                _build_instruction_shard(source, tokenizer, settings, a, b, f)
                progress.update(b - a)
    return n, sum(b - a for a, b, _ in todo)


def _build_preferences(spec: DatasetSpec, tokenizer, settings: CacheSettings, folder: Path) -> tuple[int, dict]:
    """A preference set (small: read whole), as pairs or as its SFT view, in one shard."""
    from rose_pl.data.formats import Dropped, read_preferences

    invalid: list[Dropped] = []
    pairs = read_preferences(spec, settings.shots_per_task, settings.all_pairs, on_invalid_pair=settings.on_invalid_pair,
                             dropped=invalid)
    encoder, shard = _encoder(tokenizer, settings), _Shard(settings.prefixes)
    if settings.kind == "preference":
        results = encoder.encode_preference_batch(pairs)
    else:
        results = encoder.encode_messages_batch([p.as_instruction().messages for p in pairs])
    for i, (pair, result) in enumerate(zip(pairs, results)):
        encoded, truncated, reason = _keep_or_drop(spec.name, settings, pair, result)
        shard.add(i, pair.where, pair.id, pair.task, pair.task, encoded, truncated, reason)
    shard.write(folder / "shards" / f"{0:06d}")
    return len(pairs), {"invalid": [{"id": d.id, "where": d.where, "reason": d.reason} for d in invalid]}


def _merge(folder: Path, settings: CacheSettings, rows: int, name: str, extra: dict) -> None:
    """The shards as the cache's files, shard by shard (then the shards are removed)."""
    shards = sorted((folder / "shards").iterdir())
    for p in settings.prefixes:
        _concat_into(folder / f"{p}tokens.bin", [s / f"{p}tokens.bin" for s in shards])
        _concat_into(folder / f"{p}loss.bin", [s / f"{p}loss.bin" for s in shards])
        lengths = np.concatenate([np.load(s / f"{p}lengths.npy") for s in shards])
        np.save(folder / f"{p}offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    for array in ("length.npy", "truncated.npy", "dropped.npy", "where.npy"):
        np.save(folder / array, np.concatenate([np.load(s / array) for s in shards]))
    names: dict[str, dict[str, int]] = {"datasets": {}, "tasks": {}}
    codes: dict[str, list[np.ndarray]] = {"datasets": [], "tasks": []}
    id_lengths, digests, drops = [], [], []
    with open(folder / "ids.bin", "wb") as blob:
        for s in shards:
            part = json.loads((s / "rows.json").read_text())
            encoded = [i.encode("utf-8") for i in part["ids"]]
            blob.write(b"".join(encoded))
            id_lengths.append(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
            digests.append(np.fromiter(map(_digest, part["ids"]), dtype=np.uint64, count=len(encoded)))
            for what in ("datasets", "tasks"):
                table = names[what]
                codes[what].append(np.asarray([table.setdefault(v, len(table)) for v in part[what]], dtype=np.uint32))
            drops += part["drops"]
    if sum(map(len, id_lengths)) != rows:
        raise RuntimeError(f"token cache {folder}: the shards hold {sum(map(len, id_lengths))} rows, the source {rows}")
    np.save(folder / "ids_offsets.npy", np.concatenate([[0], np.cumsum(np.concatenate(id_lengths))]).astype(np.int64))
    renamed = _renamed_ids(folder, np.concatenate(digests), name, settings.duplicate_ids)
    if renamed:
        _rewrite_ids(folder, renamed)
        for d in drops:
            d["id"] = renamed.get(d["index"], d["id"])
    for what in ("datasets",) + (("tasks",) if settings.kind != "sft" else ()):
        np.save(folder / f"{what}.npy", np.concatenate(codes[what]))
        (folder / f"{what}.json").write_text(json.dumps(list(names[what])))
    atomic_write_json(folder / DROPS_FILE, {"dropped": drops, **extra})
    shutil.rmtree(folder / "shards")


def _rewrite_ids(folder: Path, renamed: dict[int, str]) -> None:
    offsets = np.load(folder / "ids_offsets.npy")
    blob = np.fromfile(folder / "ids.bin", dtype=np.uint8)
    lengths = np.diff(offsets)
    for i in sorted(renamed):
        new = renamed[i].encode("utf-8")
        lengths[i] = len(new)
    with open(folder / "ids.bin.tmp", "wb") as f:
        previous = 0
        for i in sorted(renamed):
            f.write(blob[offsets[previous]:offsets[i]].tobytes())
            f.write(renamed[i].encode("utf-8"))
            previous = i + 1
        f.write(blob[offsets[previous]:].tobytes())
    os.replace(folder / "ids.bin.tmp", folder / "ids.bin")
    np.save(folder / "ids_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def _figures(folder: Path, settings: CacheSettings) -> dict:
    dropped = np.load(folder / "dropped.npy")
    truncated = np.load(folder / "truncated.npy")
    tokens = sum((folder / f"{p}tokens.bin").stat().st_size // 4 for p in settings.prefixes)
    return {"rows": int(dropped.size - dropped.sum()), "dropped": int(dropped.sum()),
            "truncated_rows": int((truncated > 0).sum()), "truncated_tokens": int(truncated.sum()), "tokens": tokens}
