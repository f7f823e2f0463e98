"""The LLM judge through the real `openai` client against a scripted OpenAI-compatible server on 127.0.0.1,
its rates and bootstrap intervals, and `evaluate_model` end to end with a tiny model."""

import json
import logging
import math
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from rose_pl.config import JudgeArgs, PreferenceArgs
from rose_pl.errors import ConfigError, JudgeError
from rose_pl.evaluation.evaluate import default_judgements_path, evaluate_model
from rose_pl.evaluation.judge import (
    Judge,
    Judgement,
    combine_verdicts,
    judge_rates,
    parse_verdict,
    write_judgements,
)

JUDGE_MODEL = "judge-model"
SECTIONS = re.compile(r"\[Response A\]\n(.*)\n\n\[Response B\]\n(.*)\n\nReply with", re.DOTALL)


# ----------------------------------------------------------------------------- the scripted server
def _marker_verdict(a: str, b: str) -> str:
    """Prefers the response holding GOOD; answers nonsense when Response A holds GARBLE (formats vary on purpose)."""
    if "GARBLE" in a:
        return "Both responses have merit."
    if ("GOOD" in a) != ("GOOD" in b):
        return "Verdict: [[A]]" if "GOOD" in a else "**B**"
    return "Tie."


def _longer_verdict(a: str, b: str) -> str:
    return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"


class _Handler(BaseHTTPRequestHandler):
    """POST /<mode>/v1/chat/completions; the mode scripts the answer (see `do_POST`)."""

    def log_message(self, *args):
        pass

    def _send(self, code, payload, headers=()):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode, _, route = self.path.strip("/").partition("/")
        with server.lock:  # in flight per mode: a slow request of an earlier test may still be sleeping
            server.requests.append({"mode": mode, "body": body, "auth": self.headers.get("Authorization")})
            server.in_flight[mode] = server.in_flight.get(mode, 0) + 1
            server.max_in_flight[mode] = max(server.max_in_flight.get(mode, 0), server.in_flight[mode])
        try:
            self._answer(server, mode, route, body)
        finally:
            with server.lock:
                server.in_flight[mode] -= 1

    def _answer(self, server, mode, route, body):
        if route != "v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if body.get("model") != JUDGE_MODEL:
            return self._send(400, {"error": {"message": f"unknown model {body.get('model')}"}})
        messages = body["messages"]
        prompt = messages[0]["content"]
        if [m["role"] for m in messages] != ["user"] or body.get("temperature") != 0 or not body.get("max_tokens"):
            return self._send(400, {"error": {"message": "expected one user message, temperature 0, max_tokens"}})
        a, b = SECTIONS.search(prompt).groups()
        if mode == "flaky":  # every prompt fails once with 500, then is answered
            with server.lock:
                first = prompt not in server.seen
                server.seen.add(prompt)
            if first:  # retry-after-ms: the client waits 5 ms instead of its ~0.5 s backoff
                return self._send(500, {"error": {"message": "overloaded"}}, [("retry-after-ms", "5")])
        if mode == "slow":
            time.sleep(1.0)
        if mode == "wait":
            time.sleep(0.03)
        content = {"always-a": lambda: "A", "gibberish": lambda: "Let me think about it.",
                   "longer": lambda: _longer_verdict(a, b)}.get(mode, lambda: _marker_verdict(a, b))()
        self._send(200, {
            "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": 0, "model": JUDGE_MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": 1, "total_tokens": len(prompt) + 1},
        })


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.lock, srv.requests, srv.seen, srv.in_flight, srv.max_in_flight = threading.Lock(), [], set(), {}, {}
    srv.handle_error = lambda *args: None  # the slow mode writes to a socket the client already closed
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = lambda mode: f"http://127.0.0.1:{srv.server_address[1]}/{mode}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _judge(server, mode, **kwargs):
    kwargs = {"timeout": 5.0, "max_retries": 0, "concurrency": 4, **kwargs}
    return Judge(server.url(mode), JUDGE_MODEL, **kwargs)


# (answer, reference) and the verdict the marker judge must reach from the model's view
CASES = [
    ("A GOOD answer", "a plain reference", "win"),
    ("a plain answer", "a GOOD reference", "loss"),
    ("GOOD answer", "GOOD reference", "tie"),
    ("plain answer", "plain reference", "tie"),
    ("GARBLE GOOD answer", "plain reference", "invalid"),  # nonsense when the answer is first: invalid pair
]


def _judge_cases(judge, cases=CASES, tag=""):
    prompts = [f"question {i}{tag}" for i in range(len(cases))]
    ids = [f"id{i}" for i in range(len(cases))]
    return judge.judge_all(prompts, [c[0] for c in cases], [c[1] for c in cases], ids=ids)


# ----------------------------------------------------------------------------- parsing and the agreement rule
def test_parse_verdict_is_tolerant_but_never_guesses():
    answers = ["A", " b. ", "Response A", "**tie**", "Final verdict: B", "`A`\nmore", "Verdict: [[A]]", "\n\nDraw"]
    assert [parse_verdict(a) for a in answers] == ["A", "B", "A", "tie", "B", "A", "A", "tie"]
    unclear = ["", None, "A and B", "I prefer A", "AB", "Both responses have merit."]
    assert [parse_verdict(a) for a in unclear] == [None] * len(unclear)


def test_combine_verdicts_needs_agreement():
    table = {("win", "win"): "win", ("loss", "loss"): "loss", ("tie", "tie"): "tie", ("win", "loss"): "tie",
             ("loss", "win"): "tie", ("win", "tie"): "tie", ("win", "invalid"): "invalid",
             ("invalid", "tie"): "invalid", ("win",): "win", ("invalid",): "invalid"}
    for verdicts, want in table.items():
        assert combine_verdicts(list(verdicts)) == want, verdicts


# ----------------------------------------------------------------------------- protocols through the client
def test_both_orders_judges_each_order_and_needs_agreement(server):
    start = len(server.requests)
    with _judge(server, "marker") as judge:
        got = _judge_cases(judge, tag=" (marker)")
    assert [j.verdict for j in got] == [c[2] for c in CASES]
    assert [j.id for j in got] == [f"id{i}" for i in range(len(CASES))], "results in input order"
    garbled = got[-1]
    assert garbled.raw == {"answer_first": "Both responses have merit.", "reference_first": "**B**"}
    assert garbled.order_verdicts == {"answer_first": "invalid", "reference_first": "win"}
    assert got[0].raw == {"answer_first": "Verdict: [[A]]", "reference_first": "**B**"}

    requests = server.requests[start:]
    assert len(requests) == 2 * len(CASES)
    for answer, reference, _ in CASES:  # each pair was shown once in each order
        shown = [SECTIONS.search(r["body"]["messages"][0]["content"]).groups() for r in requests]
        assert shown.count((answer, reference)) == 1 and shown.count((reference, answer)) == 1


def test_position_biased_judge_gives_ties_under_both_orders_and_wins_under_single_order(server):
    with _judge(server, "always-a") as judge:
        both = _judge_cases(judge, tag=" (bias)")
    assert [j.verdict for j in both] == ["tie"] * len(CASES)
    assert all(j.order_verdicts == {"answer_first": "win", "reference_first": "loss"} for j in both)

    start = len(server.requests)
    with _judge(server, "always-a", protocol="single_order") as judge:
        single = _judge_cases(judge, tag=" (bias)")
    assert [j.verdict for j in single] == ["win"] * len(CASES)
    assert all(j.raw == {"answer_first": "A"} and j.protocol == "single_order" for j in single)
    assert len(server.requests) - start == len(CASES), "single_order sends one request per prompt"


def test_invalid_answers_are_counted_and_logged_not_raised(server, caplog):
    with caplog.at_level(logging.WARNING, logger="rose_pl.evaluation.judge"), _judge(server, "gibberish") as judge:
        got = _judge_cases(judge, tag=" (gibberish)")
    assert [j.verdict for j in got] == ["invalid"] * len(CASES)
    assert "Let me think about it." in caplog.text and "id0" in caplog.text
    rates = judge_rates([j.verdict for j in got])
    assert rates["invalid"] == rates["n"] == len(CASES) and rates["wins"] == rates["ties"] == rates["losses"] == 0
    assert all(math.isnan(rates[k]) for k in ("win_rate", "tie_rate", "loss_rate", "win_rate_ties_half"))
    assert all(math.isnan(x) for x in rates["win_rate_ci"])


# ----------------------------------------------------------------------------- failures
def test_server_error_is_retried_then_succeeds(server):
    start = len(server.requests)
    with _judge(server, "flaky", max_retries=1) as judge:
        got = _judge_cases(judge, tag=" (flaky)")
    assert [j.verdict for j in got] == [c[2] for c in CASES]
    assert len(server.requests) - start == 2 * 2 * len(CASES), "each request (2 orders x 5) failed once, then passed"

    start = len(server.requests)
    with pytest.raises(JudgeError, match=re.escape(server.url("flaky")) + r" answered HTTP 500 \(after 0 retries\)"):
        with _judge(server, "flaky", max_retries=0, protocol="single_order") as judge:
            _judge_cases(judge, CASES[:1], tag=" (flaky, no retry)")
    assert len(server.requests) - start == 1


def test_timeout_raises_judge_error_after_the_retries(server):
    start = len(server.requests)
    began = time.perf_counter()
    with pytest.raises(JudgeError, match=re.escape(server.url("slow")) + r": no answer within 0.3 s .*after 1 retries"):
        with _judge(server, "slow", timeout=0.3, max_retries=1, protocol="single_order") as judge:
            _judge_cases(judge, CASES[:1], tag=" (slow)")
    assert len(server.requests) - start == 2, "the timed-out request was retried once"
    assert time.perf_counter() - began < 3.0


def test_client_error_is_not_retried_and_unreachable_endpoint_is_named(server):
    start = len(server.requests)
    judge = Judge(server.url("marker"), "wrong-model", max_retries=2, timeout=5.0, protocol="single_order")
    with pytest.raises(JudgeError, match=r"answered HTTP 400 \(not retried\).*unknown model wrong-model"):
        _judge_cases(judge, CASES[:1])
    assert len(server.requests) - start == 1

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: connections are refused
    with pytest.raises(JudgeError, match=rf"judge endpoint http://127\.0\.0\.1:{port}/v1 unreachable after 0 retries"):
        _judge_cases(Judge(f"http://127.0.0.1:{port}/v1", JUDGE_MODEL, max_retries=0), CASES[:1])


def test_bad_settings_are_reported_together():
    with pytest.raises(ConfigError) as err:
        Judge("localhost:8000", "", protocol="best_of_3", timeout=0, max_retries=-1, concurrency=0)
    text = str(err.value)
    for key in ("base_url", "judge.model", "protocol", "timeout", "max_retries", "concurrency"):
        assert key in text


def test_api_key_from_the_named_variable_or_a_placeholder_logged_once(server, monkeypatch, caplog):
    monkeypatch.setenv("ROSE_TEST_JUDGE_KEY", "sekrit")
    start = len(server.requests)
    keyed = _judge(server, "marker", api_key_env="ROSE_TEST_JUDGE_KEY", protocol="single_order")
    _judge_cases(keyed, CASES[:1], " (key)")
    assert server.requests[start]["auth"] == "Bearer sekrit"

    monkeypatch.delenv("ROSE_TEST_JUDGE_KEY_UNSET", raising=False)
    with caplog.at_level(logging.INFO, logger="rose_pl.evaluation.judge"):
        judges = [_judge(server, "marker", api_key_env="ROSE_TEST_JUDGE_KEY_UNSET", protocol="single_order")
                  for _ in range(2)]
    assert caplog.text.count("ROSE_TEST_JUDGE_KEY_UNSET is not set") == 1, "logged once, not per judge"
    start = len(server.requests)
    _judge_cases(judges[0], CASES[:1], " (no key)")
    assert server.requests[start]["auth"] == "Bearer none"


def test_requests_run_concurrently_and_results_keep_input_order(server):
    cases = CASES[:4] * 2
    for concurrency, allowed in ((4, range(2, 5)), (1, range(1, 2))):
        server.max_in_flight["wait"] = 0
        with _judge(server, "wait", concurrency=concurrency) as judge:
            got = _judge_cases(judge, cases, tag=f" (wait {concurrency})")
        assert [j.verdict for j in got] == [c[2] for c in cases]
        assert [j.answer for j in got] == [c[0] for c in cases]
        assert server.max_in_flight["wait"] in allowed, (concurrency, server.max_in_flight["wait"])


# ----------------------------------------------------------------------------- rates and the JSONL
def _index_bootstrap(verdicts, key, n_boot, seed):
    """Independent reference: resample prompt indices with replacement, recompute the rate each time."""
    valid = np.array([v for v in verdicts if v != "invalid"])
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        draw = valid[rng.integers(0, len(valid), len(valid))]
        wins, ties = (draw == "win").mean(), (draw == "tie").mean()
        samples.append({"win_rate": wins, "tie_rate": ties, "loss_rate": (draw == "loss").mean(),
                        "win_rate_ties_half": wins + ties / 2}[key])
    return np.percentile(samples, [2.5, 97.5])


def test_judge_rates_counts_and_bootstrap_intervals():
    verdicts = ["win"] * 30 + ["tie"] * 10 + ["loss"] * 20 + ["invalid"] * 5
    verdicts = [verdicts[(7 * i) % len(verdicts)] for i in range(len(verdicts))]  # a shuffled order
    rates = judge_rates(verdicts, n_boot=1000, seed=0)
    assert (rates["wins"], rates["ties"], rates["losses"], rates["invalid"], rates["n"]) == (30, 10, 20, 5, 65)
    assert rates["win_rate"] == pytest.approx(30 / 60) and rates["tie_rate"] == pytest.approx(10 / 60)
    assert rates["loss_rate"] == pytest.approx(20 / 60) and rates["win_rate_ties_half"] == pytest.approx(35 / 60)
    for key in ("win_rate", "tie_rate", "loss_rate", "win_rate_ties_half"):
        low, high = rates[f"{key}_ci"]
        assert low < rates[key] < high, key
        ref_low, ref_high = _index_bootstrap(verdicts, key, 4000, seed=1)
        assert low == pytest.approx(ref_low, abs=0.035) and high == pytest.approx(ref_high, abs=0.035), key
    se = math.sqrt(0.5 * 0.5 / 60)  # the normal approximation of the win rate's interval
    assert (rates["win_rate_ci"][1] - rates["win_rate_ci"][0]) / 2 == pytest.approx(1.96 * se, rel=0.2)

    assert judge_rates(verdicts, n_boot=1000, seed=0) == rates, "deterministic for a seed"
    assert judge_rates(verdicts, n_boot=1000, seed=1)["win_rate_ci"] != rates["win_rate_ci"]
    with pytest.raises(ValueError, match="unknown verdict 'won'"):
        judge_rates(["won"])
    with pytest.raises(ConfigError, match="n_boot"):
        judge_rates(["win"], n_boot=0)


def test_judgements_jsonl_is_complete_and_atomic(server, tmp_path):
    with _judge(server, "marker") as judge:
        got = _judge_cases(judge, tag=" (jsonl)")
    path = tmp_path / "eval" / "rose.judgements.jsonl"
    path.parent.mkdir()
    path.write_text("old content\n")
    write_judgements(path, got)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [Judgement(**row) for row in rows] == got, "every field of every judgement, in order"
    assert set(rows[0]) == {"id", "prompt", "reference", "answer", "protocol", "raw", "order_verdicts", "verdict"}
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file left"


# ----------------------------------------------------------------------------- evaluate_model end to end
GOLDEN = [
    {"prompt": "Say something.", "golden_answer": "x"},
    {"prompt": "Write a long essay on rivers.", "golden_answer": "Rivers " * 40},
    {"prompt": "One letter?", "golden_answer": "y"},
    {"prompt": "Explain gravity in detail.", "golden_answer": "Gravity " * 30},
    {"prompt": "Hi!", "golden_answer": "z"},
]


def _longer_judge_verdict(answer: str, reference: str) -> str:
    """What the 'longer' server must conclude under both orders, from the model's view."""
    return "win" if len(answer) > len(reference) else "loss" if len(reference) > len(answer) else "tie"


def _check_outputs(output, judgements, metrics, references, key_value):
    rows = [json.loads(line) for line in judgements.read_text().splitlines()]
    assert [r["reference"] for r in rows] == references
    want = [_longer_judge_verdict(r["answer"], r["reference"]) for r in rows]
    assert [r["verdict"] for r in rows] == want
    assert all(r["protocol"] == "both_orders" and set(r["raw"]) == {"answer_first", "reference_first"} for r in rows)
    expected = judge_rates(want, n_boot=1000, seed=0)
    assert {k: metrics[k] for k in expected} == expected
    assert metrics["protocol"] == "both_orders" and metrics["wins"] >= 1 and metrics["losses"] >= 1
    low, high = metrics["win_rate_ci"]
    assert low <= metrics["win_rate"] <= high

    text = output.read_text()
    saved = json.loads(text)
    assert "NaN" not in text and key_value not in text, "strict JSON, and the API key is never written"
    assert saved["metrics"]["win_rate_ci"] == [low, high]
    assert saved["config"]["judge"]["api_key_env"] == "ROSE_TEST_JUDGE_KEY"
    assert saved["config"]["judgements"] == str(judgements)
    assert sorted(p.name for p in output.parent.iterdir()) == sorted({output.name, judgements.name})
    return saved


def test_evaluate_model_on_golden_answers(server, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ROSE_TEST_JUDGE_KEY", "sekrit-golden")
    data = tmp_path / "se_test.json"
    data.write_text(json.dumps(GOLDEN))
    output = tmp_path / "eval" / "base.json"
    judge = JudgeArgs(base_url=server.url("longer"), model=JUDGE_MODEL, api_key_env="ROSE_TEST_JUDGE_KEY",
                      max_new_tokens=8, timeout=5.0, max_retries=0)
    metrics = evaluate_model(str(tiny_model_dir), None, str(data), str(output), label="base", batch_size=2,
                             max_seq_length=128, judge=judge)
    assert metrics["n"] == len(GOLDEN) and "pref_accuracy" not in metrics
    saved = _check_outputs(output, default_judgements_path(output), metrics, [g["golden_answer"] for g in GOLDEN],
                           "sekrit-golden")
    assert saved["method"] == "base" and saved["config"]["test_set"] == "golden"
    assert saved["config"]["prompt_format"] == "chat" and saved["config"]["judge"]["protocol"] == "both_orders"


def test_evaluate_model_on_preference_pairs_with_an_adapter(server, tiny_model_dir, tmp_path, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model

    from rose_pl.hub import load_causal_lm

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(load_causal_lm(str(tiny_model_dir)), lora).save_pretrained(tmp_path / "adapter")
    monkeypatch.setenv("ROSE_TEST_JUDGE_KEY", "sekrit-pairs")
    pairs = [{"prompt": g["prompt"], "chosen": g["golden_answer"], "rejected": f"no {i}", "task": "t"}
             for i, g in enumerate(GOLDEN)]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    output, judgements = tmp_path / "eval" / "rose.json", tmp_path / "eval" / "rose-verdicts.jsonl"
    judge = JudgeArgs(base_url=server.url("longer"), model=JUDGE_MODEL, api_key_env="ROSE_TEST_JUDGE_KEY",
                      max_new_tokens=8, max_prompts=4, timeout=5.0, max_retries=0)
    metrics = evaluate_model(str(tiny_model_dir), str(tmp_path / "adapter"), str(data), str(output), label="rose",
                             batch_size=2, max_seq_length=128, preference=PreferenceArgs(max_prompt_length=64),
                             judge=judge, judgements=str(judgements))
    assert metrics["num_pairs"] == len(pairs) and metrics["reference"] == "adapter_disabled"
    assert 0 <= metrics["pref_accuracy"] <= 1
    assert math.isfinite(metrics["reward_margin"]) and math.isfinite(metrics["sft_loss"])
    assert metrics["n"] == 4, "max_prompts limits the judged prompts"
    saved = _check_outputs(output, judgements, metrics, [p["chosen"] for p in pairs[:4]], "sekrit-pairs")
    assert saved["config"]["test_set"] == "preference" and saved["config"]["preference"]["max_prompt_length"] == 64
    assert saved["config"]["adapter"] == str(tmp_path / "adapter") and saved["config"]["beta"] == 0.1


def test_golden_answers_without_a_judge_are_refused_before_loading_the_model(tmp_path):
    data = tmp_path / "golden.jsonl"
    data.write_text(json.dumps(GOLDEN[0]) + "\n")
    with pytest.raises(ConfigError, match=re.escape(str(data)) + " holds prompts with golden answers"):
        evaluate_model("no-such-model", None, str(data), str(tmp_path / "out.json"))
    assert not (tmp_path / "out.json").exists()

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "task": "t"}) + "\n")
    judge = JudgeArgs(base_url="http://127.0.0.1:9/v1", model=JUDGE_MODEL, max_prompts=0, max_new_tokens=64)
    with pytest.raises(ConfigError) as err:  # every problem at once, still before the model loads
        evaluate_model("no-such-model", None, str(pairs), str(tmp_path / "out.json"), prompt_format="plain",
                       max_seq_length=64, judge=judge)
    for problem in ("prompt_format: 'plain'", "judge.max_prompts: 0", "judge.max_new_tokens (64)"):
        assert problem in str(err.value)


def test_default_judgements_path():
    assert str(default_judgements_path("runs/x/evaluation/rose.json")) == "runs/x/evaluation/rose.judgements.jsonl"
    assert str(default_judgements_path("out/result")) == "out/result.judgements.jsonl"
