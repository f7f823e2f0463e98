import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from rose_pl.testing import random_sft_batch, token_rows
from rose_pl.data.encoding import IGNORE_INDEX
from rose_pl.features.objectives import DPOObjective, SFTObjective, concat_pairs
from rose_pl.training.losses import dpo_loss, sequence_logprobs, sft_loss, sft_loss_per_sample, token_logprobs
from rose_pl.testing import tiny_llama

ATOL = 1e-5
RTOL = 1e-5


def _lora_model(seed=0):
    model = get_peft_model(
        tiny_llama(seed=seed),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.1),
    )
    torch.manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # zero-initialized B would make the adapter a no-op
            nn.init.normal_(param, std=0.2)
    return model.eval()


def _rows(lengths, prompt_lengths, seed):
    return token_rows(lengths, prompt_lengths, seed)


def _sft_batch(lengths=(12, 7, 9, 4), prompts=(3, 2, 5, 1), seed=0):
    return random_sft_batch(lengths, prompts, seed)


def _preference_batch(seed=0):
    chosen = _rows((10, 6, 8), (3, 2, 4), seed)
    rejected = _rows((7, 9, 5), (3, 2, 4), seed + 100)
    batch = {"index": torch.arange(3)}
    for side, (ids, mask, labels) in (("chosen", chosen), ("rejected", rejected)):
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def _hf_summed_logprob(model, ids, labels):
    """Independent reference: Hugging Face's own shifted token-mean CE times the token count."""
    count = (labels[:, 1:] != IGNORE_INDEX).sum()
    return -model(input_ids=ids, labels=labels).loss * count


def test_token_logprobs_shift_matches_manual_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 6, 0, 2]])
    logps, mask = token_logprobs(logits, labels)
    assert logps.shape == mask.shape == (2, 4)
    for n in range(2):
        for t in range(4):
            label = labels[n, t + 1].item()
            expected = torch.log_softmax(logits[n, t], -1)[label].item() if label != IGNORE_INDEX else 0.0
            assert bool(mask[n, t]) == (label != IGNORE_INDEX)
            assert logps[n, t].item() == pytest.approx(expected, abs=1e-6)


def test_token_logprobs_are_float32_for_bf16_logits():
    logps, _ = token_logprobs(torch.randn(1, 4, 9).bfloat16(), torch.tensor([[0, 1, 2, 3]]))
    assert logps.dtype == torch.float32


def test_sequence_logprobs_match_hf_loss_per_row():
    model = tiny_llama()
    batch = _sft_batch()
    with torch.no_grad():
        got = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        for i, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            row = slice(i, i + 1)
            expected = _hf_summed_logprob(model, batch["input_ids"][row, :length], batch["labels"][row, :length])
            torch.testing.assert_close(got[i], expected, atol=ATOL, rtol=RTOL)


def test_sft_loss_per_sample_is_token_mean_and_zero_without_response_tokens():
    model = tiny_llama()
    batch = _sft_batch(lengths=(9, 6), prompts=(2, 6))  # second sample: no response tokens
    with torch.no_grad():
        losses = sft_loss_per_sample(model, batch)
        expected = -_hf_summed_logprob(model, batch["input_ids"][:1, :9], batch["labels"][:1, :9]) / 7
    torch.testing.assert_close(losses[0], expected, atol=ATOL, rtol=RTOL)
    assert losses[1].item() == 0.0


def test_sft_loss_with_num_tokens_sums_to_global_token_mean_over_halves():
    model = tiny_llama()
    batch = _sft_batch()
    total = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 1), slice(1, 4))]  # unequal token counts
    with torch.no_grad():
        whole = sft_loss(model, batch)
        summed = sum(sft_loss(model, half, num_tokens=total) for half in halves)
        plain_mean_of_halves = sum(sft_loss(model, half) for half in halves) / 2
    torch.testing.assert_close(summed, whole, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(plain_mean_of_halves, whole, atol=1e-3)  # why num_tokens exists


def test_dpo_loss_matches_hand_formula():
    pc, pr = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -4.0])
    rc, rr = torch.tensor([-4.0, -9.0]), torch.tensor([-4.5, -6.0])
    beta = 0.5
    got = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(2):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        assert got[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))), rel=1e-6)
    # sample 0: z = 0.5 * (1 + 0.5) = 0.75
    assert got[0].item() == pytest.approx(math.log(1 + math.exp(-0.75)), rel=1e-6)


def test_concat_pairs_pads_both_sides_to_one_length():
    batch = _preference_batch()
    pairs = concat_pairs(batch)
    assert pairs["input_ids"].shape == (6, 10)
    assert (pairs["labels"][3:, 9] == IGNORE_INDEX).all() and (pairs["attention_mask"][3:, 9] == 0).all()
    torch.testing.assert_close(pairs["input_ids"][3:, :9], batch["rejected_input_ids"])


def _count_forwards(model):
    calls = []
    handle = model.get_base_model().register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    return calls, handle


def test_dpo_objective_runs_one_policy_forward_and_matches_separate_forwards():
    model = _lora_model()
    batch = _preference_batch()
    calls, handle = _count_forwards(model)
    result = DPOObjective(beta=0.2)(model, batch)
    handle.remove()
    assert calls == [False, True]  # reference without grad, then one policy forward for both sides
    torch.testing.assert_close(result.row_to_sample, torch.tensor([0, 1, 2, 0, 1, 2]))
    with torch.no_grad():
        for i in range(3):
            logp = {}
            for side in ("chosen", "rejected"):
                n = int(batch[f"{side}_attention_mask"][i].sum())
                ids, labels = batch[f"{side}_input_ids"][i : i + 1, :n], batch[f"{side}_labels"][i : i + 1, :n]
                logp[side] = _hf_summed_logprob(model, ids, labels)
                with model.disable_adapter():
                    logp["ref_" + side] = _hf_summed_logprob(model, ids, labels)
            z = 0.2 * ((logp["chosen"] - logp["ref_chosen"]) - (logp["rejected"] - logp["ref_rejected"]))
            torch.testing.assert_close(result.losses[i], -torch.nn.functional.logsigmoid(z), atol=ATOL, rtol=1e-4)


def test_dpo_reference_none_skips_reference_forward():
    model = _lora_model()
    batch = _preference_batch()
    calls, handle = _count_forwards(model)
    result = DPOObjective(reference="none")(model, batch)
    handle.remove()
    assert calls == [True]
    chosen, rejected = DPOObjective().policy_logps(model, batch)
    torch.testing.assert_close(result.losses, rejected - chosen)


def test_dpo_uses_precomputed_reference_logps():
    model = _lora_model()
    batch = _preference_batch()
    with torch.no_grad():
        ref_chosen, ref_rejected = DPOObjective().reference_logps(model, batch)
    calls, handle = _count_forwards(model)
    with torch.no_grad():
        precomputed = {**batch, "reference_chosen_logps": ref_chosen, "reference_rejected_logps": ref_rejected}
        got = DPOObjective()(model, precomputed)
        expected = DPOObjective()(model, batch)
    handle.remove()
    assert len(calls) == 3  # precomputed: policy only; computed: reference + policy
    torch.testing.assert_close(got.losses, expected.losses)


def test_dpo_adapter_reference_needs_peft_model():
    with pytest.raises(ValueError, match="disable_adapter"):
        DPOObjective()(tiny_llama(), _preference_batch())


def test_dpo_objective_rejects_bad_arguments():
    with pytest.raises(ValueError, match="reference"):
        DPOObjective(reference="model")
    with pytest.raises(ValueError, match="beta"):
        DPOObjective(beta=0.0)


def test_sft_objective_returns_identity_rows():
    model = tiny_llama()
    with torch.no_grad():
        result = SFTObjective()(model, _sft_batch())
        expected = sft_loss_per_sample(model, _sft_batch())
    assert result.row_to_sample is None and result.num_samples == 4
    torch.testing.assert_close(result.losses, expected)


def test_right_padded_batches_run_without_a_mask_and_lose_nothing(tiny_model):
    """The causal fast path (no attention mask) for right padding: the same per-sample losses and gradients."""
    from rose_pl.testing import random_sft_batch
    from rose_pl.training.losses import right_padding_only, sft_loss_per_sample

    batch = random_sft_batch([12, 9, 5, 3], [2, 2, 1, 1], seed=3)
    assert right_padding_only(batch["attention_mask"]) is None
    left = batch["attention_mask"].flip(1)
    assert right_padding_only(left) is left  # left padding keeps its mask
    for name, p in tiny_model.named_parameters():
        p.requires_grad_(name.endswith("q_proj.weight"))
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    fast = sft_loss_per_sample(tiny_model, batch)
    # The reference runs the model with the padding mask (HF's masked attention path).
    logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    from rose_pl.training.losses import token_logprobs

    logps, mask = token_logprobs(logits, batch["labels"])
    reference = -logps.sum(-1) / mask.sum(-1)
    torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(fast.sum(), params)
    expected = torch.autograd.grad(reference.sum(), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
