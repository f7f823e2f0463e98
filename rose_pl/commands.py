"""The subcommands next to LightningCLI's: score, select, evaluate, run, prepare-model.

Each is a typed function; jsonargparse builds its `--help`, `--config FILE.yaml` and flags from the
signature and docstring, so the YAML keys are the argument names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rose_pl.errors import ConfigError
from rose_pl.hub import DEFAULT_MODEL

log = logging.getLogger(__name__)


def score(
    train: list[str],
    val: list[str],
    validation_data: str,
    pool: str,
    output: str,
    shots_per_task: int | None = None,
    weights: list[float] | None = None,
    block_size: int | None = None,
    device: str | None = None,
) -> None:
    """ROSE Eq. 7: checkpoint-weighted inner products of train and validation features, max over tasks.

    Args:
        train: Training feature stores, one per checkpoint (e.g. runs/x/features/train/epoch-{1..4}).
        val: Validation feature stores, same checkpoints in the same order.
        validation_data: The validation file the val stores were computed from (for its task ids).
        pool: The pool file the train stores were computed from (for the ids of the scored rows).
        output: Folder for the scores.
        shots_per_task: ROSE JSON only: row i of validation_data belongs to task i // shots_per_task.
        weights: Checkpoint weights; default: each checkpoint's mean learning rate from the store metadata.
        block_size: Training rows scored per block (memory vs speed); default influence.DEFAULT_BLOCK_SIZE.
        device: cpu or cuda; default: cuda when available (logged).
    """
    from rose_pl.data.formats import read_instructions, read_preferences
    from rose_pl.influence import DEFAULT_BLOCK_SIZE, save_scores, score_stores
    from rose_pl.scoring import checkpoint_weights

    examples = read_instructions(pool)
    task_ids = [v.task for v in read_preferences(validation_data, shots_per_task=shots_per_task)]
    w = weights if weights is not None else checkpoint_weights([Path(t) for t in train])
    result = score_stores(train, val, task_ids, w, block_size=block_size or DEFAULT_BLOCK_SIZE, device=device)
    if result.num_rows != len(examples):
        raise ConfigError(f"{pool}: {len(examples)} rows but the train stores hold {result.num_rows}")
    save_scores(output, result, [e.id for e in examples], [e.dataset for e in examples],
                meta={"pool": pool, "validation": validation_data, "train": train, "val": val})
    log.info("scores written to %s", output)


def select(
    scores: str,
    pool: str,
    output_dir: str,
    fraction: float | None = 0.05,
    k: int | None = None,
    seed: int = 0,
    report: bool = True,
) -> None:
    """Keep the top of the pool by score and write it as JSONL in the pool's own format, plus a report.

    Args:
        scores: Folder written by `score`.
        pool: The pool file the scores belong to.
        output_dir: Folder for selected.jsonl, selection.json and the report.
        fraction: Fraction of the pool to keep (ignored when k is given).
        k: Keep exactly k examples.
        seed: Seed of the deterministic tie-breaking.
        report: Also write report.md and plots.
    """
    from rose_pl.data.formats import read_instructions
    from rose_pl.influence import load_scores
    from rose_pl.scoring import write_selection_and_report

    saved = load_scores(scores)
    examples = read_instructions(pool)
    if [e.id for e in examples] != list(saved.ids):
        raise ConfigError(f"{scores}: the scored ids are not the rows of {pool} (different file or order)")
    write_selection_and_report(Path(output_dir), saved.result, examples, source=pool, fraction=fraction, k=k,
                               seed=seed, title=f"Selection from {scores}", report=report)


def evaluate(
    data: str,
    output: str,
    model: str = DEFAULT_MODEL,
    adapter: str | None = None,
    beta: float = 0.1,
    batch_size: int = 8,
    max_seq_length: int = 2048,
    judge_url: str | None = None,
    judge_model: str | None = None,
    judge_api_key_env: str | None = "OPENAI_API_KEY",
    max_new_tokens: int = 256,
    label: str | None = None,
) -> None:
    """Evaluate a base model or a fine-tuned adapter on held-out preference pairs (and optionally a judge).

    Args:
        data: Held-out preference pairs (JSONL with task ids, or ROSE JSON).
        output: JSON file for the results.
        model: Base model: hub id, local folder or the embedded default.
        adapter: peft adapter folder (e.g. runs/x/finetune/rose/checkpoints/epoch-4/adapter); None: base model.
        beta: beta of the DPO implicit reward.
        batch_size: Pairs per batch.
        max_seq_length: Tokens per sequence after truncation.
        judge_url: OpenAI-compatible endpoint of an LLM judge (e.g. http://localhost:8000/v1); None: no win rate.
        judge_model: Judge model name at that endpoint.
        judge_api_key_env: Environment variable with the judge's API key.
        max_new_tokens: Length of generated responses for the judge.
        label: Name of this result in tables (default: the adapter folder or 'base').
    """
    from rose_pl.pipeline import JudgeArgs

    judge = None
    if judge_url:
        if not judge_model:
            raise ConfigError("judge_model is required with judge_url")
        judge = JudgeArgs(base_url=judge_url, model=judge_model, api_key_env=judge_api_key_env, max_new_tokens=max_new_tokens)
    metrics = evaluate_adapter(model=model, adapter=adapter, data=data, output=output, beta=beta, batch_size=batch_size,
                               max_seq_length=max_seq_length, judge=judge, label=label or (adapter or "base"))
    print(json.dumps(metrics, indent=2))


def evaluate_adapter(
    model: str,
    adapter: str | None,
    data: str,
    output: str,
    beta: float = 0.1,
    batch_size: int = 8,
    max_seq_length: int = 2048,
    judge=None,
    label: str = "model",
    shots_per_task: int | None = None,
) -> dict:
    """Held-out preference metrics, SFT loss on the chosen answers and (with a judge) the win rate
    against the chosen answers, for `model` + `adapter`; written atomically to `output` and returned."""
    import torch

    from rose_pl.data.datamodule import FeatureDataModule
    from rose_pl.evaluation import EvaluationResult, JudgeClient, evaluate_preferences, evaluate_sft_loss, generate_responses, win_rate
    from rose_pl.hub import load_causal_lm

    net = load_causal_lm(model)
    if adapter:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter)
    net.eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log.info("evaluating %s on %s (%s)", label, data, device)

    def loader(kind: str):
        dm = FeatureDataModule(data, model, kind=kind, max_seq_length=max_seq_length, batch_size=batch_size,
                               shots_per_task=shots_per_task)
        dm.setup("predict")
        return dm, dm.predict_dataloader()

    dm, pairs = loader("preference")
    metrics = evaluate_preferences(net, pairs, beta=beta, device=device)
    metrics.update(evaluate_sft_loss(net, loader("preference_sft")[1], device=device))
    config = {"model": model, "adapter": adapter, "data": data, "beta": beta, "max_seq_length": max_seq_length}
    if judge is not None:
        examples = dm.examples[: judge.max_prompts] if judge.max_prompts else dm.examples
        prompts = [e.prompt for e in examples]
        responses = generate_responses(net, dm.tokenizer, prompts, max_new_tokens=judge.max_new_tokens, batch_size=batch_size)
        client = JudgeClient(judge.base_url, judge.model, api_key_env=judge.api_key_env)
        metrics.update(win_rate(client.judge_all(prompts, responses, [e.chosen for e in examples])))
        config["judge"] = {"base_url": judge.base_url, "model": judge.model, "max_new_tokens": judge.max_new_tokens}
    EvaluationResult(label, metrics, config).write_json(output)
    return metrics


def prepare_model(model: str = DEFAULT_MODEL) -> None:
    """Convert the embedded default model to its cached safetensors folder (once) and print where it is.

    Args:
        model: Model name, hub id or path.
    """
    from rose_pl.hub import resolve_model_path

    print(resolve_model_path(model))


def run_argv(argv: list[str]) -> dict[str, str]:
    """`python -m rose_pl run --config configs/rose.yaml [--key value ...]`; returns {stage: 'ran'|'skipped'}."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from rose_pl.pipeline import RunArgs, run

    parser = ArgumentParser(prog="rose_pl run", description=run.__doc__ or "Run the whole ROSE pipeline.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with the run's arguments")
    parser.add_class_arguments(RunArgs, nested_key=None, fail_untyped=True)
    cfg = parser.parse_args(argv)
    cfg.pop("config", None)
    args = parser.instantiate_classes(cfg)
    run_args = RunArgs(**{k: getattr(args, k) for k in RunArgs.__dataclass_fields__})
    return run(run_args)
