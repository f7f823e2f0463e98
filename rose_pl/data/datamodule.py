"""DataModules: `SFTDataModule` for warmup training, `FeatureDataModule` for predict-time featurization."""

from __future__ import annotations

import logging
from typing import Any, Literal, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from rose_pl.config import positive_int
from rose_pl.data.collate import PreferenceCollator, SFTCollator
from rose_pl.data.encoding import EmptyLossError, Encoder, PreferenceFormat, PromptTruncation, check_settings
from rose_pl.data.formats import (
    Dropped,
    InstructionExample,
    ShotsPerTask,
    check_shots_per_task,
    read_instructions,
    read_preferences,
)
from rose_pl.data.samplers import LengthGroupedSampler, LengthSortedSampler, padding_fraction
from rose_pl.errors import ConfigError, DataFormatError
from rose_pl.files import file_digest

log = logging.getLogger(__name__)

_LOGGED_IDS = 50  # a long drop list is logged in part; the full list is on `.dropped`


class TokenizedDataset(Dataset):
    """Tokenized rows; item `i` is a feature dict whose "index" is the row's index in the source file."""

    def __init__(self, features: list[dict[str, Any]], lengths: list[int]):
        self.features = features
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]


def _compact(encoded: dict[str, list[int]]) -> dict[str, np.ndarray]:
    # int32 arrays hold a large pool in a fraction of the memory of Python int lists.
    return {k: np.asarray(v, dtype=np.int32) for k, v in encoded.items()}


def _tokenize(path: str, rows: Sequence[tuple[int, Any]], encode, on_empty: str, dropped: list[Dropped]):
    """Encode (index, example) rows; an empty-loss row raises, or is dropped and recorded."""
    features, lengths, drops = [], [], []
    for index, example in rows:
        try:
            feature = _compact(encode(example))
        except EmptyLossError as e:
            if on_empty == "error":
                raise DataFormatError(path, example.where, f"id {example.id!r}: {e} (on_empty='drop' skips such rows)")
            drops.append(Dropped(path, example.where, example.id, str(e)))
            continue
        feature["index"] = index
        features.append(feature)
        lengths.append(max(len(v) for k, v in feature.items() if k.endswith("input_ids")))
    if drops:
        ids = ", ".join(d.id for d in drops[:_LOGGED_IDS]) + (" ..." if len(drops) > _LOGGED_IDS else "")
        log.warning("%s: dropped %d of %d rows with no loss token after truncation: %s",
                    path, len(drops), len(rows), ids)
        dropped.extend(drops)
    return TokenizedDataset(features, lengths)


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
    """Loads the tokenizer named by `self.tokenizer_name` on first use."""

    tokenizer_name: str
    _tokenizer = None

    @property
    def tokenizer(self):
        """The tokenizer, loaded on first use."""
        if self._tokenizer is None:
            from rose_pl.hub import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer


class SFTDataModule(_TokenizerDataModule):
    """Instruction data for (warmup) fine-tuning: chat template, assistant-only loss, length-grouped batches."""

    def __init__(
        self,
        train_file: str,
        tokenizer: str,
        val_file: str | None = None,
        max_seq_length: int = 2048,
        batch_size: int = 1,
        subset_fraction: float | None = None,
        subset_seed: int = 0,
        group_by_length: bool = True,
        shuffle_seed: int = 0,
        num_workers: int = 0,
        chat_template: str = "tulu",
        prompt_truncation: PromptTruncation = "keep_start",
        on_empty: Literal["error", "drop"] = "drop",
        duplicate_ids: Literal["error", "rename"] = "error",
    ):
        """
        Args:
            train_file: Instruction pool to train on (.jsonl or .json; messages or prompt/completion rows).
            tokenizer: Model name or path whose tokenizer to use (hub id, local folder or embedded name).
            val_file: Optional instruction file for validation loss.
            max_seq_length: Tokens kept per example; longer ones lose prompt tokens first, then their end.
            batch_size: Examples per batch on each device.
            subset_fraction: Train on a seeded random fraction of the pool (e.g. 0.05 for warmup); None uses all.
            subset_seed: Seed of the subset draw.
            group_by_length: Batch examples of similar length together (less padding).
            shuffle_seed: Seed of the training order (plus the epoch).
            num_workers: DataLoader worker processes.
            chat_template: Chat format: tulu (LESS/ROSE), chatml, tokenizer (the tokenizer's own) or an import path.
            prompt_truncation: Which end of a too-long prompt to keep: keep_start or keep_end.
            on_empty: A row with no loss token left after truncation: drop it (logged and counted) or error.
            duplicate_ids: Rows that repeat an id: error, or rename them (id#2, ...) and report.
        """
        super().__init__()
        problems = _common_problems(batch_size=batch_size, num_workers=num_workers, on_empty=on_empty,
                                    duplicate_ids=duplicate_ids, max_seq_length=max_seq_length,
                                    prompt_truncation=prompt_truncation)
        if subset_fraction is not None and not 0 < subset_fraction <= 1:
            problems.append(f"subset_fraction: {subset_fraction!r} is not in (0, 1]")
        if problems:
            raise ConfigError(problems)
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self._tokenizer = None
        self.train_examples: list[InstructionExample] | None = None
        self.subset_indices: list[int] | None = None
        """Pool rows trained on (ascending) when `subset_fraction` is set."""
        self.dropped: list[Dropped] = []
        self.padding_fraction: float | None = None
        """Padding share of this rank's batches in the first epoch, set by `train_dataloader`."""
        self.train_dataset: TokenizedDataset | None = None
        self.val_dataset: TokenizedDataset | None = None
        self._restored_state: dict | None = None
        self._fingerprint: str | None = None

    def encoder(self) -> Encoder:
        """The encoder of these settings (tokenizer loaded on first use)."""
        hp = self.hparams
        return Encoder(self.tokenizer, hp.max_seq_length, hp.chat_template, hp.prompt_truncation,
                       preference_format=None)

    def setup(self, stage: str | None = None) -> None:
        """Read, subset and tokenize (once; a second call is free)."""
        hp = self.hparams
        if self.train_dataset is None:
            self._fingerprint = self.fingerprint()  # of the bytes about to be read
            encoder = self.encoder()
            self.train_examples = read_instructions(hp.train_file, hp.duplicate_ids)
            rows = list(enumerate(self.train_examples))
            if hp.subset_fraction is not None:
                n = len(rows)
                k = max(1, int(hp.subset_fraction * n))
                generator = torch.Generator().manual_seed(hp.subset_seed)
                self.subset_indices = sorted(torch.randperm(n, generator=generator)[:k].tolist())
                rows = [rows[i] for i in self.subset_indices]
                log.info("%s: training on a subset of %d of %d rows (fraction %s, seed %d); first indices %s",
                         hp.train_file, k, n, hp.subset_fraction, hp.subset_seed, self.subset_indices[:20])
            self.train_dataset = _tokenize(
                hp.train_file, rows, lambda e: encoder.encode_messages(e.messages), hp.on_empty, self.dropped
            )
            if hp.val_file is not None:
                val = list(enumerate(read_instructions(hp.val_file, hp.duplicate_ids)))
                self.val_dataset = _tokenize(
                    hp.val_file, val, lambda e: encoder.encode_messages(e.messages), hp.on_empty, self.dropped
                )
            if not len(self.train_dataset):
                raise DataFormatError(hp.train_file, None, "every row was dropped: nothing to train on")
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
                     hp.train_file, 100 * self.padding_fraction, rank, hp.group_by_length)
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
        """sha256 of the training file and every setting that changes what is trained on (fixed at setup)."""
        if self._fingerprint is not None:
            return self._fingerprint
        hp = self.hparams
        return file_digest(hp.train_file, dict(
            tokenizer=self.tokenizer_name, max_seq_length=hp.max_seq_length, chat_template=hp.chat_template,
            prompt_truncation=hp.prompt_truncation, subset_fraction=hp.subset_fraction, subset_seed=hp.subset_seed,
            on_empty=hp.on_empty, duplicate_ids=hp.duplicate_ids))

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
            raise ConfigError(
                f"the checkpoint was trained on other data than {self.hparams.train_file} with these settings "
                "(file contents, tokenizer, max_seq_length or subset differ)"
            )


class FeatureDataModule(_TokenizerDataModule):
    """One dataset for predict-time featurization: the pool (sft), a preference set, or its SFT view."""

    def __init__(
        self,
        data_file: str,
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
    ):
        """
        Args:
            data_file: Instruction pool (kind sft) or preference set (kinds preference, preference_sft).
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
        if on_invalid_pair not in ("error", "drop"):
            problems.append(f"on_invalid_pair: {on_invalid_pair!r} is not one of ['error', 'drop']")
        if problems:
            raise ConfigError(problems)
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self._tokenizer = None
        self.examples: list | None = None
        """Rows in file order: InstructionExample (sft, preference_sft) or PreferenceExample (preference)."""
        self.task_ids: list[str] | None = None
        """Task of each row (preference kinds), None for sft."""
        self.dropped: list[Dropped] = []
        self.skip_indices: set[int] | None = None
        """Row indices to leave out of `predict_dataloader` (set before calling it; a resumed run's finished rows)."""
        self.dataset: TokenizedDataset | None = None
        self._fingerprint: str | None = None

    def encoder(self) -> Encoder:
        """The encoder of these settings (tokenizer loaded on first use)."""
        hp = self.hparams
        pairs = hp.kind == "preference"
        return Encoder(self.tokenizer, hp.max_seq_length, hp.chat_template, hp.prompt_truncation,
                       hp.preference_format if pairs else None, hp.max_prompt_length)

    def read(self) -> tuple[list, list[Dropped]]:
        """Read and validate the file, without the tokenizer: (rows in file order, pairs dropped as invalid).
        Sets `task_ids`."""
        hp = self.hparams
        if hp.kind == "sft":
            return read_instructions(hp.data_file, hp.duplicate_ids), []
        drops: list[Dropped] = []
        preferences = read_preferences(hp.data_file, hp.shots_per_task, hp.all_pairs,
                                       on_invalid_pair=hp.on_invalid_pair, dropped=drops)
        self.task_ids = [p.task for p in preferences]
        return (preferences if hp.kind == "preference" else [p.as_instruction() for p in preferences]), drops

    @property
    def num_examples(self) -> int:
        """Rows in the file (the index space of the feature store), dropped rows included."""
        self.setup()
        return len(self.examples)

    @property
    def ids(self) -> list[str]:
        """Id of each row, in index order."""
        self.setup()
        return [e.id for e in self.examples]

    @property
    def predict_indices(self) -> list[int]:
        """Row indices `predict_dataloader` yields: all rows less dropped and skipped ones, in predict order."""
        self.setup()
        return [self.dataset.features[i]["index"] for i in self._sampler().order]

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize (once; a second call is free)."""
        if self.dataset is not None:
            return
        hp = self.hparams
        self._fingerprint = self.fingerprint()  # of the bytes about to be read
        encoder = self.encoder()
        self.examples, invalid = self.read()
        self.dropped += invalid
        if hp.kind == "preference":
            encode = encoder.encode_preference
        else:
            encode = lambda e: encoder.encode_messages(e.messages)  # noqa: E731
        self.dataset = _tokenize(hp.data_file, list(enumerate(self.examples)), encode, hp.on_empty, self.dropped)

    def _sampler(self) -> LengthSortedSampler:
        skip = set(self.skip_indices or ())
        bad = sorted(i for i in skip if not 0 <= i < len(self.examples))
        if bad:
            raise ConfigError(f"skip_indices outside [0, {len(self.examples)}): {bad[:10]}")
        keep = [pos for pos, f in enumerate(self.dataset.features) if f["index"] not in skip]
        return LengthSortedSampler(self.dataset.lengths, indices=keep)

    def predict_dataloader(self) -> DataLoader:
        """Longest first, `skip_indices` left out; each batch's "index" holds the rows' indices in the file."""
        self.setup("predict")
        hp = self.hparams
        sampler = self._sampler()
        world = self.trainer.world_size if self.trainer is not None else 1
        if len(sampler) < world and self.skip_indices:
            # Lightning gives every rank at least one row: redo a few finished rows (their writes are idempotent).
            redo = sorted(self.skip_indices)[: world - len(sampler)]
            log.info("%s: %d rows left for %d ranks: computing %d finished rows again", hp.data_file, len(sampler),
                     world, len(redo))
            self.skip_indices = set(self.skip_indices) - set(redo)
            sampler = self._sampler()
        if len(sampler) < world:
            raise ConfigError(f"{hp.data_file}: {len(sampler)} rows to predict on {world} ranks; every rank needs one: "
                              f"run this stage on at most {len(sampler)} devices")
        if self.skip_indices:
            log.info("%s: skipping %d finished rows, %d left", hp.data_file, len(self.skip_indices), len(sampler))
        collate = PreferenceCollator if hp.kind == "preference" else SFTCollator
        return DataLoader(self.dataset, batch_size=hp.batch_size, sampler=sampler,
                          collate_fn=collate(self.tokenizer.pad_token_id), num_workers=hp.num_workers)

    def fingerprint(self) -> str:
        """sha256 over the file bytes and every setting that changes the rows or their tokens (fixed at setup)."""
        if self._fingerprint is not None:
            return self._fingerprint
        return file_digest(self.hparams.data_file, self.settings())

    def settings(self) -> dict:
        """Everything besides the file's bytes that changes the rows or their tokens (stored with features)."""
        hp = self.hparams
        keys = ("kind", "max_seq_length", "chat_template", "prompt_truncation", "on_empty", "duplicate_ids")
        if hp.kind != "sft":
            keys += ("shots_per_task", "all_pairs", "on_invalid_pair")
        if hp.kind == "preference":
            keys += ("preference_format", "max_prompt_length")
        return {"file": str(hp.data_file), "tokenizer": self.tokenizer_name, **{k: hp[k] for k in keys}}
