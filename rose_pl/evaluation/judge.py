"""Pairwise LLM judge over any OpenAI-compatible endpoint (vLLM, llama.cpp server, a hosted API).

The judge sees an instruction and two responses (A and B) and answers "A", "B" or "tie". Protocols:
- `both_orders` (default): each prompt is judged twice, the model's answer first (A) and the reference
  first. A pair is a win only when both orders prefer the model's answer, a loss only when both prefer the
  reference, invalid when either answer cannot be parsed, and a tie otherwise: a verdict that flips with
  the order is position bias, which cancels out.
- `single_order`: the model's answer is always A, as in the ROSE paper's evaluation.

The `openai` client handles timeouts, retries with backoff (timeouts, connection errors, HTTP
408/409/429/5xx) and the API key; a request that still fails raises `JudgeError` naming the endpoint. An
answer that cannot be parsed is no error: it is counted as "invalid" and logged with the raw answer.
`judge_rates` turns verdicts into rates with bootstrap intervals; `write_judgements` keeps every prompt,
answer and raw judge answer as JSONL.
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from rose_pl.errors import ConfigError, JudgeError
from rose_pl.files import atomic_write_text, jsonable

if TYPE_CHECKING:
    from rose_pl.config import JudgeArgs

log = logging.getLogger(__name__)

Verdict = Literal["win", "loss", "tie", "invalid"]
Protocol = Literal["both_orders", "single_order"]
PROTOCOLS = ("both_orders", "single_order")
ORDERS = ("answer_first", "reference_first")
"""answer_first: the model's answer is Response A; reference_first: the reference is Response A."""

JUDGE_MAX_TOKENS = 16
"""Answer budget of the judge: one short line ("A", "Verdict: [[B]]")."""
NO_KEY = "none"
"""Placeholder API key sent when none is configured (local servers ignore it; the client requires one)."""

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
_AS_MODEL = {  # the judge's choice, seen from the evaluated model
    "answer_first": {"A": "win", "B": "loss", "tie": "tie", None: "invalid"},
    "reference_first": {"A": "loss", "B": "win", "tie": "tie", None: "invalid"},
}
_KEY_LOGGED: set[tuple[str, str | None]] = set()  # (base_url, api_key_env) already logged as keyless


def parse_verdict(answer: str | None) -> Literal["A", "B", "tie"] | None:
    """The judge's choice from the first non-empty line of its answer ("A", "**B**", "Verdict: tie"...), or None.

    Markdown and punctuation around the choice and a leading "Verdict:"/"Answer:" are tolerated; anything
    else ("I prefer A", "A and B") is None, counted as invalid rather than guessed.
    """
    line = next((ln for ln in (answer or "").splitlines() if ln.strip()), "")
    norm = " ".join("".join(" " if c in "*`\"'[](){}.:!#" else c for c in line.lower()).split())
    for prefix in _PREFIXES:
        if norm.startswith(prefix + " "):
            norm = norm[len(prefix) + 1:]
            break
    return _VERDICTS.get(norm)


def combine_verdicts(verdicts: Sequence[Verdict]) -> Verdict:
    """One pair's verdict from its orders' verdicts (model's view): invalid if any is invalid, win or loss
    only when all agree, tie otherwise (a disagreement is position bias)."""
    if not verdicts or "invalid" in verdicts:
        return "invalid"
    first = verdicts[0]
    return first if all(v == first for v in verdicts) else "tie"


@dataclass(frozen=True)
class Judgement:
    """Everything about one judged prompt: the texts, the judge's raw answer per order and the verdicts."""

    id: str
    prompt: str
    reference: str
    answer: str
    protocol: str
    raw: dict[str, str]
    """Raw judge answer per order (answer_first, reference_first)."""
    order_verdicts: dict[str, str]
    """Verdict of each order from the model's view (win, loss, tie, invalid)."""
    verdict: str
    """The pair's verdict (`combine_verdicts` of the orders)."""


class Judge:
    """Pairwise judge of a model's answers against references at an OpenAI-compatible endpoint."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        protocol: Protocol = "both_orders",
        timeout: float = 60.0,
        max_retries: int = 2,
        concurrency: int = 4,
        max_tokens: int = JUDGE_MAX_TOKENS,
    ):
        """`base_url` e.g. http://localhost:8000/v1; `api_key_env` names the environment variable with the key
        (unset or None: the placeholder key "none" is sent, logged once); `timeout` is per request in seconds,
        `max_retries` the client's retries of a failed request, `concurrency` the requests in flight at once."""
        problems = []
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            problems.append(f"judge.base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            problems.append("judge.model must name the judge model at the endpoint")
        if protocol not in PROTOCOLS:
            problems.append(f"judge.protocol: {protocol!r} is not one of {list(PROTOCOLS)}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            problems.append(f"judge.timeout must be > 0 seconds, got {timeout!r}")
        for name, value, low in (("max_retries", max_retries, 0), ("concurrency", concurrency, 1),
                                 ("max_tokens", max_tokens, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"judge.{name} must be an integer >= {low}, got {value!r}")
        if problems:
            raise ConfigError(problems)
        import openai  # here, not at module level: importing it takes half a second

        self.base_url, self.model, self.protocol = base_url, model, protocol
        self.timeout, self.max_retries = float(timeout), max_retries
        self.concurrency, self.max_tokens = concurrency, max_tokens
        key = os.environ.get(api_key_env) if api_key_env else None
        self.key_note = ""
        if not key:
            self.key_note = f" (no API key sent: ${api_key_env} is not set)" if api_key_env else " (no API key sent)"
            if (base_url, api_key_env) not in _KEY_LOGGED:
                _KEY_LOGGED.add((base_url, api_key_env))
                log.info("judge %s: no API key%s; sending the placeholder key %r (enough for local servers)",
                         base_url, f" (${api_key_env} is not set)" if api_key_env else "", NO_KEY)
        self._client = openai.OpenAI(base_url=base_url, api_key=key or NO_KEY, timeout=self.timeout,
                                     max_retries=max_retries)

    @classmethod
    def from_args(cls, args: JudgeArgs) -> Judge:
        """A judge from `rose_pl.config.JudgeArgs`."""
        return cls(args.base_url, args.model, api_key_env=args.api_key_env, protocol=args.protocol,
                   timeout=args.timeout, max_retries=args.max_retries, concurrency=args.concurrency,
                   max_tokens=args.max_tokens)

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def complete(self, prompt: str) -> str:
        """The judge's raw answer to one user message (temperature 0); `JudgeError` once the retries are spent."""
        import openai

        try:
            response = self._client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],  # no system turn: some chat templates reject one
                temperature=0,
                max_tokens=self.max_tokens,
            )
        except openai.APITimeoutError as exc:
            raise JudgeError(f"judge endpoint {self.base_url}: no answer within {self.timeout:g} s "
                             f"(timed out after {self.max_retries} retries)") from exc
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise JudgeError(f"judge endpoint {self.base_url} unreachable after {self.max_retries} retries: "
                             f"{type(cause).__name__}: {cause}") from exc
        except openai.APIStatusError as exc:
            retried = exc.status_code in (408, 409, 429) or exc.status_code >= 500
            note = f"after {self.max_retries} retries" if retried else "not retried"
            key = self.key_note if exc.status_code in (401, 403) else ""
            raise JudgeError(f"judge endpoint {self.base_url} answered HTTP {exc.status_code} ({note}): "
                             f"{exc.message}{key}") from exc
        except openai.APIError as exc:
            raise JudgeError(f"judge endpoint {self.base_url} answered something unusable: {exc}") from exc
        if not getattr(response, "choices", None):
            raise JudgeError(f"judge endpoint {self.base_url} returned no choices: {str(response)[:300]}")
        return response.choices[0].message.content or ""  # None: e.g. a refusal, which parses as invalid

    def _prompt(self, instruction: str, answer: str, reference: str, order: str) -> str:
        a, b = (answer, reference) if order == "answer_first" else (reference, answer)
        return JUDGE_PROMPT.format(instruction=instruction, response_a=a, response_b=b)

    def judge_all(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        references: Sequence[str],
        ids: Sequence[str] | None = None,
        progress_desc: str = "judge",
    ) -> list[Judgement]:
        """Judge each model answer against its reference under this judge's protocol; results in input order.

        Requests (one or two per prompt) run `concurrency` at a time. The first request that fails for good
        raises `JudgeError`; the requests not yet started are cancelled.
        """
        from rose_pl.progress import Progress

        ids = list(ids) if ids is not None else [str(i) for i in range(len(prompts))]
        if not len(prompts) == len(answers) == len(references) == len(ids):
            raise ConfigError(f"lists differ in length: {len(prompts)} prompts, {len(answers)} answers, "
                              f"{len(references)} references, {len(ids)} ids")
        orders = ORDERS if self.protocol == "both_orders" else ORDERS[:1]
        jobs = [(i, order) for i in range(len(prompts)) for order in orders]
        progress = Progress(len(jobs), progress_desc, unit="requests")
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge")
        try:
            futures = [pool.submit(self.complete, self._prompt(prompts[i], answers[i], references[i], order))
                       for i, order in jobs]
            for future in as_completed(futures):
                future.result()  # the first failure raises here, before waiting for the rest
                progress.update(1)
            raw = {job: future.result() for job, future in zip(jobs, futures)}
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            progress.close()

        out = []
        for i in range(len(prompts)):
            answers_i = {order: raw[(i, order)] for order in orders}
            verdicts = {}
            for order, text in answers_i.items():
                verdicts[order] = _AS_MODEL[order][parse_verdict(text)]
                if verdicts[order] == "invalid":
                    log.warning("judge answer to %s (%s) not understood, counted as invalid: %r", ids[i], order, text)
            out.append(Judgement(ids[i], prompts[i], references[i], answers[i], self.protocol, answers_i, verdicts,
                                 combine_verdicts(list(verdicts.values()))))
        return out


def _percentile_ci(samples: np.ndarray, confidence: float) -> list[float]:
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return [float(low), float(high)]


def judge_rates(verdicts: Sequence[str], n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Win, tie and loss rates over the valid verdicts, each with a percentile bootstrap interval over prompts.

    Returns win_rate, tie_rate, loss_rate, win_rate_ties_half ((wins + ties/2) / valid), each with `<key>_ci`
    = [low, high] from `n_boot` resamples of the valid prompts (seeded, so reproducible), and the counts
    wins, ties, losses, invalid and n (all prompts, invalid included). Without a valid verdict the rates and
    intervals are NaN.
    """
    problems = []
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        problems.append(f"n_boot: {n_boot!r} is not a positive integer")
    if not 0 < confidence < 1:
        problems.append(f"confidence must be in (0, 1), got {confidence!r}")
    if problems:
        raise ConfigError(problems)
    counts = {"win": 0, "tie": 0, "loss": 0, "invalid": 0}
    for v in verdicts:
        if v not in counts:
            raise ValueError(f"unknown verdict {v!r}; expected one of {sorted(counts)}")
        counts[v] += 1
    valid = counts["win"] + counts["tie"] + counts["loss"]
    out: dict = {}
    if valid:
        # Resampling `valid` prompts with replacement draws category counts from a multinomial with the
        # observed frequencies: the same bootstrap distribution without materializing the resampled indices.
        p = np.array([counts["win"], counts["tie"], counts["loss"]], dtype=np.float64) / valid
        boot = np.random.default_rng(seed).multinomial(valid, p, size=n_boot) / valid
        series = {"win_rate": boot[:, 0], "tie_rate": boot[:, 1], "loss_rate": boot[:, 2],
                  "win_rate_ties_half": boot[:, 0] + boot[:, 1] / 2}
        point = {"win_rate": p[0], "tie_rate": p[1], "loss_rate": p[2], "win_rate_ties_half": p[0] + p[1] / 2}
        for key, samples in series.items():
            out[key] = float(point[key])
            out[f"{key}_ci"] = _percentile_ci(samples, confidence)
    else:
        for key in ("win_rate", "tie_rate", "loss_rate", "win_rate_ties_half"):
            out[key], out[f"{key}_ci"] = math.nan, [math.nan, math.nan]
    out.update(wins=counts["win"], ties=counts["tie"], losses=counts["loss"], invalid=counts["invalid"],
               n=valid + counts["invalid"])
    return out


def write_judgements(path: str | Path, judgements: Sequence[Judgement]) -> Path:
    """One JSON object per judged prompt (texts, raw judge answers per order, verdicts), written atomically."""
    lines = [json.dumps(jsonable(asdict(j)), ensure_ascii=False) + "\n" for j in judgements]
    return atomic_write_text(path, "".join(lines))
