"""Greedy answers of the evaluated model to test prompts, for the LLM judge.

Two steps, so that the token ids a model sees are decided in one place:
- `encode_prompts` turns prompt texts into token ids (in the chat template the model was tuned with, or as
  raw text) and says which texts end an answer;
- `generate` runs batched greedy decoding on those ids with left padding and returns only the new text,
  cut at the first stop text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from rose_pl.errors import ConfigError

log = logging.getLogger(__name__)

PromptFormat = Literal["chat", "raw"]
PROMPT_FORMATS = ("chat", "raw")


@dataclass(frozen=True)
class EncodedPrompts:
    """Token ids of prompts, what ends their answers, and how many prompts lost tokens to fit."""

    ids: list[list[int]]
    stop_texts: list[str]
    """Texts that end an answer (the chat template's end-of-turn markers, the EOS token's text)."""
    num_truncated: int
    """Prompts longer than max_seq_length - max_new_tokens, of which only the last tokens were kept."""


def truncate_prompt(ids: Sequence[int], budget: int, bos_token_id: int | None = None) -> list[int]:
    """The last `budget` tokens of `ids`; a leading BOS stays in front (models degrade without their start token)."""
    ids = list(ids)
    if len(ids) <= budget:
        return ids
    if bos_token_id is not None and ids and ids[0] == bos_token_id and budget > 1:
        return ids[:1] + ids[len(ids) - (budget - 1):]
    return ids[len(ids) - budget:]


def encode_prompts(
    tokenizer,
    prompts: Sequence[str],
    *,
    prompt_format: PromptFormat = "chat",
    chat_template: str = "tulu",
    max_seq_length: int = 2048,
    max_new_tokens: int = 256,
) -> EncodedPrompts:
    """Token ids that generation continues from, one list per prompt.

    `prompt_format="chat"`: a single user turn in `chat_template` followed by the assistant header (as the
    model was fine-tuned); answers stop at the template's end-of-turn texts. `"raw"`: the prompt text as the
    tokenizer encodes it (special tokens included); answers stop at EOS only. A prompt longer than
    `max_seq_length - max_new_tokens` keeps its last tokens (the end holds the question and the assistant
    header), logged with the count.
    """
    problems = []
    if prompt_format not in PROMPT_FORMATS:
        problems.append(f"prompt_format: {prompt_format!r} is not one of {list(PROMPT_FORMATS)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        problems.append(f"max_new_tokens: {max_new_tokens!r} is not a positive integer")
    elif not isinstance(max_seq_length, int) or max_seq_length <= max_new_tokens:
        problems.append(f"max_seq_length ({max_seq_length}) must exceed max_new_tokens ({max_new_tokens}): "
                        "the prompt needs room before the answer")
    if problems:
        raise ConfigError(problems)

    if prompt_format == "chat":
        from rose_pl.data.encoding import Encoder

        encoder = Encoder(tokenizer, max_seq_length, chat_template, preference_format=None)
        ids = [encoder.encode_prompt([{"role": "user", "content": p}]) for p in prompts]
        stop_texts = list(encoder.template.stop_texts(tokenizer))
    else:
        ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
        stop_texts = [tokenizer.eos_token] if tokenizer.eos_token else []

    budget = max_seq_length - max_new_tokens
    num_truncated = sum(len(row) > budget for row in ids)
    if num_truncated:
        log.warning("%d of %d prompts are longer than %d tokens (max_seq_length %d - max_new_tokens %d): "
                    "they keep their last tokens", num_truncated, len(ids), budget, max_seq_length, max_new_tokens)
        ids = [truncate_prompt(row, budget, tokenizer.bos_token_id) for row in ids]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise ConfigError(f"prompts {empty[:10]} have no token to generate from")
    return EncodedPrompts(ids, [s for s in stop_texts if s], num_truncated)


def _eos_ids(model, tokenizer, eos_token_id) -> list[int]:
    if eos_token_id is None:
        # The model's generation config may list more end tokens than the tokenizer (Llama-3's <|eot_id|>).
        generation_config = getattr(model, "generation_config", None)
        eos_token_id = [tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)]
    if not isinstance(eos_token_id, (list, tuple)):
        eos_token_id = [eos_token_id]
    out: list[int] = []
    for e in eos_token_id:
        for x in e if isinstance(e, (list, tuple)) else [e]:
            if x is not None and int(x) not in out:
                out.append(int(x))
    return out


def cut_at_stop(text: str, stop_texts: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop text, surrounding whitespace stripped."""
    cut = min((i for i in (text.find(s) for s in stop_texts if s) if i >= 0), default=len(text))
    return text[:cut].strip()


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts_ids: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    stop_texts: Sequence[str] = (),
    eos_token_id: int | Sequence[int] | None = None,
    progress_desc: str = "generate",
) -> list[str]:
    """Greedy answers to already-tokenized prompts, in input order: only the new text, cut at the first stop text.

    Prompts are batched longest first (less padding) and left-padded, so every answer directly follows its
    prompt. A row ends at its first EOS (`eos_token_id`; default: the tokenizer's and the model's generation
    config's) or after `max_new_tokens`. The text is decoded with special tokens kept, so that a stop text
    that is a special token (ChatML's `<|im_end|>`) is still found, then cut and stripped. The model's
    training mode is restored; the tokenizer is only read.
    """
    from transformers import GenerationConfig

    from rose_pl.progress import Progress

    problems = []
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name}: {value!r} is not a positive integer")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        problems.append("the tokenizer has neither a pad nor an EOS token; batched generation needs one to pad")
    empty = [i for i, row in enumerate(prompts_ids) if len(row) == 0]
    if empty:
        problems.append(f"prompts {empty[:10]} have no token to generate from")
    if problems:
        raise ConfigError(problems)
    eos_ids = _eos_ids(model, tokenizer, eos_token_id)
    # A fresh config: greedy whatever sampling settings the checkpoint ships with.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=int(pad_id),
                              eos_token_id=eos_ids or None)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    order = sorted(range(len(prompts_ids)), key=lambda i: -len(prompts_ids[i]))
    answers: list[str | None] = [None] * len(prompts_ids)
    was_training = model.training
    model.eval()
    progress = Progress(len(prompts_ids), progress_desc, unit="prompts")
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(prompts_ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                n = len(prompts_ids[i])
                input_ids[r, width - n:] = torch.as_tensor(list(prompts_ids[i]), dtype=torch.long)
                attention_mask[r, width - n:] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=config)
            for r, i in enumerate(rows):
                new = out[r, width:].tolist()
                end = next((k for k, t in enumerate(new) if t in eos_ids), len(new))  # pads follow the EOS
                text = tokenizer.decode(new[:end], skip_special_tokens=False)
                answers[i] = cut_at_stop(text, stop_texts)
            progress.update(len(rows))
    finally:
        progress.close()
        model.train(was_training)
    return answers  # type: ignore[return-value]  # every slot filled above
