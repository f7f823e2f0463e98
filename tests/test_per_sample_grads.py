import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from rose_pl.testing import random_sft_batch, token_rows
from rose_pl.errors import CheckpointError
from rose_pl.data.encoding import IGNORE_INDEX
from rose_pl.features.objectives import DPOObjective, PerSampleLoss, SFTObjective
from rose_pl.features.per_sample_grads import PerSampleGradients
from rose_pl.features.projection import IdentityProjector
from rose_pl.features.transforms import AdamTransformSink, adam_direction
from rose_pl.testing import tiny_llama

# Batched fp32 against a float64 single-example loop.
FP32_ATOL = 1e-5
FP32_RTOL = 1e-4
# Same fp32 computation through two attention kernels.
KERNEL_ATOL = 1e-5
KERNEL_RTOL = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_model(seed=0, attn="eager", **lora_kwargs):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.1, **lora_kwargs)
    model = get_peft_model(tiny_llama(seed=seed, attn_implementation=attn), config)
    torch.manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # with B = 0 the gradients of A vanish and the test would be weak
            nn.init.normal_(param, std=0.2)
    return model.eval()  # dropout off: rows independent


def _rows(lengths, prompt_lengths, seed):
    return token_rows(lengths, prompt_lengths, seed)


def sft_batch(lengths=(14, 6, 10, 3), prompts=(5, 1, 4, 1), seed=0):
    return random_sft_batch(lengths, prompts, seed)


def preference_batch(seed=0):
    batch = {"index": torch.arange(3)}
    for side, lengths, s in (("chosen", (11, 6, 8), seed), ("rejected", (7, 9, 5), seed + 100)):
        ids, mask, labels = _rows(lengths, (3, 2, 4), s)
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def _trim(ids, mask, labels, i):
    n = int(mask[i].sum())
    return ids[i : i + 1, :n], labels[i : i + 1, :n]


def _hf_summed_logprob(model, ids, labels):
    """Reference independent of rose_pl.features.objectives: Hugging Face's own loss times the token count."""
    return -model(input_ids=ids, labels=labels).loss * (labels[:, 1:] != IGNORE_INDEX).sum()


def loop_grads(model, sample_losses):
    """Per-sample gradients by one float64 backward pass per unpadded sample."""
    ref = copy.deepcopy(model).double()
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    for loss_fn in sample_losses:
        for p in params.values():
            p.grad = None
        loss_fn(ref).backward()
        for n, p in params.items():
            out[n].append(p.grad.clone())
    return {n: torch.stack(g) for n, g in out.items()}


def assert_grads_close(batched, reference, atol=FP32_ATOL, rtol=FP32_RTOL):
    assert list(batched) == list(reference)
    for name, grad in batched.items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad.double(), reference[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_batched_grads_equal_single_example_loop():
    model = lora_model()
    batch = sft_batch()
    psg = PerSampleGradients(model)
    grads = psg.compute(SFTObjective(), batch)

    def sample_loss(i):
        ids, labels = _trim(batch["input_ids"], batch["attention_mask"], batch["labels"], i)
        return lambda m: m(input_ids=ids, labels=labels).loss

    assert_grads_close(grads, loop_grads(model, [sample_loss(i) for i in range(4)]))
    a = grads["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert (a.flatten(1).norm(dim=1) > 1e-3).all()  # non-trivial: A gets gradient through random B
    assert psg.last_losses.shape == (4,)


def test_batched_dpo_grads_equal_single_example_loop():
    model = lora_model()
    batch = preference_batch()
    beta = 0.3
    grads = PerSampleGradients(model).compute(DPOObjective(beta=beta), batch)

    def sample_loss(i):
        def loss(m):
            logp = {}
            for side in ("chosen", "rejected"):
                ids, mask, labels = (batch[f"{side}_{key}"] for key in ("input_ids", "attention_mask", "labels"))
                ids, labels = _trim(ids, mask, labels, i)
                logp[side] = _hf_summed_logprob(m, ids, labels)
                with torch.no_grad(), m.disable_adapter():
                    logp["ref_" + side] = _hf_summed_logprob(m, ids, labels)
            margin = (logp["chosen"] - logp["ref_chosen"]) - (logp["rejected"] - logp["ref_rejected"])
            return -F.logsigmoid(beta * margin)

        return loss

    assert_grads_close(grads, loop_grads(model, [sample_loss(i) for i in range(3)]))


def ConcatSink(psg):
    """The concatenated per-sample gradient in `psg.names` order (the identity projection)."""
    sink = IdentityProjector()
    sink.setup({n: psg.parameters[n].shape for n in psg.names}, "cpu")
    return sink


class RecordingSink:
    def __init__(self, psg):
        self.inner = ConcatSink(psg)

    def begin(self, num_samples, device):
        self.inner.begin(num_samples, device)
        self.calls = []

    def add(self, name, grad):
        self.calls.append((name, tuple(grad.shape), grad.dtype))
        self.inner.add(name, grad)

    def finish(self):
        return self.inner.finish()


def test_sink_path_equals_dict_path():
    model = lora_model()
    psg = PerSampleGradients(model)
    grads = psg.compute(SFTObjective(), sft_batch())
    sink = RecordingSink(psg)
    features = psg.compute(SFTObjective(), sft_batch(), sink=sink)
    assert sorted(c[0] for c in sink.calls) == sorted(psg.names)  # each parameter exactly once
    assert all(c[1] == (4, *psg.parameters[c[0]].shape) and c[2] == torch.float32 for c in sink.calls)
    torch.testing.assert_close(features, torch.cat([g.flatten(1) for g in grads.values()], dim=1), rtol=0, atol=0)


def test_adam_direction_hand_computation():
    # m' = 0.9*1 + 0.1*2 = 1.1, v' = 0.999*4 + 0.001*4 = 4 -> 1.1 / sqrt(4 + 1e-8)
    got = adam_direction(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([4.0]), 0.9, 0.999, 1e-8)
    assert got.item() == pytest.approx(1.1 / (4 + 1e-8) ** 0.5, rel=1e-6)


def test_adam_transform_sink_equals_hand_computation():
    model = lora_model()
    psg = PerSampleGradients(model)
    grads = psg.compute(SFTObjective(), sft_batch())
    gen = torch.Generator().manual_seed(0)
    state = {
        n: (torch.randn(p.shape, generator=gen), torch.rand(p.shape, generator=gen)) for n, p in psg.parameters.items()
    }
    b1, b2, eps = 0.8, 0.95, 1e-6
    sink = AdamTransformSink(ConcatSink(psg), state, b1, b2, eps)
    features = psg.compute(SFTObjective(), sft_batch(), sink=sink)
    expected = []
    for name, g in grads.items():
        m, v = state[name]
        expected.append(((b1 * m + (1 - b1) * g) / (b2 * v + (1 - b2) * g**2 + eps) ** 0.5).flatten(1))
    torch.testing.assert_close(features, torch.cat(expected, dim=1))
    missing = {n: s for n, s in state.items() if n != psg.names[0]}
    with pytest.raises(CheckpointError, match="no Adam state"):
        psg.compute(SFTObjective(), sft_batch(), sink=AdamTransformSink(ConcatSink(psg), missing, b1, b2, eps))


def test_dpo_features_equal_after_normalization_for_reference_and_beta():
    model = lora_model()
    batch = preference_batch()
    psg = PerSampleGradients(model)

    def features(objective):
        return psg.compute(objective, batch, sink=ConcatSink(psg))

    low, high = features(DPOObjective(beta=0.1)), features(DPOObjective(beta=1.0))
    none = features(DPOObjective(reference="none"))
    assert not torch.allclose(low, high, rtol=1e-2, atol=0)  # the scale differs, so the check below can fail
    for other in (high, none):
        torch.testing.assert_close(F.normalize(other, dim=1), F.normalize(low, dim=1), atol=1e-6, rtol=1e-4)


def test_hooks_removed_and_grad_untouched():
    model = lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    sentinel = torch.full_like(params[0], 7.0)
    params[0].grad = sentinel.clone()
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    psg = PerSampleGradients(model)
    psg.compute(SFTObjective(), sft_batch())

    def failing(model, batch):
        model(input_ids=batch["input_ids"])
        raise RuntimeError("objective failed")

    with pytest.raises(RuntimeError, match="objective failed"):
        psg.compute(failing, sft_batch())
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
    torch.testing.assert_close(params[0].grad, sentinel, rtol=0, atol=0)
    assert all(p.grad is None for p in params[1:])


def test_unsupported_trainable_parameter_raises_naming_it():
    model = lora_model(modules_to_save=["embed_tokens"])
    with pytest.raises(NotImplementedError, match=r"embed_tokens\.modules_to_save\.default\.weight"):
        PerSampleGradients(model)
    plain = tiny_llama()
    for p in plain.parameters():
        p.requires_grad_(False)
    plain.model.norm.weight.requires_grad_(True)
    with pytest.raises(NotImplementedError, match=r"'model\.norm\.weight'.*LlamaRMSNorm"):
        PerSampleGradients(plain)


def test_disabled_adapter_raises_instead_of_zero_gradients():
    model = lora_model()
    psg = PerSampleGradients(model)
    with model.disable_adapter(), pytest.raises(ValueError, match="did not run with grad"):
        psg.compute(SFTObjective(), sft_batch())


class TwoLayer(nn.Module):
    """A tiny regression net whose `shared` Linear (with bias) runs twice per forward."""

    def __init__(self, tie=False):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)
        if tie:
            self.other = nn.Linear(3, 3)
            self.other.weight = self.shared.weight

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x))))).squeeze(-1)


def _regression(model, batch):
    return PerSampleLoss((model(batch["x"]) - batch["y"]) ** 2)


def test_module_used_twice_accumulates_both_calls():
    model = TwoLayer()
    batch = {"x": torch.randn(5, 3), "y": torch.randn(5)}
    grads = PerSampleGradients(model).compute(_regression, batch)
    samples = [{k: v[i : i + 1].double() for k, v in batch.items()} for i in range(5)]
    reference = loop_grads(model, [lambda m, s=s: _regression(m, s).losses.sum() for s in samples])
    assert_grads_close(grads, reference)


def test_parameter_shared_by_two_modules_raises():
    with pytest.raises(NotImplementedError, match="shared by modules"):
        PerSampleGradients(TwoLayer(tie=True))


def test_sdpa_attention_gives_same_grads_as_eager():
    batch = sft_batch()
    eager = PerSampleGradients(lora_model(attn="eager")).compute(SFTObjective(), batch)
    sdpa = PerSampleGradients(lora_model(attn="sdpa")).compute(SFTObjective(), batch)
    for name in eager:
        torch.testing.assert_close(sdpa[name], eager[name], atol=KERNEL_ATOL, rtol=KERNEL_RTOL)


def test_activation_dtype_path_returns_float32_close_to_fp32():
    model = lora_model()
    batch = sft_batch()
    reference = PerSampleGradients(model).compute(SFTObjective(), batch)
    low = copy.deepcopy(model).bfloat16()
    grads = PerSampleGradients(low, compute_dtype=None).compute(SFTObjective(), batch)
    assert all(g.dtype == torch.float32 for g in grads.values())
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1)
    ref = torch.cat([g.flatten(1) for g in reference.values()], 1)
    assert (F.cosine_similarity(flat, ref, dim=1) > 0.98).all()


def test_gradient_checkpointing_is_refused():
    model = lora_model()
    model.gradient_checkpointing_enable()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        PerSampleGradients(model).compute(SFTObjective(), sft_batch())
