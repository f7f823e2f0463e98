"""Time and peak memory of one batch of per-sample LoRA gradients on the embedded SmolLM2, eager vs SDPA attention.

    python benchmarks/attention_memory.py eager 4 1024   # implementation, rows, tokens per row
"""

import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from rose_pl.hub import load_causal_lm
from rose_pl.features.per_sample_grads import PerSampleGradients
from rose_pl.features.objectives import SFTObjective
impl, rows, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
base = load_causal_lm("embedded:smollm2-135m-instruct", attn_implementation=impl)
model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj","v_proj"], lora_dropout=0.0)).eval()
torch.manual_seed(0)  # the same LoRA B in every run
for n, p in model.named_parameters():
    if "lora_B" in n:
        torch.nn.init.normal_(p, std=0.02)
g = torch.Generator().manual_seed(0)
ids = torch.randint(10, 40000, (rows, T), generator=g)
mask = torch.ones_like(ids); mask[-1, T//2:] = 0
labels = ids.clone(); labels[:, : T//2] = -100; labels[mask == 0] = -100
batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
t = time.perf_counter()
out = PerSampleGradients(model).compute(SFTObjective(), batch)
print(impl, rows, T, f"{time.perf_counter()-t:.1f}s", f"maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1e6:.2f} GB")
