"""Readers for the instruction pool and the preference validation sets, with validation.

Every problem raises `DataFormatError` naming the file and the line (JSONL, 1-based) or the entry (JSON);
nothing is skipped silently. Rows that are well formed but unusable (an identical chosen/rejected pair)
can be dropped on request; each drop is logged and recorded as a `Dropped`.

Instruction rows, one object per JSONL line or as a JSON list:
  {"dataset", "id", "messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}  (LESS/ROSE pool)
  {"prompt", "completion"} with optional "dataset" and "id"
Defaults: dataset = file stem, id = f"{dataset}_{row}" with row the 0-based row number in the file.

Preference sets:
  JSON object (ROSE): {prompt: {"responses", "pairs", "sft_target", "rejected_target"}}. Chosen/rejected are
    sft_target/rejected_target, or with `all_pairs` every [winner, loser] index pair. The file names no
    tasks, so `shots_per_task` is required: with k, row i (file order) belongs to task f"{stem}/{i // k}";
    with "all" the whole file is the one task `stem`. Left unset, the file is refused: a silent single task
    would turn Eq. 7's max over tasks into a plain mean. Ids are f"{stem}_{i}" (f"{stem}_{i}_{j}" for pair j
    with `all_pairs`).
  JSONL (or a JSON list) of {"prompt", "chosen", "rejected", "task"} (+ optional "id"): the task is explicit.

Golden-answer test sets (the ROSE paper's test files, e.g. se_academia.json):
  JSONL or a JSON list of {"prompt", "golden_answer"} (+ optional "id", "task"). Ids default to f"{stem}_{row}",
  tasks to the file stem.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Union

from rose_pl.config import Dataset, DatasetSpec, dataset_spec
from rose_pl.data.sources import load_json, open_source
from rose_pl.errors import ConfigError, DataFormatError

log = logging.getLogger(__name__)

ShotsPerTask = Union[int, Literal["all"], None]
"""Rows per task of a ROSE JSON preference file: k (row i is task i // k), "all" (one task), None (unset)."""

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class InstructionExample:
    """One instruction-tuning row; `raw` is the row as read, written back unchanged by selection."""

    dataset: str
    id: str
    messages: list[dict[str, str]]
    raw: dict
    where: int | str | None = field(default=None, compare=False)
    """Line (JSONL) or entry (JSON) of the row, for error messages."""

    @property
    def text(self) -> str:
        """Plain text of all turns, roles dropped (lexical matching, reports)."""
        return "\n".join(m["content"] for m in self.messages)


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair with the explicit task it belongs to."""

    id: str
    task: str
    prompt: str
    chosen: str
    rejected: str
    where: int | str | None = field(default=None, compare=False)
    """Line (JSONL) or entry (JSON) of the row, for error messages."""

    def as_instruction(self) -> InstructionExample:
        """The SFT view (user prompt, assistant chosen): the LESS baseline's validation side."""
        messages = [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.chosen}]
        raw = {"dataset": self.task, "id": self.id, "messages": messages}
        return InstructionExample(self.task, self.id, [dict(m) for m in messages], raw, self.where)


@dataclass(frozen=True)
class GoldenExample:
    """A test prompt with the reference answer a judge compares the model's answer with."""

    id: str
    task: str
    prompt: str
    golden_answer: str
    where: int | str | None = field(default=None, compare=False)
    """Line (JSONL) or entry (JSON) of the row, for error messages."""


@dataclass(frozen=True)
class Dropped:
    """A row left out on request (never silently): where it was and why."""

    path: str
    where: int | str | None
    id: str
    reason: str


# ---------------------------------------------------------------- low-level reading


def _rows(data: Dataset, size: int = 1024) -> Iterator[tuple[int, Any, Any, DatasetSpec]]:
    """(row number, where, row with rose_pl's column names) of every row of a dataset, in order."""
    source = open_source(data)
    for batch in source.batches(size=size):
        for index, where, row in batch:
            yield index, where, rename_columns(row, source.spec.columns), source.spec


def rename_columns(row: Any, columns: dict[str, str] | None) -> Any:
    """A row with the dataset's column names mapped to rose_pl's (`DatasetSpec.columns`: ours -> theirs); messages'
    role/content keys too. Columns not named are kept as they are."""
    if not columns or not isinstance(row, dict):
        return row
    theirs = {v: k for k, v in columns.items() if k not in ("role", "content")}
    out = {theirs.get(k, k): v for k, v in row.items()}
    inner = {v: k for k, v in columns.items() if k in ("role", "content")}
    if inner and isinstance(out.get("messages"), list):
        out["messages"] = [{inner.get(k, k): v for k, v in m.items()} if isinstance(m, dict) else m
                           for m in out["messages"]]
    return out


def _short(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def _field(path: Path, where, row: dict, key: str, kind: type, required: bool = True):
    # A null counts as absent: columnar sources (Parquet, Arrow) fill the columns a row does not have with nulls.
    if row.get(key) is None:
        if required:
            raise DataFormatError(path, where, f"missing field {key!r}")
        return None
    value = row[key]
    # bool is an int subclass; an index given as true/false is a mistake.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataFormatError(path, where, f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _nonblank(path: Path, where, value: str, what: str) -> str:
    if not value.strip():
        raise DataFormatError(path, where, f"{what} is empty")
    return value


def _check_unique(path: Path, ids: dict[str, int | str | None], id_: str, where) -> None:
    if id_ in ids:
        raise DataFormatError(path, where, f"duplicate id {id_!r} (first at {_loc(ids[id_])})")
    ids[id_] = where


def _loc(where) -> str:
    return f"line {where}" if isinstance(where, int) else str(where)


# ---------------------------------------------------------------- instructions


def _messages(path: Path, where, value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataFormatError(path, where, "field 'messages' must be a non-empty list")
    out = []
    for j, message in enumerate(value):
        at = f"{_loc(where)}, message {j}"
        if not isinstance(message, dict):
            raise DataFormatError(path, at, f"message must be an object, got {type(message).__name__}")
        role = _field(path, at, message, "role", str)
        content = _field(path, at, message, "content", str)
        if role not in ROLES:
            raise DataFormatError(path, at, f"unknown role {role!r}; expected one of {list(ROLES)}")
        if role == "assistant":
            _nonblank(path, at, content, "assistant content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataFormatError(path, where, "no assistant message: nothing to train on")
    return out


def stem_of(spec: DatasetSpec) -> str:
    """The default dataset name of a source's rows: the file's stem, or the hub dataset's name."""
    return Path(spec.path.rstrip("/")).stem or spec.path


def _id(path, where, row: dict) -> str | None:
    value = row.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFormatError(path, where, f"field 'id' must be str (or int), got {type(value).__name__}")
    return str(value)


def instruction_from_row(name: str, stem: str, where, row_number: int, row: Any) -> InstructionExample:
    """One pool row (rose_pl's column names) validated into an InstructionExample; a DataFormatError names the
    dataset and the line or row."""
    if not isinstance(row, dict):
        raise DataFormatError(name, where, f"row must be a JSON object, got {type(row).__name__}")
    dataset = _field(name, where, row, "dataset", str, required=False) or stem
    id_ = _id(name, where, row)
    id_ = id_ if id_ is not None else f"{dataset}_{row_number}"
    if row.get("messages") is not None:
        if row.get("prompt") is not None or row.get("completion") is not None:
            raise DataFormatError(name, where, "row has both 'messages' and 'prompt'/'completion'")
        messages = _messages(name, where, row["messages"])
    elif "prompt" in row or "completion" in row:
        prompt = _field(name, where, row, "prompt", str)
        completion = _nonblank(name, where, _field(name, where, row, "completion", str), "completion")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    else:
        raise DataFormatError(name, where, f"row has neither 'messages' nor 'prompt'/'completion' (its columns: "
                                           f"{sorted(row)[:10]}; map yours with columns: {{messages: ...}})")
    return InstructionExample(dataset, id_, messages, row, where)


def iter_instructions(data: Dataset, size: int = 1024) -> Iterator[list[tuple[int, InstructionExample]]]:
    """Batches of (row index, validated example) of an instruction dataset, streamed (ids not yet checked for
    repeats: `read_instructions` does that for a whole file, the token cache for a pool)."""
    source = open_source(data)
    stem = stem_of(source.spec)
    for batch in source.batches(size=size):
        yield [(i, instruction_from_row(source.name, stem, where, i, rename_columns(row, source.spec.columns)))
               for i, where, row in batch]


def unique_id(id_: str, seen, where, name: str, duplicate_ids: str, renamed: list[str]) -> str:
    """`id_`, or for a repeat its next free `id#k` (duplicate_ids rename, recorded in `renamed`) or an error."""
    if id_ in seen and duplicate_ids == "rename":
        k = 2
        while f"{id_}#{k}" in seen:
            k += 1
        renamed.append(f"{id_} at {_loc(where)} -> {id_}#{k}")
        id_ = f"{id_}#{k}"
    if id_ in seen:
        raise DataFormatError(name, where, f"duplicate id {id_!r} (first at {_loc(seen[id_])}); "
                                           "duplicate_ids: rename keeps both (the repeat becomes id#2)")
    return id_


def read_instructions(data: Dataset, duplicate_ids: Literal["error", "rename"] = "error") -> list[InstructionExample]:
    """Read a whole instruction dataset (any source: JSONL/JSON, Parquet, a saved or hub dataset), validating every
    row. For large pools use the token cache, which never holds them as Python objects.

    `duplicate_ids="rename"` keeps rows that repeat an id, renaming the 2nd, 3rd... to f"{id}#2", ... (logged;
    `raw` unchanged). Some published LESS/ROSE files reuse ids for different rows.
    """
    if duplicate_ids not in ("error", "rename"):
        raise ConfigError(f"duplicate_ids: {duplicate_ids!r} is not 'error' or 'rename'")
    spec = dataset_spec(data)
    examples: list[InstructionExample] = []
    seen: dict[str, int | str | None] = {}
    renamed: list[str] = []
    for batch in iter_instructions(spec):
        for _, example in batch:
            id_ = unique_id(example.id, seen, example.where, spec.name, duplicate_ids, renamed)
            seen[id_] = example.where
            examples.append(example if id_ == example.id else
                            InstructionExample(example.dataset, id_, example.messages, example.raw, example.where))
    if not examples:
        raise DataFormatError(spec.name, None, "no rows")
    if renamed:
        log.warning("%s: %d duplicate ids renamed: %s", spec.name, len(renamed), "; ".join(renamed))
    return examples


# ---------------------------------------------------------------- preferences


def _pair_problem(chosen: str, rejected: str) -> str | None:
    if not chosen.strip():
        return "chosen response is empty"
    if not rejected.strip():
        return "rejected response is empty"
    if chosen == rejected:
        return "chosen and rejected responses are identical"
    return None


def _rose_entries(path: Path, data: dict, shots_per_task: int | str, all_pairs: bool):
    """Yield (where, id, task, prompt, chosen, rejected) from the ROSE prompt -> entry object."""
    stem = path.stem
    if shots_per_task != "all" and len(data) % shots_per_task:
        raise DataFormatError(
            path, None, f"{len(data)} rows is not a multiple of shots_per_task={shots_per_task}: tasks would be ragged"
        )
    for i, (prompt, entry) in enumerate(data.items()):
        where = f"entry {i} (key {_short(prompt)})"
        _nonblank(path, where, prompt, "prompt")
        if not isinstance(entry, dict):
            raise DataFormatError(path, where, f"value must be an object, got {type(entry).__name__}")
        task = stem if shots_per_task == "all" else f"{stem}/{i // shots_per_task}"
        chosen = _field(path, where, entry, "sft_target", str)
        rejected = _field(path, where, entry, "rejected_target", str)
        responses = _field(path, where, entry, "responses", list, required=all_pairs)
        pairs = _field(path, where, entry, "pairs", list, required=all_pairs)
        if responses is not None:
            for j, r in enumerate(responses):
                if not isinstance(r, str):
                    raise DataFormatError(path, f"{where}, responses[{j}]", f"must be str, got {type(r).__name__}")
        if pairs is not None:
            if responses is None:
                raise DataFormatError(path, where, "'pairs' given without 'responses'")
            for j, pair in enumerate(pairs):
                ok = isinstance(pair, list) and len(pair) == 2
                ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
                if not ok or not all(0 <= x < len(responses) for x in pair) or pair[0] == pair[1]:
                    raise DataFormatError(
                        path, f"{where}, pairs[{j}]",
                        f"{pair!r} is not a [winner, loser] pair of distinct indices into {len(responses)} responses",
                    )
        if all_pairs:
            if not pairs:
                raise DataFormatError(path, where, "'pairs' is empty")
            for j, (w, l) in enumerate(pairs):
                yield f"{where}, pairs[{j}]", f"{stem}_{i}_{j}", task, prompt, responses[w], responses[l]
        else:
            yield where, f"{stem}_{i}", task, prompt, chosen, rejected


def _row_entries(data: Dataset, default_task: str | None):
    """Yield (where, id, task, prompt, chosen, rejected) from {"prompt","chosen","rejected","task"} rows."""
    for row_number, where, row, spec in _rows(data):
        name = spec.name
        if not isinstance(row, dict):
            raise DataFormatError(name, where, f"row must be a JSON object, got {type(row).__name__}")
        prompt = _nonblank(name, where, _field(name, where, row, "prompt", str), "prompt")
        chosen = _field(name, where, row, "chosen", str)
        rejected = _field(name, where, row, "rejected", str)
        task = _field(name, where, row, "task", str, required=default_task is None) or default_task
        _nonblank(name, where, task, "task")
        id_ = _id(name, where, row)
        yield where, id_ if id_ is not None else f"{stem_of(spec)}_{row_number}", task, prompt, chosen, rejected


def check_shots_per_task(value: Any) -> str | None:
    """The problem with a `shots_per_task` value, or None (a positive integer, "all" or None)."""
    if value is None or value == "all":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"shots_per_task: {value!r} is not a positive integer or 'all'"
    return None


def _shots_hint(path: Path) -> str:
    match = re.search(r"_(\d+)_shot", path.name)
    return f" (the file name suggests shots_per_task: {match.group(1)})" if match else ""


def read_preferences(
    data: Dataset,
    shots_per_task: ShotsPerTask = None,
    all_pairs: bool = False,
    default_task: str | None = None,
    on_invalid_pair: Literal["error", "drop"] = "error",
    dropped: list[Dropped] | None = None,
) -> list[PreferenceExample]:
    """Read a preference set: the ROSE JSON object or JSONL rows with an explicit task (see module docstring).

    `shots_per_task` (required) and `all_pairs` apply to the ROSE JSON form, `default_task` to rows without
    "task". A pair with an empty side or chosen == rejected is an error, or with `on_invalid_pair="drop"` left
    out, logged and appended to `dropped` (if given). Task membership is assigned before any drop.
    """
    spec = dataset_spec(data)
    path = Path(spec.path)
    problems = [p for p in [check_shots_per_task(shots_per_task)] if p]
    if on_invalid_pair not in ("error", "drop"):
        problems.append(f"on_invalid_pair: {on_invalid_pair!r} is not 'error' or 'drop'")
    obj = load_json(path) if path.is_file() and path.suffix.lower() == ".json" else None
    if isinstance(obj, dict):
        if default_task is not None:
            problems.append("default_task: the ROSE JSON form names tasks by shots_per_task, not default_task")
        if shots_per_task is None:
            problems.append(
                f"shots_per_task: {path} is a ROSE JSON preference file, which names no tasks; set shots_per_task "
                f"to the number of consecutive pairs per task (row i belongs to task i // k; the paper's files are "
                f"se 2, shp 5, hh 1){_shots_hint(path)}, or to 'all' to make the whole file one task")
        entries = None if problems else _rose_entries(path, obj, shots_per_task, all_pairs)
    else:
        for name, value in (("shots_per_task", shots_per_task), ("all_pairs", all_pairs or None)):
            if value is not None:
                problems.append(f"{name}: applies to the ROSE JSON object form only; {spec.name} holds rows")
        entries = None if problems else _row_entries(spec, default_task)
    if problems:
        raise ConfigError(problems)

    examples: list[PreferenceExample] = []
    ids: dict[str, int | str | None] = {}
    drops: list[Dropped] = []
    for where, id_, task, prompt, chosen, rejected in entries:
        _check_unique(spec.name, ids, id_, where)
        problem = _pair_problem(chosen, rejected)
        if problem is not None:
            if on_invalid_pair == "error":
                raise DataFormatError(spec.name, where, problem + " (on_invalid_pair='drop' leaves such pairs out)")
            drops.append(Dropped(spec.name, where, id_, problem))
            continue
        examples.append(PreferenceExample(id_, task, prompt, chosen, rejected, where))
    if drops:
        log.warning(
            "%s: dropped %d invalid preference pairs: %s",
            spec.name, len(drops), "; ".join(f"{d.id} ({_loc(d.where)}): {d.reason}" for d in drops),
        )
        if dropped is not None:
            dropped.extend(drops)
    if not examples:
        raise DataFormatError(spec.name, None, "no usable preference pairs")
    return examples


# ---------------------------------------------------------------- test sets


def is_rose_object(data: Dataset) -> bool:
    """Whether a preference file is the ROSE JSON object form ({prompt: entry}), which names no tasks."""
    path = Path(dataset_spec(data).path)
    return path.suffix.lower() == ".json" and path.is_file() and isinstance(load_json(path), dict)


def kind_of_test_set(data: Dataset) -> Literal["preference", "golden"]:
    """Whether a test set holds preference pairs or prompt + golden answer rows (from its first row)."""
    spec = dataset_spec(data)
    if is_rose_object(spec):
        return "preference"  # the ROSE JSON object form
    first = next(((where, row) for _, where, row, _ in _rows(spec, size=1)), (None, None))
    if not isinstance(first[1], dict):
        raise DataFormatError(spec.name, None, "no rows, or the first row is not a JSON object")
    if "golden_answer" in first[1]:
        return "golden"
    if "chosen" in first[1]:
        return "preference"
    raise DataFormatError(spec.name, first[0], "neither a preference pair (prompt, chosen, rejected) nor a golden answer "
                                               "(prompt, golden_answer); name its columns with columns: {...}")


def read_golden_answers(data: Dataset) -> list[GoldenExample]:
    """Read a prompt + golden-answer test set (any source), validating every row."""
    spec = dataset_spec(data)
    examples: list[GoldenExample] = []
    ids: dict[str, int | str | None] = {}
    for row_number, where, row, _ in _rows(spec):
        name = spec.name
        if not isinstance(row, dict):
            raise DataFormatError(name, where, f"row must be a JSON object, got {type(row).__name__}")
        prompt = _nonblank(name, where, _field(name, where, row, "prompt", str), "prompt")
        golden = _nonblank(name, where, _field(name, where, row, "golden_answer", str), "golden_answer")
        id_ = _id(name, where, row) or f"{stem_of(spec)}_{row_number}"
        task = _field(name, where, row, "task", str, required=False) or stem_of(spec)
        _check_unique(name, ids, id_, where)
        examples.append(GoldenExample(id_, task, prompt, golden, where))
    if not examples:
        raise DataFormatError(spec.name, None, "no rows")
    return examples


# ---------------------------------------------------------------- row indices


def row_indices(path: str | Path, num_rows: int) -> "np.ndarray":
    """Row indices listed in a file: a selection sidecar (selection.json: {"selected": [{"index": i, ...}, ...]},
    in rank order), a JSON list of integers, or a .npy array; each checked against `num_rows`."""
    import numpy as np

    path = Path(path)
    if path.suffix == ".npy":
        rows = np.load(path)
    else:
        data = load_json(path)
        if isinstance(data, dict) and isinstance(data.get("selected"), list):
            data = [entry.get("index") if isinstance(entry, dict) else entry for entry in data["selected"]]
        if not isinstance(data, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in data):
            raise DataFormatError(path, None, "expected a selection sidecar (selected: [{index}]) or a list of "
                                              "row indices")
        rows = np.asarray(data, dtype=np.int64)
    bad = rows[(rows < 0) | (rows >= num_rows)]
    if bad.size:
        raise DataFormatError(path, None, f"row indices {bad[:10].tolist()} are outside the data's {num_rows} rows "
                                          "(a selection of another pool?)")
    return rows.astype(np.int64)
