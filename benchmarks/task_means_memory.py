"""Memory of the exact path's task means: tasks x trainable LoRA parameters x bytes per element.

The LoRA parameter count is taken from peft itself: each model's architecture (the attention shapes of its
published config.json) is built on the meta device (no weights, no download), wrapped with `add_lora`, and
its trainable parameters are counted; a closed form (per layer and adapted module, r x (fan_in + fan_out))
cross-checks it. The embedded SmolLM2 uses the converted model's own config.json when it is cached.

    python benchmarks/task_means_memory.py --tasks 10,20,30,60 --out benchmarks/results/task_means_memory.json
"""

from __future__ import annotations

import argparse
import json

import torch

from rose_pl.config import LoRAArgs
from rose_pl.files import atomic_write_json
from rose_pl.training.model import add_lora

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Attention shapes from each model's published config.json (hidden, layers, heads, KV heads, head dim); the MLP
# and vocabulary do not matter for LoRA on attention projections and are kept small to build fast.
MODELS = {
    "smollm2-135m (embedded default)": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                            num_key_value_heads=3, head_dim=64),
    "bench preset tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=64),
    "bench preset 1b (= Llama-3.2-1B attention)": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                                       num_key_value_heads=8, head_dim=64),
    "bench preset 7b (= Llama-2-7B)": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                           num_key_value_heads=32, head_dim=128),
    "Llama-3.1-8B / Mistral-7B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=8, head_dim=128),
    "Llama-2-13B": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                        head_dim=128),
}
# (model, rank, target modules): the settings the README quotes.
CASES = [
    ("smollm2-135m (embedded default)", 8, ["q_proj", "v_proj"]),
    ("smollm2-135m (embedded default)", 128, QKVO),
    ("bench preset tiny", 16, QKVO),
    ("bench preset 1b (= Llama-3.2-1B attention)", 128, QKVO),
    ("bench preset 7b (= Llama-2-7B)", 128, QKVO),
    ("Llama-3.1-8B / Mistral-7B", 128, QKVO),
    ("Llama-2-13B", 128, QKVO),
]


def smollm2_from_cache() -> None:
    try:
        from rose_pl.hub import cache_dir

        cfg = json.loads((cache_dir() / "smollm2-135m-instruct" / "config.json").read_text())
    except (OSError, ValueError):
        return
    MODELS["smollm2-135m (embedded default)"] = {k: cfg[k] for k in ("hidden_size", "num_hidden_layers",
                                                                      "num_attention_heads", "num_key_value_heads",
                                                                      "head_dim")}


def count_with_peft(shape: dict, rank: int, modules: list[str]) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, intermediate_size=64, vocab_size=128, tie_word_embeddings=False)
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    model = add_lora(base, LoRAArgs(r=rank, alpha=4 * rank, dropout=0.0, target_modules=modules))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_closed_form(shape: dict, rank: int, modules: list[str]) -> int:
    h, d = shape["hidden_size"], shape["head_dim"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    fan = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    return shape["num_hidden_layers"] * sum(rank * sum(fan[m]) for m in modules)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="1,10,30,60", help="comma list of task counts to tabulate")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    tasks = [int(t) for t in args.tasks.split(",")]
    smollm2_from_cache()
    rows = []
    for name, rank, modules in CASES:
        params = count_with_peft(MODELS[name], rank, modules)
        closed = count_closed_form(MODELS[name], rank, modules)
        if params != closed:
            raise SystemExit(f"{name}: peft counts {params:,} LoRA parameters, the closed form {closed:,}")
        row = {"model": name, "shape": MODELS[name], "rank": rank, "target_modules": modules, "lora_params": params,
               "float32_bytes_per_task": 4 * params, "bfloat16_bytes_per_task": 2 * params,
               "float32_gb": {t: 4 * params * t / 1e9 for t in tasks},
               "bfloat16_gb": {t: 2 * params * t / 1e9 for t in tasks}}
        rows.append(row)
        print(f"{name:<45} r={rank:<3} {'+'.join(m.split('_')[0] for m in modules):<8} {params:>12,} params  "
              f"per task {4 * params / 1e6:8.1f} MB fp32 / {2 * params / 1e6:7.1f} MB bf16  "
              + "  ".join(f"{t} tasks {4 * params * t / 1e9:.2f}/{2 * params * t / 1e9:.2f} GB" for t in tasks))
    if args.out:
        print(f"wrote {atomic_write_json(args.out, {'benchmark': 'task_means_memory', 'units': 'GB = 1e9 bytes', 'rows': rows}, sort_keys=False)}")


if __name__ == "__main__":
    main()
