import importlib.util
import json
import logging
import math

import pytest
import torch
from torchmetrics.utilities import dim_zero_sum

from rose_pl.data.encoding import Encoder
from rose_pl.errors import ConfigError
from rose_pl.evaluation.generation import cut_at_stop, encode_prompts, generate, truncate_prompt
from rose_pl.evaluation.metrics import (
    EvaluationResult,
    PreferenceAccuracy,
    RewardAccuracy,
    RewardMargin,
    evaluate_preferences,
    evaluate_sft_loss,
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
        if importlib.util.find_spec("rose_pl.features.objectives") is None:
            pytest.skip("rose_pl.features.objectives not written yet")
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
    if importlib.util.find_spec("rose_pl.data.collate") is None or importlib.util.find_spec("rose_pl.features.objectives") is None:
        pytest.skip("rose_pl.data / rose_pl.features.objectives not written yet")
    from rose_pl.data.collate import PreferenceCollator
    from rose_pl.data.formats import PreferenceExample

    encoder = Encoder(tokenizer, 256, preference_format="rose", max_prompt_length=64)
    features = [
        {**encoder.encode_preference(PreferenceExample(str(i), "t", *pair)), "index": i} for i, pair in enumerate(PAIRS)
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


# ----------------------------------------------------------------------------- generation
PROMPTS = ["Tell me a long story about a dragon and a knight.", "hi", "What is 2+2?", "Name three colours, please."]


def _greedy_reference(model, ids, max_new_tokens, eos_id):
    """Independent reference: one unpadded, uncached full forward per new token, argmax, stop at EOS."""
    ids, new = list(ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == eos_id:
                break
            new.append(token)
    return new


def test_generate_equals_a_token_by_token_greedy_loop_in_input_order(tokenizer):
    model = tiny_llama(seed=4)
    model.train()
    encoded = encode_prompts(tokenizer, PROMPTS, max_seq_length=128, max_new_tokens=6)
    batched = generate(model, tokenizer, encoded.ids, max_new_tokens=6, batch_size=3, stop_texts=[])
    single = generate(model, tokenizer, encoded.ids, max_new_tokens=6, batch_size=1, stop_texts=[])
    want = [tokenizer.decode(_greedy_reference(model, ids, 6, tokenizer.eos_token_id)).strip() for ids in encoded.ids]
    assert batched == want, "left padding and length-sorted batches must not change greedy answers or their order"
    assert single == want
    assert model.training, "generation must restore the model's training mode"


def test_generate_cuts_at_the_first_stop_text(tokenizer):
    model = tiny_llama(seed=4)
    encoded = encode_prompts(tokenizer, PROMPTS[:1], max_seq_length=128, max_new_tokens=12)
    full = generate(model, tokenizer, encoded.ids, max_new_tokens=12, stop_texts=[])[0]
    assert len(full) >= 4, "the test needs a few generated characters"
    stop = full[2:4]
    cut = generate(model, tokenizer, encoded.ids, max_new_tokens=12, stop_texts=["never-generated", stop])[0]
    assert cut == full[: full.find(stop)].strip()
    assert cut_at_stop(" ab<|user|>cd</s>", ["</s>", "<|"]) == "ab"
    assert cut_at_stop(" plain ", ["</s>"]) == "plain"


def test_encode_prompts_chat_raw_and_truncation(tokenizer, caplog):
    chat = encode_prompts(tokenizer, PROMPTS, prompt_format="chat", chat_template="tulu", max_seq_length=128, max_new_tokens=8)
    encoder = Encoder(tokenizer, 128, "tulu", preference_format=None)
    assert chat.ids == [encoder.encode_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    assert tokenizer.decode(chat.ids[1]) == "<|user|>\nhi\n<|assistant|>\n"
    assert chat.stop_texts == encoder.template.stop_texts(tokenizer) and tokenizer.eos_token in chat.stop_texts
    assert chat.num_truncated == 0

    raw = encode_prompts(tokenizer, PROMPTS, prompt_format="raw", max_seq_length=128, max_new_tokens=8)
    assert raw.ids == [tokenizer(p)["input_ids"] for p in PROMPTS] and raw.stop_texts == [tokenizer.eos_token]

    with caplog.at_level(logging.WARNING, logger="rose_pl.evaluation.generation"):
        short = encode_prompts(tokenizer, PROMPTS, prompt_format="chat", max_seq_length=36, max_new_tokens=8)
    budget = 36 - 8
    assert short.num_truncated == sum(len(ids) > budget for ids in chat.ids) == 3
    assert short.ids == [ids[-budget:] for ids in chat.ids], "a too-long prompt keeps its last tokens"
    assert "3 of 4 prompts" in caplog.text

    assert truncate_prompt([1, 5, 6, 7, 8], 3, bos_token_id=1) == [1, 7, 8], "a leading BOS stays"
    assert truncate_prompt([5, 6, 7, 8], 3, bos_token_id=1) == [6, 7, 8]
    assert truncate_prompt([5, 6], 3, bos_token_id=1) == [5, 6]
    with pytest.raises(ConfigError, match="max_seq_length .8. must exceed max_new_tokens .8."):
        encode_prompts(tokenizer, PROMPTS, max_seq_length=8, max_new_tokens=8)
    with pytest.raises(ConfigError, match="prompt_format: 'plain'"):
        encode_prompts(tokenizer, PROMPTS, prompt_format="plain")


# ----------------------------------------------------------------------------- results
def test_result_json_is_atomic_strict_and_reads_back(tmp_path):
    rose = EvaluationResult("rose", {"pref_accuracy": 0.75, "reward_margin": float("nan"), "num_pairs": 8,
                                     "win_rate_ci": [0.5, float("inf")], "reference": "none"}, {"beta": 0.1})
    path = rose.write_json(tmp_path / "out" / "rose.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert list(data) == ["method", "metrics", "config"], "keys in field order, not sorted"
    assert data["metrics"]["reward_margin"] is None and data["metrics"]["win_rate_ci"] == [0.5, None]
    assert [p.name for p in path.parent.iterdir()] == ["rose.json"], "no temporary file left"
    back = EvaluationResult.read_json(path)
    assert back.method == "rose" and back.config == {"beta": 0.1} and back.metrics["num_pairs"] == 8


def test_an_adapter_of_another_base_model_is_refused_by_name_before_loading(tmp_path):
    from peft import LoraConfig, get_peft_model

    from rose_pl.training.sources import check_adapter_fits

    small, wide = tiny_llama(), tiny_llama(hidden_size=48, num_attention_heads=4)
    adapter = tmp_path / "adapter"
    get_peft_model(wide, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    with pytest.raises(ConfigError, match="trained on another base model than tiny-32.*32 inputs in tiny-32, 48 in the adapter"):
        check_adapter_fits(small, adapter, "tiny-32")
    check_adapter_fits(tiny_llama(hidden_size=48, num_attention_heads=4), adapter, "tiny-48")  # fits: no error
