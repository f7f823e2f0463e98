"""Tiny models and tokenizers built in code, for tests, benchmarks and offline experiments.

Nothing here downloads anything: the tokenizer is a byte-level BPE without merges
(one token per byte) and the models are randomly initialized Llama configurations.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def byte_tokenizer():
    """A 260-token byte-level tokenizer (4 specials + 256 bytes) with no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def tiny_llama_config(vocab_size: int = 260, **overrides):
    """A 2-layer Llama config small enough to run hundreds of backward passes per second on a CPU."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, attn_implementation: str = "eager", **overrides):
    """A randomly initialized tiny LlamaForCausalLM in float32."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(**overrides)
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).float().eval()


def save_tiny_model(directory: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny model and its tokenizer as a Hugging Face folder usable as `model_name_or_path`."""
    directory = Path(directory)
    model = tiny_llama(seed=seed, **overrides)
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def token_rows(lengths, prompt_lengths, seed: int = 0, vocab_size: int = 260, pad_id: int = 3):
    """Right-padded random rows: (input_ids, attention_mask, labels) with the first `prompt_lengths[i]`
    tokens of row i outside the loss (-100), for batches with padding and unequal lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), pad_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (length, prompt) in enumerate(zip(lengths, prompt_lengths)):
        ids[i, :length] = torch.randint(4, vocab_size, (length,), generator=gen)
        mask[i, :length] = 1
        labels[i, prompt:length] = ids[i, prompt:length]
    return ids, mask, labels


def random_sft_batch(lengths, prompt_lengths, seed: int = 0) -> dict:
    """An SFT batch (docs/architecture.md) of random rows built by `token_rows`."""
    ids, mask, labels = token_rows(lengths, prompt_lengths, seed)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(len(lengths))}
