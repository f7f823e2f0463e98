"""Held-out evaluation: preference accuracy, DPO implicit reward, SFT loss, and an LLM judge's win rate.

Everything here is a plain function or class (no LightningModule), so the CLI `evaluate` subcommand and
notebooks call it directly. The preference metrics are `torchmetrics.Metric`s with summed states, so they
reduce correctly under DDP (and with `merge_state`).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torchmetrics import MeanMetric, Metric, SumMetric

from rose_pl.atomic import atomic_write_json
from rose_pl.errors import ConfigError, JudgeError

log = logging.getLogger(__name__)

LogprobsFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Verdict = Literal["win", "loss", "tie", "invalid"]


# --------------------------------------------------------------------------- preference metrics
def _check_pair(*tensors: torch.Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"expected 1-D tensors of one shape (one value per pair), got {sorted(shapes)}")


class PreferenceAccuracy(Metric):
    """Fraction of pairs with log pi(chosen|x) > log pi(rejected|x) (summed response log-probs).

    Ties count as not correct, so a model that scores both responses equally earns no credit.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, chosen_logp: torch.Tensor, rejected_logp: torch.Tensor) -> None:
        _check_pair(chosen_logp, rejected_logp)
        self.correct += (chosen_logp > rejected_logp).sum()
        self.total += chosen_logp.numel()

    def compute(self) -> torch.Tensor:
        return _ratio(self.correct, self.total)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num.double() / den if den > 0 else torch.tensor(math.nan)


class _RewardMetric(Metric):
    """DPO implicit reward r = beta * (log pi - log pi_ref) of both responses of each pair."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, beta: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        if not beta > 0:
            raise ConfigError(f"beta must be > 0, got {beta}")
        self.beta = float(beta)

    def _rewards(self, chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp):
        _check_pair(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
        reward_w = self.beta * (chosen_logp.double() - ref_chosen_logp.double())
        return reward_w, self.beta * (rejected_logp.double() - ref_rejected_logp.double())


class RewardAccuracy(_RewardMetric):
    """Fraction of pairs whose implicit reward of the chosen response beats the rejected one (ties: not correct)."""

    def __init__(self, beta: float = 0.1, **kwargs: Any):
        super().__init__(beta, **kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp) -> None:
        reward_w, reward_l = self._rewards(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
        self.correct += (reward_w > reward_l).sum()
        self.total += reward_w.numel()

    def compute(self) -> torch.Tensor:
        return _ratio(self.correct, self.total)


class RewardMargin(_RewardMetric):
    """Mean over pairs of reward(chosen) - reward(rejected)."""

    def __init__(self, beta: float = 0.1, **kwargs: Any):
        super().__init__(beta, **kwargs)
        self.add_state("margin_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp) -> None:
        reward_w, reward_l = self._rewards(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
        self.margin_sum += (reward_w - reward_l).sum()
        self.total += reward_w.numel()

    def compute(self) -> torch.Tensor:
        return _ratio(self.margin_sum, self.total)


# --------------------------------------------------------------------------- evaluation loops
def _default_logprobs() -> LogprobsFn:
    from rose_pl.objectives import sequence_logprobs  # lazy: objectives sits to the left, imported on use

    return sequence_logprobs


def adapter_reference(model: torch.nn.Module):
    """The peft model inside `model` whose adapters can be disabled to get the reference policy, or None."""
    from peft import PeftModel

    for module in model.modules():
        if isinstance(module, PeftModel):
            return module
    return None


def _model_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        model.to(device)
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_preferences(
    model: torch.nn.Module,
    dataloader: Iterable[dict],
    beta: float = 0.1,
    device: str | torch.device | None = None,
    logprobs_fn: LogprobsFn | None = None,
) -> dict[str, Any]:
    """Preference accuracy, DPO reward accuracy/margin and mean log-probs over preference batches.

    `device`: where to run (the model is moved there); default the model's own device. The reference
    policy is the same peft model with adapters disabled; for a model without peft adapters the reward
    metrics are NaN and `reference` is "none". `logprobs_fn` defaults to `objectives.sequence_logprobs`.
    Under an initialized process group every rank must call this: metric states are summed over ranks.
    """
    logprobs = logprobs_fn or _default_logprobs()
    device = _model_device(model, device)
    peft_model = adapter_reference(model)
    metrics = {
        "pref": PreferenceAccuracy(),
        "reward_acc": RewardAccuracy(beta),
        "margin": RewardMargin(beta),
        "chosen": MeanMetric().set_dtype(torch.float64),
        "rejected": MeanMetric().set_dtype(torch.float64),
        "count": SumMetric().set_dtype(torch.float64),  # a metric, so that compute() sums it over DDP ranks
    }
    for metric in metrics.values():
        metric.to(device)
    was_training = model.training
    model.eval()
    try:
        for batch in dataloader:
            batch = _to(batch, device)

            def score(side: str) -> torch.Tensor:
                keys = (f"{side}_input_ids", f"{side}_attention_mask", f"{side}_labels")
                return logprobs(model, *(batch[k] for k in keys)).double()

            chosen, rejected = score("chosen"), score("rejected")
            metrics["pref"].update(chosen, rejected)
            metrics["chosen"].update(chosen)
            metrics["rejected"].update(rejected)
            metrics["count"].update(float(chosen.numel()))
            if peft_model is not None:
                with peft_model.disable_adapter():
                    ref_chosen, ref_rejected = score("chosen"), score("rejected")
                metrics["reward_acc"].update(chosen, rejected, ref_chosen, ref_rejected)
                metrics["margin"].update(chosen, rejected, ref_chosen, ref_rejected)
    finally:
        model.train(was_training)

    def value(name: str) -> float:
        metric = metrics[name]
        return float(metric.compute()) if metric.update_count else math.nan

    return {
        "pref_accuracy": value("pref"),
        "reward_accuracy": value("reward_acc"),
        "reward_margin": value("margin"),
        "num_pairs": int(metrics["count"].compute()) if metrics["count"].update_count else 0,
        "chosen_logp_mean": value("chosen"),
        "rejected_logp_mean": value("rejected"),
        "beta": float(beta),
        "reference": "adapter_disabled" if peft_model is not None else "none",
    }


@torch.no_grad()
def evaluate_sft_loss(
    model: torch.nn.Module,
    dataloader: Iterable[dict],
    device: str | torch.device | None = None,
    logprobs_fn: LogprobsFn | None = None,
) -> dict[str, Any]:
    """Negative log-likelihood of held-out SFT answers (batches with `input_ids, attention_mask, labels`).

    `sft_loss` is the token mean over all answer tokens; `sft_loss_per_sample` the mean over samples of
    each sample's token mean. Samples with no answer token (e.g. truncated away) have no per-sample loss;
    they are counted in `num_empty_samples`.
    """
    logprobs = logprobs_fn or _default_logprobs()
    device = _model_device(model, device)
    sums = {k: SumMetric().set_dtype(torch.float64).to(device) for k in ("nll", "tokens", "sample_loss", "samples", "empty")}
    was_training = model.training
    model.eval()
    try:
        for batch in dataloader:
            batch = _to(batch, device)
            nll = -logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).double()
            counts = (batch["labels"][:, 1:] != -100).sum(dim=1).double()  # the one-token shift
            has_tokens = counts > 0
            sums["nll"].update(nll.sum())
            sums["tokens"].update(counts.sum())
            sums["sample_loss"].update((nll[has_tokens] / counts[has_tokens]).sum())
            sums["samples"].update(has_tokens.sum().double())
            sums["empty"].update((~has_tokens).sum().double())
    finally:
        model.train(was_training)
    total = {k: float(m.compute()) if m.update_count else 0.0 for k, m in sums.items()}
    return {
        "sft_loss": total["nll"] / total["tokens"] if total["tokens"] else math.nan,
        "sft_loss_per_sample": total["sample_loss"] / total["samples"] if total["samples"] else math.nan,
        "num_samples": int(total["samples"] + total["empty"]),
        "num_tokens": int(total["tokens"]),
        "num_empty_samples": int(total["empty"]),
    }


# --------------------------------------------------------------------------- generation
def tulu_prompt(prompt: str) -> str:
    """The Tulu chat prefix of a single-turn conversation, ending where the assistant starts."""
    return f"<|user|>\n{prompt}\n<|assistant|>\n"


@torch.no_grad()
def generate_responses(
    model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 256, batch_size: int = 8
) -> list[str]:
    """Greedy responses to `prompts` (Tulu format, left padding), only the new text.

    Generation stops at EOS or `max_new_tokens`; text from a following `<|user|>` turn on is cut off.
    Without a pad token the EOS token pads (masked out, so it does not change the result).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ConfigError("tokenizer has neither a pad nor an eos token; generation needs one to pad")
    device = _model_device(model, None)
    was_training, old_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # new tokens must directly follow each prompt
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [tulu_prompt(p) for p in prompts[start : start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True).to(device)
            generated = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id
            )
            new = generated[:, enc["input_ids"].shape[1] :]
            for text in tokenizer.batch_decode(new, skip_special_tokens=True):
                out.append(text.split("<|user|>")[0].strip())
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


# --------------------------------------------------------------------------- LLM judge
JUDGE_PROMPT = """You are an impartial judge. Compare two responses to the instruction below and decide which \
one follows the instruction better: more helpful, correct, relevant and complete. Ignore the order in which \
the responses appear and do not prefer a response for its length alone.

[Instruction]
{instruction}

[Response A]
{response_a}

[Response B]
{response_b}

Reply with a single line: "A" if Response A is better, "B" if Response B is better, or "tie" if they are \
equally good."""

_VERDICTS = {"a": "A", "response a": "A", "b": "B", "response b": "B", "tie": "tie", "draw": "tie", "equal": "tie"}
_PREFIXES = ("final verdict", "final answer", "verdict", "answer")
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def parse_verdict(answer: str | None) -> Literal["A", "B", "tie"] | None:
    """The judge's choice from the first non-empty line of its answer ("A", "**B**", "Verdict: tie"...), or None."""
    line = next((ln for ln in (answer or "").splitlines() if ln.strip()), "")
    norm = " ".join("".join(" " if c in "*`\"'[](){}.:!#" else c for c in line.lower()).split())
    for prefix in _PREFIXES:
        if norm.startswith(prefix + " "):
            norm = norm[len(prefix) + 1 :]
            break
    return _VERDICTS.get(norm)


class JudgeClient:
    """Pairwise LLM judge over any OpenAI-compatible `POST {base_url}/chat/completions` endpoint.

    The model's response is always Response A and the reference Response B, as in the ROSE evaluation.
    An answer that cannot be parsed is not an error: it becomes the verdict "invalid" (counted separately
    by `win_rate`), is logged with the raw answer and kept in `invalid_answers`. Network, timeout and HTTP
    failures raise `JudgeError` after `max_retries` retries (HTTP 4xx other than 408/409/425/429: at once).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60,
        max_retries: int = 2,
        retry_backoff: float = 1.0,
        max_tokens: int = 16,
    ):
        """`retry_backoff`: seconds before the first retry, doubling after; `max_tokens`: judge answer budget."""
        problems = []
        if not base_url.startswith(("http://", "https://")):
            problems.append(f"judge base_url must start with http:// or https://, got {base_url!r}")
        if max_retries < 0 or timeout <= 0 or retry_backoff < 0:
            problems.append(f"need max_retries >= 0, timeout > 0, retry_backoff >= 0; got {max_retries}, {timeout}, {retry_backoff}")
        if problems:
            raise ConfigError(problems)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.max_retries, self.retry_backoff, self.max_tokens = timeout, max_retries, retry_backoff, max_tokens
        self.invalid_answers: list[dict[str, str]] = []

    def _headers(self) -> tuple[dict[str, str], str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
            return headers, ""
        return headers, f" (no API key sent: ${self.api_key_env} is not set)" if self.api_key_env else ""

    def complete(self, prompt: str) -> str:
        """The judge's raw answer to one user message."""
        messages = [{"role": "user", "content": prompt}]  # no system turn: some chat templates reject one
        payload = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        body = json.dumps(payload).encode("utf-8")
        headers, key_note = self._headers()
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace")
                cause, last = f"answered HTTP {exc.code} {exc.reason}: {detail}{key_note}", exc
                if exc.code not in _RETRY_STATUS:
                    raise JudgeError(f"judge endpoint {self.url} {cause}") from exc
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                cause, last = f"unreachable: {type(reason).__name__}: {reason}", exc
            else:
                return self._content(raw)
            log.warning("judge endpoint %s %s (attempt %d of %d)", self.url, cause, attempt + 1, attempts)
        raise JudgeError(f"judge endpoint {self.url} {cause} (after {attempts} attempts)") from last

    def _content(self, raw: bytes) -> str:
        try:
            return json.loads(raw)["choices"][0]["message"]["content"] or ""  # None: e.g. a refusal
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise JudgeError(f"judge endpoint {self.url} returned no chat completion: {raw[:300]!r}") from exc

    def judge_pair(self, instruction: str, model_response: str, reference_response: str) -> Verdict:
        """"win" if the judge prefers the model's response (A), "loss" for the reference (B), "tie", or "invalid"."""
        prompt = JUDGE_PROMPT.format(instruction=instruction, response_a=model_response, response_b=reference_response)
        answer = self.complete(prompt)
        verdict = parse_verdict(answer)
        if verdict is None:
            log.warning("judge answer not understood, counted as invalid: %r", answer)
            self.invalid_answers.append({"instruction": instruction, "answer": answer})
            return "invalid"
        return {"A": "win", "B": "loss", "tie": "tie"}[verdict]

    def judge_all(self, instructions: Sequence[str], model_responses: Sequence[str], references: Sequence[str]) -> list[Verdict]:
        """`judge_pair` over aligned lists."""
        if not len(instructions) == len(model_responses) == len(references):
            sizes = f"{len(instructions)} instructions, {len(model_responses)} responses, {len(references)} references"
            raise ConfigError(f"lists differ in length: {sizes}")
        return [self.judge_pair(*row) for row in zip(instructions, model_responses, references)]


def win_rate(judgements: Iterable[str]) -> dict[str, float | int]:
    """Win rate with ties counting half, over valid verdicts only; `n` counts all, invalid included."""
    counts = {"win": 0, "loss": 0, "tie": 0, "invalid": 0}
    for j in judgements:
        if j not in counts:
            raise ValueError(f"unknown verdict {j!r}; expected one of {sorted(counts)}")
        counts[j] += 1
    valid = counts["win"] + counts["loss"] + counts["tie"]
    rate = (counts["win"] + 0.5 * counts["tie"]) / valid if valid else math.nan
    wins, losses, ties, invalid = counts.values()
    return {"win_rate": rate, "wins": wins, "losses": losses, "ties": ties, "invalid": invalid, "n": valid + invalid}


# --------------------------------------------------------------------------- results
def _jsonable(value: Any) -> Any:
    """NaN/inf become null so that the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


@dataclass
class EvaluationResult:
    """The metrics of one method (e.g. "rose", "less", "random", "base") and what produced them."""

    method: str
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    def write_json(self, path: str | Path) -> Path:
        """Write atomically (temporary file + os.replace); NaN is written as null."""
        return atomic_write_json(path, _jsonable(asdict(self)), sort_keys=False, allow_nan=False)

    @classmethod
    def read_json(cls, path: str | Path) -> EvaluationResult:
        """Read a file written by `write_json` (null metrics stay None)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(method=data["method"], metrics=data["metrics"], config=data.get("config", {}))

    def markdown_row(self, columns: Sequence[str]) -> str:
        """`| method | metric... |` with `columns` in order ("-" where a metric is missing)."""
        cells = [_cell(self.method)] + [_cell(self.metrics[c]) if c in self.metrics else "-" for c in columns]
        return "| " + " | ".join(cells) + " |"


def results_table(results: dict[str, dict], columns: Sequence[str] | None = None) -> str:
    """A Markdown table, one row per method, one column per metric (default: every numeric metric, first-seen order)."""
    if columns is None:
        numeric = lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))  # noqa: E731
        columns = list(dict.fromkeys(k for m in results.values() for k, v in m.items() if numeric(v)))
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [EvaluationResult(name, metrics).markdown_row(columns) for name, metrics in results.items()]
    return "\n".join(lines) + "\n"
