"""The Tulu chat format of LESS/ROSE, tokenized with assistant-only labels.

Each message becomes `<|role|>\\n{content}\\n`; an assistant message is `<|assistant|>\\n{content}{EOS}\\n`.
The loss covers the assistant content and the EOS after it, nothing else: not the `<|assistant|>\\n` header,
not the newline after EOS. Token ids are built segment by segment (headers, contents and newlines tokenized
separately, EOS appended as an id) so the label mask is exact whatever the tokenizer merges.
Contents are stripped of surrounding whitespace, as LESS does (ROSE's responses start with a space).
"""

from __future__ import annotations

from typing import Sequence

from rose_pl.data.formats import PreferenceExample
from rose_pl.errors import ConfigError, RoseError

IGNORE_INDEX = -100
"""Label of positions outside the loss (the value torch's cross-entropy ignores)."""

HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
NEWLINE = "\n"


class EmptyLossError(RoseError, ValueError):
    """No loss token is left (the assistant part was truncated away); the caller names the file and row."""


def format_tulu(messages: Sequence[dict[str, str]], eos_token: str) -> str:
    """The chat as one string (display, BM25); token ids come from `ChatEncoder`, not from this text."""
    parts = []
    for m in messages:
        eos = eos_token if m["role"] == "assistant" else ""
        parts.append(f"{HEADERS[m['role']]}{m['content'].strip()}{eos}{NEWLINE}")
    return "".join(parts)


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front when asked for special tokens (Llama does, SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


class ChatEncoder:
    """Tokenizes chats for one tokenizer and length; header ids and the BOS rule are computed once."""

    def __init__(self, tokenizer, max_seq_length: int):
        if not isinstance(max_seq_length, int) or max_seq_length < 1:
            raise ConfigError(f"max_seq_length: {max_seq_length!r} is not a positive integer")
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token: the Tulu format ends each assistant turn with EOS")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.eos_id = int(tokenizer.eos_token_id)
        self.prefix = [int(tokenizer.bos_token_id)] if _adds_bos(tokenizer) else []
        pieces = list(HEADERS.values()) + [NEWLINE]
        ids = tokenizer(pieces, add_special_tokens=False)["input_ids"]
        self.header_ids = {role: list(i) for role, i in zip(HEADERS, ids)}
        self.newline_ids = list(ids[-1])

    def encode_messages(self, messages: Sequence[dict[str, str]]) -> dict[str, list[int]]:
        """`input_ids` and `labels` (-100 off the loss), right-truncated to `max_seq_length`."""
        contents = self.tokenizer([m["content"].strip() for m in messages], add_special_tokens=False)["input_ids"]
        input_ids = list(self.prefix)
        labels = [IGNORE_INDEX] * len(input_ids)

        def add(ids: Sequence[int], in_loss: bool) -> None:
            input_ids.extend(ids)
            labels.extend(ids if in_loss else [IGNORE_INDEX] * len(ids))

        for message, content_ids in zip(messages, contents):
            assistant = message["role"] == "assistant"
            add(self.header_ids[message["role"]], False)
            add(content_ids, assistant)
            if assistant:
                add([self.eos_id], True)
            add(self.newline_ids, False)
        input_ids = input_ids[: self.max_seq_length]
        labels = labels[: self.max_seq_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise EmptyLossError(
                f"no assistant token left within max_seq_length={self.max_seq_length} "
                f"(the chat has {len(self.prefix) + sum(len(c) for c in contents)}+ tokens)"
            )
        return {"input_ids": input_ids, "labels": labels}

    def encode_preference(self, example: PreferenceExample) -> dict[str, list[int]]:
        """Both sides as [user prompt, assistant response]: chosen_/rejected_ input_ids and labels."""
        out = {}
        for side, response in (("chosen", example.chosen), ("rejected", example.rejected)):
            messages = [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": response}]
            try:
                encoded = self.encode_messages(messages)
            except EmptyLossError as e:
                raise EmptyLossError(f"{side} side: {e}") from None
            out[f"{side}_input_ids"] = encoded["input_ids"]
            out[f"{side}_labels"] = encoded["labels"]
        return out


def encode_messages(messages: Sequence[dict[str, str]], tokenizer, max_seq_length: int) -> dict[str, list[int]]:
    """Tokenize one chat; see `ChatEncoder.encode_messages` (build a `ChatEncoder` to encode many)."""
    return ChatEncoder(tokenizer, max_seq_length).encode_messages(messages)


def encode_preference(example: PreferenceExample, tokenizer, max_seq_length: int) -> dict[str, list[int]]:
    """Tokenize one preference pair; see `ChatEncoder.encode_preference`."""
    return ChatEncoder(tokenizer, max_seq_length).encode_preference(example)
