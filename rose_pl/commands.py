"""The commands next to LightningCLI's: run, score, select, evaluate, prepare-model.

Each is a typed function; jsonargparse builds its `--help`, `--config FILE.yaml` and flags from the signature
and docstring, so the YAML keys are the argument names. Each reads and checks its inputs before any work.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, Union

from rose_pl.config import DEFAULT_MODEL, Dataset, JudgeArgs, PreferenceArgs, dataset_spec
from rose_pl.errors import ConfigError

log = logging.getLogger(__name__)


def score(
    pool: Dataset,
    output: str,
    validation_data: Dataset | None = None,
    shots_per_task: Union[int, Literal["all"], None] = None,
    train: list[str] | None = None,
    val: list[str] | None = None,
    exact: list[str] | None = None,
    side: str = "val_dpo",
    weights: list[float] | None = None,
    block_size: int | None = None,
    device: str | None = None,
    duplicate_ids: Literal["error", "rename"] = "error",
    on_invalid_pair: Literal["error", "drop"] = "error",
    all_pairs: bool = False,
) -> None:
    """ROSE Eq. 7: checkpoint-weighted inner products of pool and validation gradients, max over tasks.

    Give either projected feature stores (`train` and `val`, one per checkpoint, with `validation_data` for
    the task ids) or exact score stores (`exact`, one per checkpoint, and the validation `side` to score).

    Args:
        pool: The pool the stores were computed from (a file, a Parquet or saved dataset folder, a hub id, or
            {path, split, subset, revision, columns}): the ids of the scored rows.
        output: Folder for the scores.
        validation_data: Projected: the validation file the val stores were computed from (its task ids).
        shots_per_task: ROSE JSON validation files: row i belongs to task i // shots_per_task ('all': one task).
        train: Projected: training feature stores, one per checkpoint (e.g. runs/x/features/train/epoch-{1..4}).
        val: Projected: validation feature stores, same checkpoints in the same order.
        exact: Exact: score stores of one target, one per checkpoint (runs/x/targets/T/exact/epoch-{1..4}).
        side: Exact: which validation side's columns to score (val_dpo for ROSE, val_sft for LESS).
        weights: Checkpoint weights; default: each checkpoint's mean learning rate from the store metadata.
        block_size: Training rows scored per block (memory vs speed); default influence.DEFAULT_BLOCK_SIZE.
        device: Projected: cpu or cuda; default: cuda when available (logged). Exact scores are read on the CPU.
        duplicate_ids: Pool rows that repeat an id: error, or rename them as the stores' run did.
        on_invalid_pair: Validation pairs with an empty side or chosen == rejected: error, or drop (as the run did).
        all_pairs: ROSE JSON validation files: one pair per [winner, loser] index pair (as the run did).
    """
    from rose_pl.data.formats import read_preferences
    from rose_pl.data.table import pool_identity
    from rose_pl.selection.influence import DEFAULT_BLOCK_SIZE, exact_scores, save_scores, score_stores

    projected = train is not None or val is not None
    if projected == (exact is not None):
        raise ConfigError("give either train + val (projected feature stores) or exact (exact score stores)")
    problems = [f"{name}: {p} does not exist" for name, paths in (("train", train), ("val", val), ("exact", exact))
                for p in paths or [] if not Path(p).exists()]
    if projected and (not train or not val or validation_data is None):
        problems.append("projected scoring needs train, val and validation_data")
    if problems:
        raise ConfigError(problems)
    table = pool_identity(pool, duplicate_ids)
    if projected:
        task_ids = [v.task for v in read_preferences(validation_data, shots_per_task, all_pairs,
                                                     on_invalid_pair=on_invalid_pair)]
        result = score_stores(train, val, task_ids, weights, block_size=block_size or DEFAULT_BLOCK_SIZE, device=device)
    else:
        result = exact_scores(exact, side, weights, block_size=block_size or DEFAULT_BLOCK_SIZE)
    if result.num_rows != table.num_rows:
        raise ConfigError(f"{table.name}: {table.num_rows} rows but the stores hold {result.num_rows}: another pool, "
                          "or another duplicate_ids setting than the stores were computed with?")
    save_scores(output, result, table.ids, (table.dataset_codes, table.dataset_names),
                meta={"pool": table.name, "validation": None if validation_data is None else dataset_spec(
                    validation_data).name, "train": train, "val": val, "exact": exact, "side": side if exact else None})
    log.info("scores written to %s", output)


def select(
    scores: str,
    pool: Dataset,
    output_dir: str,
    fraction: float | None = 0.05,
    k: int | None = None,
    seed: int = 0,
    report: bool = True,
    duplicate_ids: Literal["error", "rename"] = "error",
) -> None:
    """Keep the top of the pool by score and write it in the pool's own format (JSONL lines unchanged, Parquet, or a
    saved dataset), plus a report. Only the selected rows and the report's examples are read from the pool.

    Args:
        scores: Folder written by `score`.
        pool: The pool the scores belong to (any dataset source, as for `score`).
        output_dir: Folder for selected.jsonl, selection.json and the report.
        fraction: Fraction of the pool to keep (ignored when k is given).
        k: Keep exactly k examples.
        seed: Seed of the deterministic tie-breaking.
        report: Also write report.md and plots.
        duplicate_ids: Pool rows that repeat an id: error, or rename them as the scoring did.
    """
    from rose_pl.data.sources import open_source
    from rose_pl.data.table import PoolTable, pool_identity
    from rose_pl.selection.influence import load_scores
    from rose_pl.selection.select import select_and_write

    saved = load_scores(scores)
    source = open_source(pool)
    if len(source) != saved.result.num_rows:
        raise ConfigError(f"{scores}: {saved.result.num_rows} scored rows, but {source.name} has {len(source)}: "
                          "another pool than the one scored")
    table = PoolTable(saved.ids, saved.dataset_codes, saved.dataset_names, source)
    if pool_identity(pool, duplicate_ids).ids != saved.ids:
        raise ConfigError(f"{scores}: the scored ids are not the rows of {source.name} (different data or order)")
    select_and_write(Path(output_dir), saved.result, table, source=source.name, fraction=fraction, k=k, seed=seed,
                     title=f"Selection from {scores}", report=report)


def evaluate(
    data: Dataset,
    output: str,
    model: str = DEFAULT_MODEL,
    adapter: str | None = None,
    beta: float = 0.1,
    batch_size: int = 8,
    max_seq_length: int = 2048,
    chat_template: str = "tulu",
    preference: PreferenceArgs | None = None,
    shots_per_task: Union[int, Literal["all"], None] = None,
    prompt_format: Literal["chat", "raw"] = "chat",
    judge: JudgeArgs | None = None,
    judgements: str | None = None,
    dtype: str = "float32",
    label: str | None = None,
) -> None:
    """Evaluate a base model or a fine-tuned adapter on a test set: preference pairs (accuracy, implicit reward,
    SFT loss; with a judge, the win rate against the chosen answers) or prompts with golden answers (the
    judge's win rate against them, both orders by default, with a 95% bootstrap interval).

    Args:
        data: Test set: preference pairs (JSONL with task ids, or ROSE JSON) or {"prompt", "golden_answer"} rows.
        output: JSON file for the results.
        model: Base model: hub id, local folder or the embedded default.
        adapter: peft adapter folder (e.g. runs/x/targets/T/finetune/rose/checkpoints/epoch-4/adapter); None: base.
        beta: beta of the DPO implicit reward.
        batch_size: Pairs or prompts per batch.
        max_seq_length: Tokens per sequence after truncation.
        chat_template: Chat format the model was trained with (tulu, chatml, tokenizer or an import path).
        preference: How preference pairs are tokenized (format rose or chat, max_prompt_length, prompt_truncation...).
        shots_per_task: ROSE JSON test files: rows per task ('all' by default: tasks do not change the metrics).
        prompt_format: Golden-answer prompts: in the chat template (chat, as trained) or as raw text (raw).
        judge: OpenAI-compatible judge, e.g. {base_url: http://localhost:8000/v1, model: judge-model}.
        judgements: JSONL of every prompt, answer and verdict (default: next to output).
        dtype: Weights dtype of the model.
        label: Name of this result in tables (default: the adapter folder or 'base').
    """
    from rose_pl.data.formats import kind_of_test_set, read_golden_answers, read_preferences
    from rose_pl.evaluation.evaluate import check_evaluation, evaluate_model
    from rose_pl.hub import check_model_source
    from rose_pl.pipeline.inputs import check_writable, test_set_reading

    kind = kind_of_test_set(data)
    check_evaluation(kind, data, judge, prompt_format, batch_size, max_seq_length)
    shots, pref = test_set_reading(data, preference or PreferenceArgs())
    if shots_per_task is not None:
        shots = shots_per_task
    if kind == "golden":
        read_golden_answers(data)
    else:
        read_preferences(data, shots, pref.all_pairs, on_invalid_pair=pref.on_invalid_pair)
    check_model_source(model)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"adapter: {adapter} is not a peft adapter folder (no adapter_config.json)")
    check_writable(str(Path(output).parent))
    metrics = evaluate_model(model, adapter, data, output, label=label or (adapter or "base"), beta=beta,
                             batch_size=batch_size, max_seq_length=max_seq_length, chat_template=chat_template,
                             preference=pref, shots_per_task=shots, prompt_format=prompt_format, judge=judge,
                             judgements=judgements, dtype=dtype)
    print(json.dumps(metrics, indent=2, default=str))


def prepare_model(model: str = DEFAULT_MODEL) -> None:
    """Convert the embedded default model to its cached safetensors folder (once) and print where it is.

    Args:
        model: Model name, hub id or path.
    """
    from rose_pl.hub import resolve_model_path

    print(resolve_model_path(model))


RUN_USAGE = "rose-pl run --config FILE.yaml [--KEY VALUE ...] [--verify]"
RUN_DESCRIPTION = (
    "The whole pipeline in one output folder: warmup, gradients, scores, selections, fine-tunes and evaluations, "
    "per target. Finished stages are skipped, a killed stage resumes, damaged outputs are redone with what depends "
    "on them, and a changed configuration under finished stages is refused (or redone with --on_change redo). "
    "Options below are the YAML keys (nested keys with dots).")


def _config_files(argv: list[str]) -> list[str]:
    return [argv[i + 1] if a == "--config" else a.split("=", 1)[1]
            for i, a in enumerate(argv) if (a == "--config" and i + 1 < len(argv)) or a.startswith("--config=")]


def run_parser():
    """The `rose-pl run` parser: RunArgs' fields (their docstrings are the help), --config and --verify."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    from rose_pl.config import RunArgs

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="rose-pl run", usage=RUN_USAGE, description=RUN_DESCRIPTION, default_env=False,
                            exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with the run's options (repeatable; later wins)")
    parser.add_argument("--verify", action="store_true",
                        help="Check the output folder against the configuration and change nothing: list every stage "
                             "whose outputs are damaged, missing or stale, and what a rerun would redo")
    parser.add_class_arguments(RunArgs, nested_key=None, fail_untyped=True)
    return parser


def parse_run_args(argv: list[str]):
    """(RunArgs, verify) from `rose-pl run` arguments; every problem in one ConfigError, with the file and key."""
    from argparse import ArgumentError

    from rose_pl.config import RunArgs
    from rose_pl.configfile import check_argv

    check_argv(argv, RunArgs, flags=("verify",))
    parser = run_parser()
    try:
        cfg = parser.parse_args(argv)
    except ArgumentError as e:
        files = _config_files(argv)
        where = f"{', '.join(files)}: " if files else ""
        raise ConfigError(f"{where}{' '.join(str(e).split())}") from None
    verify = bool(cfg.pop("verify", False))
    cfg.pop("config", None)
    args = parser.instantiate(cfg)
    return RunArgs(**{k: getattr(args, k) for k in RunArgs.__dataclass_fields__}), verify


def run_argv(argv: list[str]) -> dict[str, str]:
    """`rose-pl run --config configs/rose.yaml [--key value ...]`; returns {stage: 'ran'|'skipped'}."""
    from rose_pl.pipeline.run import run, verify_run
    from rose_pl.pipeline.summary import print_summary

    if "-h" in argv or "--help" in argv:
        run_parser().print_help()
        raise SystemExit(0)
    run_args, verify = parse_run_args(argv)
    if verify:
        print(verify_run(run_args))
        return {}
    done = run(run_args)
    if done:
        print_summary(run_args, done, argv)
    else:  # a node other than node 0 of a multi-node run
        print(f"this node followed node 0's stages; the run's summary is printed by node 0 and saved in "
              f"{run_args.output_dir}/run.json")
    return done
