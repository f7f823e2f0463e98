"""Evaluate a base model, or a base model plus a fine-tuned adapter, on one test set; write the result file.

Test sets (`rose_pl.data.formats.kind_of_test_set`):
- preference pairs: preference accuracy and DPO implicit-reward metrics on the pairs, the SFT loss of the
  chosen answers and, with a judge, the win rate of generated answers against the chosen answers;
- prompt + golden answer rows (the ROSE paper's test files): the win rate against the golden answers, so a
  judge is required.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from rose_pl.config import JudgeArgs, PreferenceArgs, dataset_spec, positive_int
from rose_pl.errors import ConfigError
from rose_pl.evaluation.generation import PROMPT_FORMATS

log = logging.getLogger(__name__)

BOOTSTRAP_SAMPLES = 1000
"""Bootstrap resamples of the win-rate intervals (seed 0: the same interval for the same verdicts)."""


def default_judgements_path(output: str | Path) -> Path:
    """Where the judge's JSONL goes beside `output`: x.json -> x.judgements.jsonl (other names get the suffix added)."""
    output = Path(output)
    stem = output.name[: -len(".json")] if output.name.endswith(".json") else output.name
    return output.with_name(stem + ".judgements.jsonl")


def check_evaluation(kind: str, data: str, judge: JudgeArgs | None, prompt_format: str, batch_size,
                     max_seq_length) -> None:
    """Raise ConfigError listing what keeps this test set from being evaluated with these settings (a golden-answer
    set needs a judge...), before any model is loaded."""
    problems = []
    if kind == "golden" and judge is None:
        problems.append(f"{data} holds prompts with golden answers, which only a judge can score: set a judge "
                        "(evaluation.judge: base_url, model)")
    if prompt_format not in PROMPT_FORMATS:
        problems.append(f"prompt_format: {prompt_format!r} is not one of {list(PROMPT_FORMATS)}")
    problems += positive_int("batch_size", batch_size) + positive_int("max_seq_length", max_seq_length)
    if judge is not None:
        problems += [f"judge.{p}" for p in judge.validate(max_seq_length)]
    if problems:
        raise ConfigError(problems)


def _load(model: str, adapter: str | None, dtype: str):
    from rose_pl.hub import load_causal_lm, load_tokenizer

    net = load_causal_lm(model, dtype)
    if adapter:
        from peft import PeftModel

        from rose_pl.training.sources import check_adapter_fits

        check_adapter_fits(net, adapter, model)
        net = PeftModel.from_pretrained(net, adapter)
    net.eval()
    return net, load_tokenizer(model)


def _preference_metrics(net, device, data, model: str, *, beta, batch_size, max_seq_length, chat_template,
                        preference: PreferenceArgs, shots_per_task, cache_root: str | None) -> tuple[dict, list]:
    """Pair metrics and SFT loss; returns them and the pairs in file order (for the judge)."""
    from rose_pl.data.datamodule import FeatureDataModule
    from rose_pl.evaluation.metrics import evaluate_preferences, evaluate_sft_loss

    def module(kind: str) -> FeatureDataModule:
        dm = FeatureDataModule(
            data, model, kind=kind, max_seq_length=max_seq_length, batch_size=batch_size, shots_per_task=shots_per_task,
            all_pairs=preference.all_pairs, chat_template=chat_template, prompt_truncation=preference.prompt_truncation,
            preference_format=preference.format, max_prompt_length=preference.max_prompt_length,
            on_invalid_pair=preference.on_invalid_pair, cache_root=cache_root)
        dm.setup("predict")
        return dm

    from rose_pl.data.formats import read_preferences

    metrics = evaluate_preferences(net, module("preference").predict_dataloader(), beta=beta, device=device)
    metrics.update(evaluate_sft_loss(net, module("preference_sft").predict_dataloader(), device=device))
    return metrics, read_preferences(data, shots_per_task, preference.all_pairs,
                                     on_invalid_pair=preference.on_invalid_pair)


def _judge_answers(net, tokenizer, judge, max_new_tokens: int, ids, prompts, references, *, label, batch_size,
                   max_seq_length, chat_template, prompt_format, judgements_path: Path) -> dict:
    """Generate an answer per prompt, judge it against its reference, write the JSONL; the judge's metrics."""
    from rose_pl.evaluation.generation import encode_prompts, generate
    from rose_pl.evaluation.judge import judge_rates, write_judgements

    # A prompt repeated in the file (ROSE JSON with all_pairs) is answered once: greedy decoding would give
    # the same answer again.
    unique = list(dict.fromkeys(prompts))
    encoded = encode_prompts(tokenizer, unique, prompt_format=prompt_format, chat_template=chat_template,
                             max_seq_length=max_seq_length, max_new_tokens=max_new_tokens)
    generated = generate(net, tokenizer, encoded.ids, max_new_tokens, batch_size, encoded.stop_texts,
                         progress_desc=f"generate answers ({label})")
    answer_of = dict(zip(unique, generated))
    answers = [answer_of[p] for p in prompts]
    judgements = judge.judge_all(prompts, answers, references, ids, progress_desc=f"judge ({label})")
    write_judgements(judgements_path, judgements)
    metrics = judge_rates([j.verdict for j in judgements], n_boot=BOOTSTRAP_SAMPLES, seed=0)
    metrics.update(protocol=judge.protocol, prompts_truncated=encoded.num_truncated)
    log.info("%s: win rate %.3f (CI %s), ties %d, losses %d, invalid %d of %d; judgements in %s", label,
             metrics["win_rate"], metrics["win_rate_ci"], metrics["ties"], metrics["losses"], metrics["invalid"],
             metrics["n"], judgements_path)
    return metrics


def evaluate_model(
    model: str,
    adapter: str | None,
    data: str,
    output: str,
    *,
    label: str = "model",
    beta: float = 0.1,
    batch_size: int = 8,
    max_seq_length: int = 2048,
    chat_template: str = "tulu",
    preference: PreferenceArgs | None = None,
    shots_per_task: int | str | None = None,
    prompt_format: str = "chat",
    judge: JudgeArgs | None = None,
    judgements: str | None = None,
    dtype: str = "float32",
    cache_root: str | None = None,
) -> dict[str, Any]:
    """Evaluate `model` (+ the peft `adapter`) on the test set `data`; write `EvaluationResult` to `output`.
    `cache_root`: where the test pairs' token caches go (named by content; default: rose_pl's user cache).

    Preference pairs (read and tokenized with `preference`, default `PreferenceArgs()`, and `shots_per_task`
    for ROSE JSON files): pref_accuracy, reward_accuracy, reward_margin, chosen/rejected log-prob means,
    sft_loss of the chosen answers; with a `judge`, answers are generated (greedy, `prompt_format`) and
    judged against the chosen answers. Golden-answer rows: answers judged against the golden answers (a judge
    is required: `ConfigError` otherwise). The judge's metrics (`judge.judge_rates`: win_rate, win_rate_ci,
    tie_rate, ..., n, plus protocol) join the same dict; every judgement goes to `judgements` (default:
    `output` with `.judgements.jsonl` for `.json`). `judge.max_prompts` limits the judged prompts. The
    result is written atomically and the metrics are returned. Runs on CUDA when available, else the CPU.
    """
    from rose_pl.data.formats import kind_of_test_set, read_golden_answers
    from rose_pl.evaluation.judge import Judge
    from rose_pl.evaluation.metrics import EvaluationResult

    kind = kind_of_test_set(data)
    check_evaluation(kind, data, judge, prompt_format, batch_size, max_seq_length)
    preference = preference or PreferenceArgs()
    judgements_path = Path(judgements) if judgements else default_judgements_path(output)
    # Built before the model loads, so that bad judge settings fail at once; it sends nothing yet.
    client = Judge.from_args(judge) if judge is not None else None
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("evaluating %s (%s%s) on %s (%s test set) on %s", label, model, f" + {adapter}" if adapter else "",
                 data, kind, device)
        net, tokenizer = _load(model, adapter, dtype)
        net.to(device)
        config: dict[str, Any] = {"model": model, "adapter": adapter, "data": dataset_spec(data).name, "test_set": kind,
                                  "dtype": dtype, "device": str(device), "max_seq_length": max_seq_length,
                                  "chat_template": chat_template, "prompt_format": prompt_format}
        if kind == "preference":
            metrics, pairs = _preference_metrics(net, device, data, model, beta=beta, batch_size=batch_size,
                                                 max_seq_length=max_seq_length, chat_template=chat_template,
                                                 preference=preference, shots_per_task=shots_per_task,
                                                 cache_root=cache_root)
            config.update(beta=beta, preference=asdict(preference), shots_per_task=shots_per_task)
            rows = [(p.id, p.prompt, p.chosen) for p in pairs]
        else:
            metrics = {}
            rows = [(g.id, g.prompt, g.golden_answer) for g in read_golden_answers(data)]

        if client is not None:
            rows = rows[: judge.max_prompts] if judge.max_prompts else rows
            ids, prompts, references = (list(column) for column in zip(*rows))
            metrics.update(_judge_answers(
                net, tokenizer, client, judge.max_new_tokens, ids, prompts, references, label=label,
                batch_size=batch_size, max_seq_length=max_seq_length, chat_template=chat_template,
                prompt_format=prompt_format, judgements_path=judgements_path))
            # JudgeArgs holds the name of the key's environment variable, never the key itself.
            config.update(judge=asdict(judge), judgements=str(judgements_path),
                          bootstrap={"samples": BOOTSTRAP_SAMPLES, "seed": 0, "confidence": 0.95})
    finally:
        if client is not None:
            client.close()
    EvaluationResult(label, metrics, config).write_json(output)
    return metrics
