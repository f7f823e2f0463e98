"""DataModules: `SFTDataModule` for warmup training, `FeatureDataModule` for predict-time featurization.

Both read their rows through the token cache (`rose_pl.data.cache`): the dataset is read, validated and tokenized
once (in `prepare_data`, on one process per node, or by the run's cache stage), and every stage and rank then
memory-maps it. No rank holds the rows as Python objects; a rank reads only its own rows' tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from typing import Union

from rose_pl.config import dataset_spec, positive_int
from rose_pl.data.cache import CacheSettings, TokenCache, build_cache, cache_key, tokenizer_id
from rose_pl.data.collate import PreferenceCollator, SFTCollator
from rose_pl.data.encoding import Encoder, PreferenceFormat, PromptTruncation, check_settings
from rose_pl.data.formats import Dropped, ShotsPerTask, check_shots_per_task, row_indices
from rose_pl.data.samplers import LengthGroupedSampler, LengthSortedSampler, TokenBudgetBatches, padding_fraction
from rose_pl.errors import ConfigError, DataFormatError
from rose_pl.files import file_digest

log = logging.getLogger(__name__)

DataRef = Union[str, dict]
"""A dataset as DataModules take it: a path or hub id, or a dict of DatasetSpec's fields (path, split, subset,
revision, columns). Not `Union[str, DatasetSpec]`: jsonargparse then reads a path-like string as a config file of the
dataclass, a whole pool read and parsed in every stage process for nothing."""


class CachedRows(Dataset):
    """Rows of a token cache; item `i` is the feature dict of row `rows[i]` ("index" = its row in the dataset)."""

    def __init__(self, cache: TokenCache, rows: np.ndarray):
        self.cache, self.rows = cache, np.asarray(rows, dtype=np.int64)
        self.lengths = np.asarray(cache.lengths)[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.cache.row(int(self.rows[i]))


TOKEN_CACHE_ENV = "ROSE_PL_TOKEN_CACHE"


def default_cache_root() -> Path:
    """Token caches of DataModules used outside a run: `$ROSE_PL_TOKEN_CACHE`, else `tokenized/` in rose_pl's cache
    folder (`$ROSE_PL_CACHE`, else ~/.cache/rose_pl)."""
    import os

    from rose_pl.hub import cache_dir

    return Path(os.environ[TOKEN_CACHE_ENV]) if os.environ.get(TOKEN_CACHE_ENV) else cache_dir() / "tokenized"


def open_cache(data: DataRef, tokenizer_name: str, tokenizer, settings: CacheSettings, cache: str | None,
               num_proc: int = 1, build: bool = True, root: str | None = None) -> TokenCache:
    """The token cache of `data` under these settings: the folder `cache` (a run's, built by its cache stage; its
    record must match the settings) or one under `root` (default: `default_cache_root()`) named by its key, so that
    changed data gets a new one; built if missing."""
    from rose_pl.data.sources import data_fingerprint

    spec = dataset_spec(data)
    if cache is not None:
        folder = Path(cache)
        if (folder / "complete.json").is_file():
            found = TokenCache(folder)
            mismatch = [k for k, v in found.meta["settings"].items() if getattr(settings, k, v) != v]
            if found.meta["source"]["path"] != spec.path:
                mismatch.append(f"source {found.meta['source']['path']}")
            if found.meta["tokenizer"]["name"] != tokenizer_name:
                mismatch.append(f"tokenizer {found.meta['tokenizer']['name']}")
            if mismatch:
                raise ConfigError(f"token cache {folder} was built from other data or settings ({', '.join(mismatch)}"
                                  f"): remove it, or point cache at another folder")
            return found
    else:
        key = cache_key(data_fingerprint(spec), tokenizer_id(tokenizer), settings)
        base = Path(root) if root is not None else default_cache_root()
        folder = base / f"{Path(spec.path.rstrip('/')).stem or 'data'}-{settings.kind}-{key}"
        if (folder / "complete.json").is_file():
            return TokenCache(folder)
    if not build:
        raise DataFormatError(folder, None, "the token cache is not built yet")
    return build_cache(spec, tokenizer_name, settings, folder, num_proc=num_proc, tokenizer=tokenizer)


def _common_problems(*, batch_size, num_workers, on_empty, duplicate_ids, max_seq_length, prompt_truncation,
                     preference_format=None, max_prompt_length=256) -> list[str]:
    """Problems with the arguments both DataModules take (reported together with the caller's own)."""
    problems = check_settings(max_seq_length, prompt_truncation, preference_format, max_prompt_length)
    problems += positive_int("batch_size", batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        problems.append(f"num_workers: {num_workers!r} is not a non-negative integer")
    for name, value, allowed in (("on_empty", on_empty, ("error", "drop")),
                                 ("duplicate_ids", duplicate_ids, ("error", "rename"))):
        if value not in allowed:
            problems.append(f"{name}: {value!r} is not one of {list(allowed)}")
    return problems


class _TokenizerDataModule(L.LightningDataModule):
    """Loads the tokenizer named by `self.tokenizer_name` on first use; builds its token caches in `prepare_data`."""

    tokenizer_name: str
    _tokenizer = None

    @property
    def tokenizer(self):
        """The tokenizer, loaded on first use."""
        if self._tokenizer is None:
            from rose_pl.hub import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def _caches(self) -> list[tuple[DataRef, CacheSettings, str | None]]:
        """(data, settings, cache folder) of every cache this module reads."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Build the token caches (Lightning calls this on one process per node, the others wait)."""
        for data, settings, cache in self._caches():
            self._open(data, settings, cache)

    def _open(self, data: DataRef, settings: CacheSettings, cache: str | None) -> TokenCache:
        return open_cache(data, self.tokenizer_name, self.tokenizer, settings, cache, self.hparams.num_proc,
                          root=self.hparams.get("cache_root"))


def _drops(cache: TokenCache, name: str) -> list[Dropped]:
    return ([Dropped(name, d["where"], d["id"], d["reason"]) for d in cache.invalid_pairs()]
            + [Dropped(name, d["where"], d["id"], d["reason"]) for d in cache.drops()])


class SFTDataModule(_TokenizerDataModule):
    """Instruction data for (warmup) fine-tuning: chat template, assistant-only loss, length-grouped batches."""

    def __init__(
        self,
        train_file: DataRef,
        tokenizer: str,
        val_file: DataRef | None = None,
        max_seq_length: int = 2048,
        batch_size: int = 1,
        subset_fraction: float | None = None,
        subset_seed: int = 0,
        selection: str | None = None,
        group_by_length: bool = True,
        shuffle_seed: int = 0,
        num_workers: int = 0,
        chat_template: str = "tulu",
        prompt_truncation: PromptTruncation = "keep_start",
        on_empty: Literal["error", "drop"] = "drop",
        duplicate_ids: Literal["error", "rename"] = "error",
        cache: str | None = None,
        num_proc: int = 1,
    ):
        """
        Args:
            train_file: Instruction data to train on: a .jsonl/.json file, a Parquet file or folder, a save_to_disk
                folder, a hub id, or {path, split, subset, revision, columns} (messages or prompt/completion rows).
            tokenizer: Model name or path whose tokenizer to use (hub id, local folder or embedded name).
            val_file: Optional instruction data for validation loss.
            max_seq_length: Tokens kept per example; longer ones lose prompt tokens first, then their end.
            batch_size: Examples per batch on each device.
            subset_fraction: Train on a seeded random fraction of the pool (e.g. 0.05 for warmup); None uses all.
            subset_seed: Seed of the subset draw.
            selection: Train on the rows of a selection (its selection.json sidecar, written by `rose-pl select` or
                `run` over this same train_file), in rank order.
            group_by_length: Batch examples of similar length together (less padding).
            shuffle_seed: Seed of the training order (plus the epoch).
            num_workers: DataLoader worker processes.
            chat_template: Chat format: tulu (LESS/ROSE), chatml, tokenizer (the tokenizer's own) or an import path.
            prompt_truncation: Which end of a too-long prompt to keep: keep_start or keep_end.
            on_empty: A row with no loss token left after truncation: drop it (logged and counted) or error.
            duplicate_ids: Rows that repeat an id: error, or rename them (id#2, ...) and report.
            cache: Token cache folder of train_file (a run's); None: one under $ROSE_PL_CACHE/tokenized by key.
            num_proc: Processes that tokenize the data when its cache is built.
        """
        super().__init__()
        problems = _common_problems(batch_size=batch_size, num_workers=num_workers, on_empty=on_empty,
                                    duplicate_ids=duplicate_ids, max_seq_length=max_seq_length,
                                    prompt_truncation=prompt_truncation)
        if subset_fraction is not None and not 0 < subset_fraction <= 1:
            problems.append(f"subset_fraction: {subset_fraction!r} is not in (0, 1]")
        if subset_fraction is not None and selection is not None:
            problems.append("give subset_fraction or selection, not both")
        problems += positive_int("num_proc", num_proc)
        if problems:
            raise ConfigError(problems)
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self._tokenizer = None
        self.cache: TokenCache | None = None
        self.subset_indices: list[int] | None = None
        """Pool rows trained on (ascending for a subset, rank order for a selection), dropped rows included."""
        self.dropped: list[Dropped] = []
        self.padding_fraction: float | None = None
        """Padding share of this rank's batches in the first epoch, set by `train_dataloader`."""
        self.train_dataset: CachedRows | None = None
        self.val_dataset: CachedRows | None = None
        self._restored_state: dict | None = None

    def settings(self) -> CacheSettings:
        hp = self.hparams
        return CacheSettings("sft", hp.max_seq_length, hp.chat_template, hp.prompt_truncation, hp.on_empty,
                             hp.duplicate_ids)

    def _caches(self):
        out = [(self.hparams.train_file, self.settings(), self.hparams.cache)]
        if self.hparams.val_file is not None:
            out.append((self.hparams.val_file, self.settings(), None))
        return out

    def encoder(self) -> Encoder:
        """The encoder of these settings (tokenizer loaded on first use)."""
        hp = self.hparams
        return Encoder(self.tokenizer, hp.max_seq_length, hp.chat_template, hp.prompt_truncation,
                       preference_format=None)

    def _rows(self, cache: TokenCache) -> np.ndarray:
        hp = self.hparams
        n = cache.num_rows
        if hp.selection is not None:
            rows = row_indices(hp.selection, n)
            self.subset_indices = rows.tolist()
            log.info("%s: training on the %d rows of selection %s", dataset_spec(hp.train_file).name, len(rows),
                     hp.selection)
        elif hp.subset_fraction is not None:
            k = max(1, int(hp.subset_fraction * n))
            generator = torch.Generator().manual_seed(hp.subset_seed)
            self.subset_indices = sorted(torch.randperm(n, generator=generator)[:k].tolist())
            rows = np.asarray(self.subset_indices, dtype=np.int64)
            log.info("%s: training on a subset of %d of %d rows (fraction %s, seed %d); first indices %s",
                     dataset_spec(hp.train_file).name, k, n, hp.subset_fraction, hp.subset_seed,
                     self.subset_indices[:20])
        else:
            rows = np.arange(n)
        return rows[~np.asarray(cache.dropped)[rows]]

    def setup(self, stage: str | None = None) -> None:
        """Open (or build) the token cache and pick the rows trained on (once; a second call is free)."""
        hp = self.hparams
        if self.train_dataset is None:
            self.cache = self._open(hp.train_file, self.settings(), hp.cache)
            rows = self._rows(self.cache)
            name = dataset_spec(hp.train_file).name
            chosen = set(self.subset_indices) if self.subset_indices is not None else None
            self.dropped = [Dropped(name, d["where"], d["id"], d["reason"]) for d in self.cache.drops()
                            if chosen is None or d["index"] in chosen]
            if self.dropped:
                log.warning("%s: dropped %d of %d rows with no loss token after truncation: %s", name,
                            len(self.dropped), len(self.dropped) + len(rows),
                            ", ".join(d.id for d in self.dropped[:50]) + (" ..." if len(self.dropped) > 50 else ""))
            self.train_dataset = CachedRows(self.cache, rows)
            if hp.val_file is not None:
                val = self._open(hp.val_file, self.settings(), None)
                self.val_dataset = CachedRows(val, val.kept())
            if not len(self.train_dataset):
                raise DataFormatError(name, None, "every row was dropped: nothing to train on")
        if self._restored_state is not None:
            self._check_restored()

    def _replicas(self) -> tuple[int, int]:
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        """Length-grouped (or plainly shuffled) batches; the sampler is DDP-aware itself."""
        self.setup("fit")
        hp = self.hparams
        world, rank = self._replicas()
        if hp.group_by_length:
            sampler = LengthGroupedSampler(self.train_dataset.lengths, hp.batch_size, num_replicas=world, rank=rank,
                                           seed=hp.shuffle_seed, shuffle=True)
        else:
            sampler = DistributedSampler(self.train_dataset, num_replicas=world, rank=rank, shuffle=True,
                                         seed=hp.shuffle_seed)
        if self.padding_fraction is None:
            order = list(sampler)
            batches = [order[i : i + hp.batch_size] for i in range(0, len(order), hp.batch_size)]
            self.padding_fraction = padding_fraction(self.train_dataset.lengths, batches)
            log.info("%s: padding is %.1f%% of the token slots in rank %d's batches (group_by_length=%s)",
                     dataset_spec(hp.train_file).name, 100 * self.padding_fraction, rank, hp.group_by_length)
        return DataLoader(self.train_dataset, batch_size=hp.batch_size, sampler=sampler,
                          collate_fn=SFTCollator(self.tokenizer.pad_token_id), num_workers=hp.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order (Lightning adds the distributed sampler)."""
        self.setup("validate")
        if self.val_dataset is None:
            return []
        return DataLoader(self.val_dataset, batch_size=self.hparams.batch_size, shuffle=False,
                          collate_fn=SFTCollator(self.tokenizer.pad_token_id), num_workers=self.hparams.num_workers)

    def fingerprint(self) -> str:
        """The token cache's key (the data, tokenizer and encoding settings) and what is trained on of it."""
        self.setup()
        hp = self.hparams
        extra = {"subset_fraction": hp.subset_fraction, "subset_seed": hp.subset_seed,
                 "selection": file_digest(hp.selection) if hp.selection is not None else None}
        return hashlib.sha256(json.dumps({"cache": self.cache.key, **extra}, sort_keys=True).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints so a resumed fit can check it trains on the same rows."""
        return {"fingerprint": self.fingerprint(), "subset_indices": self.subset_indices}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume on different data (checked now if set up, else in `setup`)."""
        self._restored_state = dict(state_dict)
        if self.train_dataset is not None:
            self._check_restored()

    def _check_restored(self) -> None:
        saved, self._restored_state = self._restored_state, None
        now = self.state_dict()
        if saved.get("fingerprint") != now["fingerprint"] or saved.get("subset_indices") != now["subset_indices"]:
            hint = ""
            if self.trainer is not None and getattr(self.trainer, "ckpt_path", None):
                hint = f": remove {Path(self.trainer.ckpt_path).parent} to train from scratch"
            raise ConfigError(
                f"the checkpoint was trained on other data than {dataset_spec(self.hparams.train_file).name} with "
                f"these settings (contents, tokenizer, max_seq_length or subset differ){hint}")


def _reference(folder: str, cache: TokenCache) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) reference log-probs of a cache's pairs, from a ReferenceWriter folder of the same data."""
    from rose_pl.layout import REFERENCE_ARRAYS, REFERENCE_META

    meta_file = Path(folder) / REFERENCE_META
    if not meta_file.is_file():
        raise DataFormatError(folder, None, "no reference log-probs here (reference.json missing: unfinished?)")
    meta = json.loads(meta_file.read_text())
    if meta.get("dataset_fingerprint") != cache.key:
        raise DataFormatError(meta_file, "dataset_fingerprint", f"reference log-probs of other data "
                                                                f"({meta.get('dataset_fingerprint')}, these pairs: "
                                                                f"{cache.key}): compute them again")
    with np.load(Path(folder) / REFERENCE_ARRAYS) as z:
        return z["chosen"], z["rejected"]


class _WithReference:
    """A collator that adds each pair's reference log-probs (by its index) to the batch."""

    def __init__(self, collate, chosen: np.ndarray, rejected: np.ndarray):
        self.collate, self.chosen, self.rejected = collate, torch.from_numpy(chosen), torch.from_numpy(rejected)

    def __call__(self, features):
        batch = self.collate(features)
        batch["reference_chosen_logps"] = self.chosen[batch["index"]].float()
        batch["reference_rejected_logps"] = self.rejected[batch["index"]].float()
        return batch


class FeatureDataModule(_TokenizerDataModule):
    """One dataset for predict-time featurization: the pool (sft), a preference set, or its SFT view."""

    def __init__(
        self,
        data_file: DataRef,
        tokenizer: str,
        kind: Literal["sft", "preference", "preference_sft"] = "sft",
        max_seq_length: int = 2048,
        batch_size: int = 8,
        shots_per_task: ShotsPerTask = None,
        all_pairs: bool = False,
        num_workers: int = 0,
        chat_template: str = "tulu",
        prompt_truncation: PromptTruncation = "keep_start",
        preference_format: PreferenceFormat = "rose",
        max_prompt_length: int = 256,
        on_empty: Literal["error", "drop"] = "drop",
        on_invalid_pair: Literal["error", "drop"] = "error",
        duplicate_ids: Literal["error", "rename"] = "error",
        cache: str | None = None,
        num_proc: int = 1,
        cache_root: str | None = None,
        reference: str | None = None,
        max_tokens_per_batch: int | None = None,
    ):
        """
        Args:
            data_file: Instruction pool (kind sft) or preference set (kinds preference, preference_sft): a .jsonl/.json
                file, a Parquet file or folder, a save_to_disk folder, a hub id, or {path, split, subset, revision,
                columns}.
            tokenizer: Model name or path whose tokenizer to use (hub id, local folder or embedded name).
            kind: sft: instruction rows; preference: chosen/rejected pairs; preference_sft: prompt + chosen as SFT.
            max_seq_length: Tokens kept per sequence (see prompt_truncation and preference_format).
            batch_size: Examples per batch on each device.
            shots_per_task: ROSE JSON preference files: consecutive rows per task (row i is task i // k), or
                'all' for one task; required for that form, which names no tasks.
            all_pairs: Preference JSON: one example per [winner, loser] pair instead of sft/rejected target.
            num_workers: DataLoader worker processes.
            chat_template: Chat format of instruction rows and of chat-formatted pairs: tulu, chatml, tokenizer
                (the tokenizer's own) or an import path.
            prompt_truncation: Which end of a too-long prompt to keep: keep_start (ROSE's default) or keep_end
                (what the ROSE authors chose for HH).
            preference_format: Pairs (kind preference) as the ROSE authors tokenize them for DPO (rose: raw
                prompt + EOS, raw response + EOS) or through the chat template (chat).
            max_prompt_length: rose format: the prompt is cut to this many tokens when the pair is too long.
            on_empty: A row with no loss token left after truncation: drop it (logged, counted; its features
                stay empty and it is never selected) or error.
            on_invalid_pair: Preference pairs with an empty side or chosen == rejected: error, or drop and report.
            duplicate_ids: Instruction rows that repeat an id: error, or rename them (id#2, ...) and report.
            cache: Token cache folder of data_file (a run's); None: one under cache_root named by its content key.
            num_proc: Processes that tokenize the data when its cache is built.
            cache_root: Folder of content-keyed token caches; None: $ROSE_PL_TOKEN_CACHE, else
                ~/.cache/rose_pl/tokenized.
            reference: Kind preference: a folder of the DPO reference's log-probs of these pairs
                (rose_pl.features.reference); each batch then carries them, and DPOObjective runs no reference pass.
            max_tokens_per_batch: Pack predict batches by tokens instead of rows: length-sorted rows go together
                while rows x the longest row (both sides of a pair) stays within it, and batch_size caps the rows.
                None: batch_size rows a batch. Either way batches are dealt to the ranks in turn.
        """
        super().__init__()
        problems = _common_problems(batch_size=batch_size, num_workers=num_workers, on_empty=on_empty,
                                    duplicate_ids=duplicate_ids, max_seq_length=max_seq_length,
                                    prompt_truncation=prompt_truncation, max_prompt_length=max_prompt_length,
                                    preference_format=preference_format if kind == "preference" else None)
        if kind not in ("sft", "preference", "preference_sft"):
            problems.append(f"kind: {kind!r} is not one of ['sft', 'preference', 'preference_sft']")
        problems += [p for p in [check_shots_per_task(shots_per_task)] if p]
        if kind == "sft" and (shots_per_task is not None or all_pairs):
            problems.append("shots_per_task and all_pairs apply to preference files, not kind='sft'")
        if max_tokens_per_batch is not None:
            problems += positive_int("max_tokens_per_batch", max_tokens_per_batch)
        if reference is not None and kind != "preference":
            problems.append(f"reference: reference log-probs belong to preference pairs, not kind={kind!r}")
        if on_invalid_pair not in ("error", "drop"):
            problems.append(f"on_invalid_pair: {on_invalid_pair!r} is not one of ['error', 'drop']")
        problems += positive_int("num_proc", num_proc)
        if problems:
            raise ConfigError(problems)
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self._tokenizer = None
        self.cache: TokenCache | None = None
        self.task_ids: list[str] | None = None
        """Task of each row (preference kinds), None for sft."""
        self.dropped: list[Dropped] = []
        self.skip_indices: set[int] | None = None
        """Row indices to leave out of `predict_dataloader` (set before calling it; a resumed run's finished rows)."""
        self.dataset: CachedRows | None = None
        self.reference_logps: tuple[np.ndarray, np.ndarray] | None = None

    def cache_settings(self) -> CacheSettings:
        hp = self.hparams
        pairs = hp.kind != "sft"
        return CacheSettings(hp.kind, hp.max_seq_length, hp.chat_template, hp.prompt_truncation, hp.on_empty,
                             hp.duplicate_ids, hp.shots_per_task if pairs else None, hp.all_pairs if pairs else False,
                             hp.on_invalid_pair if pairs else "error",
                             hp.preference_format if hp.kind == "preference" else None,
                             hp.max_prompt_length if hp.kind == "preference" else 256)

    def _caches(self):
        return [(self.hparams.data_file, self.cache_settings(), self.hparams.cache)]

    def encoder(self) -> Encoder:
        """The encoder of these settings (tokenizer loaded on first use)."""
        hp = self.hparams
        pairs = hp.kind == "preference"
        return Encoder(self.tokenizer, hp.max_seq_length, hp.chat_template, hp.prompt_truncation,
                       hp.preference_format if pairs else None, hp.max_prompt_length)

    @property
    def num_examples(self) -> int:
        """Rows in the data (the index space of the feature store), dropped rows included."""
        self.setup()
        return self.cache.num_rows

    @property
    def ids(self) -> list[str]:
        """Id of each row, in index order (O(N) strings: prefer `cache.id(i)` for a large pool)."""
        self.setup()
        return self.cache.ids()

    @property
    def predict_indices(self) -> np.ndarray:
        """Row indices `predict_dataloader` yields (all ranks together): all rows less dropped and skipped ones, in
        predict order."""
        self.setup()
        return self._sampler().order

    def drop_records(self) -> list[dict]:
        """The rows dropped when the data was tokenized: index, id, where and why."""
        self.setup()
        return self.cache.drops()

    def setup(self, stage: str | None = None) -> None:
        """Open (or build) the token cache (once; a second call is free)."""
        if self.dataset is not None:
            return
        hp = self.hparams
        self.cache = self._open(hp.data_file, self.cache_settings(), hp.cache)
        self.reference_logps = _reference(hp.reference, self.cache) if hp.reference is not None else None
        self.task_ids = self.cache.tasks()
        self.dropped = _drops(self.cache, dataset_spec(hp.data_file).name)
        self.dataset = CachedRows(self.cache, np.arange(self.cache.num_rows))

    def _sampler(self) -> LengthSortedSampler:
        skip = np.fromiter(self.skip_indices or (), dtype=np.int64)
        bad = skip[(skip < 0) | (skip >= self.cache.num_rows)]
        if bad.size:
            raise ConfigError(f"skip_indices outside [0, {self.cache.num_rows}): {bad[:10].tolist()}")
        keep = np.ones(self.cache.num_rows, dtype=bool)
        keep[np.asarray(self.cache.dropped, dtype=bool)] = False
        keep[skip] = False
        return LengthSortedSampler(self.cache.lengths, indices=np.flatnonzero(keep))

    def predict_dataloader(self) -> DataLoader:
        """Longest first, `skip_indices` left out; each batch's "index" holds the rows' indices in the dataset."""
        self.setup("predict")
        hp = self.hparams
        sampler = self._sampler()
        world = self.trainer.world_size if self.trainer is not None else 1
        if len(sampler) < world and self.skip_indices:
            # Lightning gives every rank at least one row: redo a few finished rows (their writes are idempotent).
            redo = sorted(self.skip_indices)[: world - len(sampler)]
            log.info("%s: %d rows left for %d ranks: computing %d finished rows again",
                     dataset_spec(hp.data_file).name, len(sampler), world, len(redo))
            self.skip_indices = set(self.skip_indices) - set(redo)
            sampler = self._sampler()
        if len(sampler) < world:
            raise ConfigError(f"{dataset_spec(hp.data_file).name}: {len(sampler)} rows to predict on {world} ranks; "
                              f"every rank needs one: run this stage on at most {len(sampler)} devices")
        if self.skip_indices:
            log.info("%s: skipping %d finished rows, %d left", dataset_spec(hp.data_file).name,
                     len(self.skip_indices), len(sampler))
        collate = (PreferenceCollator if hp.kind == "preference" else SFTCollator)(self.tokenizer.pad_token_id)
        if self.reference_logps is not None:
            collate = _WithReference(collate, *self.reference_logps)
        # Batches are made here and dealt to the ranks in turn (batch j to rank j % world): Lightning passes a
        # sampler of batches through unchanged, and no rank lists every row index as Python objects.
        rank = self.trainer.global_rank if self.trainer is not None else 0
        batches = TokenBudgetBatches(self.cache.lengths, sampler.order, hp.max_tokens_per_batch, hp.batch_size,
                                     world, rank, per_row=2 if hp.kind == "preference" else 1)
        return DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate, num_workers=hp.num_workers)

    def fingerprint(self) -> str:
        """The token cache's key: the data's content, the tokenizer and every setting that changes the tokens."""
        self.setup()
        return self.cache.key

    def settings(self) -> dict:
        """Everything besides the data's content that changes the rows or their tokens (stored with features)."""
        hp = self.hparams
        keys = ("kind", "max_seq_length", "chat_template", "prompt_truncation", "on_empty", "duplicate_ids")
        if hp.kind != "sft":
            keys += ("shots_per_task", "all_pairs", "on_invalid_pair")
        if hp.kind == "preference":
            keys += ("preference_format", "max_prompt_length")
        return {"file": dataset_spec(hp.data_file).name, "tokenizer": self.tokenizer_name, **{k: hp[k] for k in keys}}
