import importlib.util
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from torchmetrics.utilities import dim_zero_sum

from rose_pl.errors import JudgeError
from rose_pl.evaluation import (
    EvaluationResult,
    JudgeClient,
    PreferenceAccuracy,
    RewardAccuracy,
    RewardMargin,
    evaluate_preferences,
    evaluate_sft_loss,
    generate_responses,
    parse_verdict,
    results_table,
    win_rate,
)
from rose_pl.testing import tiny_llama

BETA = 0.25
ATOL = 1e-4  # float32 model, batched (padded) vs single-example forward passes

PAIRS = [  # (prompt, chosen, rejected), unequal lengths so that batches need padding
    ("Name a fruit.", " An apple.", " A chair, obviously."),
    ("2+2?", " 4", " 5"),
    ("Say hi", " Hi there!", " no"),
    ("Translate 'chat' to English.", " cat", " dog dog dog"),
    ("Capital of France?", " Paris.", " Rome is the capital."),
    ("Sort 3 1 2", " 1 2 3", " 3 2 1"),
    ("Spell 'bee'", " b-e-e", " b"),
]


# ----------------------------------------------------------------------------- helpers
def _peft_model(seed=0):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(seed + 1)  # init_lora_weights=False: lora_B random, so the adapter changes outputs
    return get_peft_model(base, config)


def _encode(tokenizer, prompt, response):
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    return p + r, [-100] * len(p) + r


def _pad(rows, pad_id):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return ids, mask, labels


def _preference_batches(tokenizer, pairs, batch_size, start=0):
    batches = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        batch = {"index": torch.arange(start + s, start + s + len(chunk))}
        for side, col in (("chosen", 1), ("rejected", 2)):
            ids, mask, labels = _pad([_encode(tokenizer, p[0], p[col]) for p in chunk], tokenizer.pad_token_id)
            batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
        batches.append(batch)
    return batches


def _ref_logprobs(model, input_ids, attention_mask, labels):
    """Independent reference: one unpadded forward per row, float64 log-softmax, shift by one."""
    out = []
    for ids, mask, lab in zip(input_ids, attention_mask, labels):
        n = int(mask.sum())
        ids, lab = ids[:n], lab[:n]
        logits = model(input_ids=ids[None]).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None])[:, 0]
        out.append(logp[lab[1:] != -100].sum())
    return torch.stack(out)


def _per_pair(model, tokenizer, pairs):
    """(chosen, rejected, ref_chosen, ref_rejected) log-probs, one pair at a time."""
    rows = []
    with torch.no_grad():
        for pair in pairs:
            b = _preference_batches(tokenizer, [pair], 1)[0]
            args = lambda side: (b[f"{side}_input_ids"], b[f"{side}_attention_mask"], b[f"{side}_labels"])  # noqa: E731
            c, r = _ref_logprobs(model, *args("chosen")), _ref_logprobs(model, *args("rejected"))
            with model.disable_adapter():
                rc, rr = _ref_logprobs(model, *args("chosen")), _ref_logprobs(model, *args("rejected"))
            rows.append(torch.cat([c, r, rc, rr]))
    return torch.stack(rows).T


def _logprobs_fn(which):
    if which == "objectives":
        if importlib.util.find_spec("rose_pl.objectives") is None:
            pytest.skip("rose_pl.objectives not written yet")
        return None  # the default: objectives.sequence_logprobs
    return _ref_logprobs


# ----------------------------------------------------------------------------- preference metrics
@pytest.mark.parametrize("which", ["objectives", "test_reference"])
def test_preference_metrics_equal_per_pair_loop(tokenizer, which):
    model = _peft_model()
    model.train()
    c, r, rc, rr = _per_pair(model, tokenizer, PAIRS)
    assert (c - rc).abs().max() > 1e-3, "the adapter must change the outputs for this test to mean anything"

    got = evaluate_preferences(model, _preference_batches(tokenizer, PAIRS, 3), beta=BETA, logprobs_fn=_logprobs_fn(which))

    margins = BETA * ((c - rc) - (r - rr))
    assert got["num_pairs"] == len(PAIRS)
    assert got["pref_accuracy"] == pytest.approx((c > r).double().mean().item())
    assert got["reward_accuracy"] == pytest.approx((margins > 0).double().mean().item())
    assert got["reward_margin"] == pytest.approx(margins.mean().item(), abs=ATOL)
    assert got["chosen_logp_mean"] == pytest.approx(c.mean().item(), abs=ATOL)
    assert got["rejected_logp_mean"] == pytest.approx(r.mean().item(), abs=ATOL)
    assert got["reference"] == "adapter_disabled" and got["beta"] == BETA
    assert model.training, "evaluation must restore the model's training mode"


def test_preference_metrics_do_not_depend_on_batch_size(tokenizer):
    model = _peft_model(seed=3)
    results = [
        evaluate_preferences(model, _preference_batches(tokenizer, PAIRS, bs), beta=BETA, logprobs_fn=_logprobs_fn("objectives"))
        for bs in (1, len(PAIRS))
    ]
    for other in results[1:]:
        for key, value in results[0].items():
            assert other[key] == pytest.approx(value, abs=ATOL) if isinstance(value, float) else other[key] == value


def test_works_on_batches_of_the_data_layer(tokenizer):
    if importlib.util.find_spec("rose_pl.data.collate") is None or importlib.util.find_spec("rose_pl.objectives") is None:
        pytest.skip("rose_pl.data / rose_pl.objectives not written yet")
    from rose_pl.data.chat import encode_preference
    from rose_pl.data.collate import PreferenceCollator
    from rose_pl.data.formats import PreferenceExample

    features = [
        {**encode_preference(PreferenceExample(str(i), "t", *pair), tokenizer, 256), "index": i} for i, pair in enumerate(PAIRS)
    ]
    collate = PreferenceCollator(tokenizer.pad_token_id)
    model = _peft_model(seed=5)
    got = evaluate_preferences(model, [collate(features[:4]), collate(features[4:])], beta=BETA)
    with torch.no_grad():
        want = evaluate_preferences(model, [collate([f]) for f in features], beta=BETA, logprobs_fn=_ref_logprobs)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=ATOL) if isinstance(value, float) else got[key] == value


def test_metric_states_merged_from_two_halves_equal_one_pass(tokenizer):
    c, r, rc, rr = _per_pair(_peft_model(seed=1), tokenizer, PAIRS)
    half = len(PAIRS) // 2
    for make, args in (
        (PreferenceAccuracy, (c, r)),
        (lambda: RewardAccuracy(BETA), (c, r, rc, rr)),
        (lambda: RewardMargin(BETA), (c, r, rc, rr)),
    ):
        whole, first, second, twice = make(), make(), make(), make()
        whole.update(*args)
        first.update(*(a[:half] for a in args))
        second.update(*(a[half:] for a in args))
        first.merge_state(second)  # what a DDP sum-reduction of the states does
        twice.update(*(a[:half] for a in args))
        twice.update(*(a[half:] for a in args))
        torch.testing.assert_close(first.compute(), whole.compute())
        torch.testing.assert_close(twice.compute(), whole.compute())
        assert all(fx is dim_zero_sum for fx in whole._reductions.values()), "states must sum under DDP"


def test_ties_count_as_not_correct():
    x = torch.tensor([-1.0, -2.0, -3.0])
    acc = PreferenceAccuracy()
    acc.update(x, x)
    assert acc.compute().item() == 0.0
    reward = RewardAccuracy(BETA)
    reward.update(x, x, x, x)
    assert reward.compute().item() == 0.0


def test_model_without_adapters_reports_reward_metrics_as_nan(tokenizer):
    got = evaluate_preferences(tiny_llama(), _preference_batches(tokenizer, PAIRS, 4), logprobs_fn=_ref_logprobs)
    assert got["reference"] == "none" and got["num_pairs"] == len(PAIRS)
    assert math.isnan(got["reward_accuracy"]) and math.isnan(got["reward_margin"])
    assert 0.0 <= got["pref_accuracy"] <= 1.0


@pytest.mark.parametrize("which", ["objectives", "test_reference"])
def test_sft_loss_is_token_mean_and_per_sample_mean(tokenizer, which):
    model = tiny_llama(seed=2)
    rows = [_encode(tokenizer, p, ch) for p, ch, _ in PAIRS[:5]]
    rows.append(_encode(tokenizer, "only a prompt", ""))  # no answer token: counted, not averaged
    batches = []
    for s in range(0, len(rows), 4):
        ids, mask, labels = _pad(rows[s : s + 4], tokenizer.pad_token_id)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(s, s + len(ids))})

    got = evaluate_sft_loss(model, batches, logprobs_fn=_logprobs_fn(which))

    nll, counts = [], []
    with torch.no_grad():
        for ids, labels in rows[:-1]:
            ids_t, lab_t = torch.tensor([ids]), torch.tensor([labels])
            nll.append(-_ref_logprobs(model, ids_t, torch.ones_like(ids_t), lab_t).item())
            counts.append(sum(1 for x in labels[1:] if x != -100))
    assert got["num_samples"] == 6 and got["num_empty_samples"] == 1 and got["num_tokens"] == sum(counts)
    assert got["sft_loss"] == pytest.approx(sum(nll) / sum(counts), abs=ATOL)
    assert got["sft_loss_per_sample"] == pytest.approx(sum(n / k for n, k in zip(nll, counts)) / 5, abs=ATOL)


# ----------------------------------------------------------------------------- judge
ANSWERS = {"q-win": "A", "q-loss": "**B**", "q-tie": "Tie.", "q-verdict": "Verdict: [[A]]\nbecause...", "q-garbage": "Both are fine I guess"}


class _JudgeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if self.path.startswith("/fail/"):
            return self._send(500, {"error": "overloaded"})
        if self.path.startswith("/slow/"):
            time.sleep(1.0)
        if self.path.rstrip("/").split("/v1")[-1] != "/chat/completions":
            return self._send(404, {"error": "no such route"})
        prompt = body["messages"][-1]["content"]
        # the server checks the request: model name, model response shown first as Response A
        if body.get("model") != "judge-model":
            return self._send(400, {"error": f"unknown model {body.get('model')}"})
        order = [prompt.find(s) for s in ("[Response A]", "MODEL-RESPONSE", "[Response B]", "REFERENCE-RESPONSE")]
        if -1 in order or order != sorted(order):
            return self._send(400, {"error": "model response must be Response A, the reference Response B"})
        answer = next(a for key, a in ANSWERS.items() if key in prompt)
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]})


@pytest.fixture(scope="module")
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JudgeHandler)
    server.requests = []
    server.handle_error = lambda *args: None  # the slow route writes to a socket the client closed
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_judge_client_against_local_server_counts_verdicts(judge_server, monkeypatch):
    server, url = judge_server
    monkeypatch.setenv("ROSE_TEST_JUDGE_KEY", "sekrit")
    client = JudgeClient(url + "/v1/", "judge-model", api_key_env="ROSE_TEST_JUDGE_KEY", retry_backoff=0)
    keys = ["q-win", "q-loss", "q-tie", "q-verdict", "q-garbage", "q-win"]
    start = len(server.requests)
    verdicts = client.judge_all(keys, [f"MODEL-RESPONSE {k}" for k in keys], [f"REFERENCE-RESPONSE {k}" for k in keys])

    assert verdicts == ["win", "loss", "tie", "win", "invalid", "win"]
    assert client.invalid_answers == [{"instruction": "q-garbage", "answer": ANSWERS["q-garbage"]}]
    requests = server.requests[start:]
    assert len(requests) == len(keys)
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sekrit" for r in requests)
    assert requests[0]["body"]["model"] == "judge-model"
    assert win_rate(verdicts) == {"win_rate": 3.5 / 5, "wins": 3, "losses": 1, "ties": 1, "invalid": 1, "n": 6}


def test_unreachable_judge_raises_judge_error_naming_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    client = JudgeClient(f"http://127.0.0.1:{port}/v1", "judge-model", max_retries=1, retry_backoff=0)
    with pytest.raises(JudgeError, match=rf"judge endpoint http://127\.0\.0\.1:{port}/v1/chat/completions unreachable"):
        client.judge_pair("q-win", "MODEL-RESPONSE", "REFERENCE-RESPONSE")


def test_http_500_is_retried_then_raises(judge_server):
    server, url = judge_server
    client = JudgeClient(url + "/fail/v1", "judge-model", max_retries=2, retry_backoff=0)
    start = len(server.requests)
    with pytest.raises(JudgeError, match=r"/fail/v1/chat/completions answered HTTP 500.*after 3 attempts"):
        client.judge_pair("q-win", "MODEL-RESPONSE", "REFERENCE-RESPONSE")
    assert len(server.requests) - start == 3


def test_client_error_is_not_retried_and_timeout_raises(judge_server):
    server, url = judge_server
    start = len(server.requests)
    with pytest.raises(JudgeError, match="HTTP 400.*unknown model wrong-model"):
        JudgeClient(url + "/v1", "wrong-model", max_retries=2, retry_backoff=0).judge_pair("q-win", "MODEL-RESPONSE", "REFERENCE-RESPONSE")
    assert len(server.requests) - start == 1
    with pytest.raises(JudgeError, match=r"/slow/v1/chat/completions unreachable: .*timed out"):
        JudgeClient(url + "/slow/v1", "judge-model", timeout=0.2, max_retries=0).judge_pair("q-win", "MODEL-RESPONSE", "REFERENCE-RESPONSE")


def test_parse_verdict_and_win_rate_edge_cases():
    assert [parse_verdict(a) for a in ["A", " b. ", "Response A", "**tie**", "Final verdict: B", "`A`\nmore"]] == [
        "A", "B", "A", "tie", "B", "A",
    ]
    assert [parse_verdict(a) for a in ["", None, "A and B", "I prefer A", "AB"]] == [None] * 5
    assert math.isnan(win_rate(["invalid"])["win_rate"])
    with pytest.raises(ValueError, match="unknown verdict"):
        win_rate(["won"])


# ----------------------------------------------------------------------------- generation
def test_generate_responses_returns_new_text_within_budget(tokenizer):
    model = tiny_llama(seed=4)
    prompts = ["Tell me a long story about a dragon and a knight.", "hi", "What is 2+2?"]
    old_side = tokenizer.padding_side
    batched = generate_responses(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = generate_responses(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert all(isinstance(t, str) for t in batched) and len(batched) == len(prompts)
    assert all(len(t) <= 6 for t in batched), "one byte token decodes to at most one character"
    assert batched == single, "left padding must not change greedy outputs"
    assert tokenizer.padding_side == old_side


# ----------------------------------------------------------------------------- results
def test_result_json_is_atomic_strict_and_table_lines_methods_up(tmp_path):
    rose = EvaluationResult("rose", {"pref_accuracy": 0.75, "reward_margin": float("nan"), "num_pairs": 8, "reference": "none"}, {"beta": 0.1})
    path = rose.write_json(tmp_path / "out" / "rose.json")
    text = path.read_text()
    assert "NaN" not in text and json.loads(text)["metrics"]["reward_margin"] is None
    assert [p.name for p in path.parent.iterdir()] == ["rose.json"]
    back = EvaluationResult.read_json(path)
    assert back.method == "rose" and back.config == {"beta": 0.1} and back.metrics["num_pairs"] == 8

    table = results_table({"ROSE": back.metrics, "random": {"pref_accuracy": 0.5, "win_rate": 0.25}})
    lines = table.strip().splitlines()
    assert lines[0] == "| method | pref_accuracy | reward_margin | num_pairs | win_rate |"
    assert lines[2] == "| ROSE | 0.7500 | n/a | 8 | - |"
    assert lines[3] == "| random | 0.5000 | - | - | 0.2500 |"
    assert rose.markdown_row(["num_pairs"]) == "| rose | 8 |"
