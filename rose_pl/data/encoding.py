"""Token ids and labels for instruction rows and preference pairs, with truncation that keeps the loss.

Instruction rows (the pool, SFT views) go through a chat template (`templates.py`). When a row is longer
than `max_seq_length`, the prompt side is cut first: tokens of the messages before the first assistant turn
(their contents; headers stay), from their end (`prompt_truncation="keep_start"`) or their start
("keep_end"). Only when no prompt is left is the rest right-truncated. A row with no loss token left raises
`EmptyLossError`, which the DataModules drop and report, or raise, as asked.

Preference pairs have two formats (`preference_format`):
- `rose` (default; the ROSE authors' DPO tokenization, `rose/dpo_gradient.py`): the raw prompt text (no chat
  template, no BOS) then EOS; the raw response (leading space kept) then EOS; labels on the response
  tokens only. If prompt + longer response exceeds `max_seq_length`, the prompt is cut to
  `max_prompt_length` tokens (keeping its start, or its end with "keep_end"); if still too long, both
  responses are cut to `max_seq_length - max_prompt_length` tokens.
- `chat`: each side as [user prompt, assistant response] through the chat template, the prompt cut by the
  same number of tokens on both sides (enough for the longer side), then right-truncated.
"""

from __future__ import annotations

from typing import Literal, Sequence

from rose_pl.config import positive_int
from rose_pl.data.formats import PreferenceExample
from rose_pl.data.templates import EOS, ChatTemplate, Piece, get_template
from rose_pl.errors import ConfigError, RoseError

IGNORE_INDEX = -100
"""Label of positions outside the loss (the value torch's cross-entropy ignores)."""

PromptTruncation = Literal["keep_start", "keep_end"]
PreferenceFormat = Literal["rose", "chat"]
PREFERENCE_FORMATS = ("rose", "chat")
PROMPT_TRUNCATIONS = ("keep_start", "keep_end")


class EmptyLossError(RoseError, ValueError):
    """No loss token is left after truncation; the caller names the file and row."""


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front when asked for special tokens (Llama does, SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


def check_settings(max_seq_length, prompt_truncation, preference_format, max_prompt_length) -> list[str]:
    """Problems with encoding settings (empty if none), phrased by argument name; `preference_format` None
    means the settings encode no preference pairs."""
    problems = positive_int("max_seq_length", max_seq_length)
    if prompt_truncation not in PROMPT_TRUNCATIONS:
        problems.append(f"prompt_truncation: {prompt_truncation!r} is not one of {list(PROMPT_TRUNCATIONS)}")
    if preference_format is not None and preference_format not in PREFERENCE_FORMATS:
        problems.append(f"preference_format: {preference_format!r} is not one of {list(PREFERENCE_FORMATS)}")
    bad_prompt_length = positive_int("max_prompt_length", max_prompt_length)
    problems += bad_prompt_length
    if not bad_prompt_length and preference_format == "rose" and isinstance(max_seq_length, int) \
            and max_prompt_length >= max_seq_length:
        problems.append(f"max_prompt_length ({max_prompt_length}) must be below max_seq_length ({max_seq_length}), "
                        "or no response token would fit")
    return problems


class Encoder:
    """Tokenizes rows and pairs for one tokenizer and one set of settings (header ids computed once)."""

    def __init__(
        self,
        tokenizer,
        max_seq_length: int,
        chat_template: str | ChatTemplate = "tulu",
        prompt_truncation: PromptTruncation = "keep_start",
        preference_format: PreferenceFormat | None = "rose",
        max_prompt_length: int = 256,
    ):
        """`preference_format=None`: an encoder of instruction rows only (`encode_preference` refuses)."""
        problems = check_settings(max_seq_length, prompt_truncation, preference_format, max_prompt_length)
        if tokenizer.eos_token_id is None:
            problems.append("the tokenizer has no EOS token: assistant turns and preference responses end with it")
        if problems:
            raise ConfigError(problems)
        self.tokenizer = tokenizer
        self.template = get_template(chat_template)
        self.max_seq_length = max_seq_length
        self.prompt_truncation = prompt_truncation
        self.preference_format = preference_format
        self.max_prompt_length = max_prompt_length
        self.eos_id = int(tokenizer.eos_token_id)
        self.bos = [int(tokenizer.bos_token_id)] if self.template.adds_bos() and _adds_bos(tokenizer) else []
        self._cache: dict[str, list[int]] = {}

    # ---- pieces -> ids ------------------------------------------------------------------------------
    def _ids_of(self, texts) -> dict[str, list[int]]:
        """Token ids of every distinct text, in one batched tokenizer call (headers and footers cached)."""
        wanted = {t for t in texts if t and t != EOS and t not in self._cache}
        found = {EOS: [self.eos_id], "": [], **self._cache}
        if wanted:
            order = sorted(wanted)
            for text, ids in zip(order, self.tokenizer(order, add_special_tokens=False)["input_ids"]):
                found[text] = list(ids)
                if len(text) < 64:  # headers and footers repeat in every row; contents do not
                    self._cache[text] = found[text]
        return found

    def _ids(self, text: str) -> list[int]:
        return self._ids_of([text])[text]

    def _tokenized(self, pieces: Sequence[Piece], ids_of: dict[str, list[int]]) -> list[tuple[list[int], Piece]]:
        return [(list(ids_of[p.text]), p) for p in pieces if p.text]

    def _cut_prompt(self, parts: list[tuple[list[int], Piece]], n: int) -> None:
        """Remove up to `n` tokens from the prompt contents, in place (from their end with keep_start)."""
        order = [i for i, (_, p) in enumerate(parts) if p.prompt]
        if self.prompt_truncation == "keep_start":
            order.reverse()
        for i in order:
            if n <= 0:
                break
            ids, piece = parts[i]
            k = min(n, len(ids))
            parts[i] = (ids[: len(ids) - k] if self.prompt_truncation == "keep_start" else ids[k:], piece)
            n -= k

    def _join(self, parts: list[tuple[list[int], Piece]], what: str) -> dict[str, list[int]]:
        input_ids, labels = list(self.bos), [IGNORE_INDEX] * len(self.bos)
        for ids, piece in parts:
            input_ids += ids
            labels += ids if piece.in_loss else [IGNORE_INDEX] * len(ids)
        full = len(input_ids)
        input_ids, labels = input_ids[: self.max_seq_length], labels[: self.max_seq_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise EmptyLossError(f"{what}no loss token left within max_seq_length={self.max_seq_length} "
                                 f"({full} tokens after cutting the prompt)")
        return {"input_ids": input_ids, "labels": labels}

    def _length(self, parts) -> int:
        return len(self.bos) + sum(len(ids) for ids, _ in parts)

    # ---- public --------------------------------------------------------------------------------------
    def encode_messages(self, messages: Sequence[dict[str, str]]) -> dict[str, list[int]]:
        """`input_ids` and `labels` (-100 off the loss) of one conversation, prompt cut first."""
        encoded, _ = self.encode_messages_batch([messages])[0]
        if isinstance(encoded, EmptyLossError):
            raise encoded
        return encoded

    def encode_messages_batch(self, batch: Sequence[Sequence[dict[str, str]]]) -> list[tuple[dict | EmptyLossError, int]]:
        """Each conversation's encoding (or its EmptyLossError) and how many of its tokens truncation removed; the
        texts of the whole batch go through the tokenizer in one call, with results equal to one call each."""
        pieces = [self.template.pieces(m, self.tokenizer) for m in batch]
        ids_of = self._ids_of(p.text for row in pieces for p in row)
        out = []
        for row in pieces:
            parts = self._tokenized(row, ids_of)
            total = self._length(parts)
            self._cut_prompt(parts, total - self.max_seq_length)
            try:
                encoded = self._join(parts, "")
                out.append((encoded, total - len(encoded["input_ids"])))
            except EmptyLossError as e:
                out.append((e, total))
        return out

    def encode_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids a generation continues from: the conversation and a new assistant header."""
        pieces = self.template.prompt_pieces(messages, self.tokenizer)
        parts = self._tokenized(pieces, self._ids_of(p.text for p in pieces))
        return list(self.bos) + [t for ids, _ in parts for t in ids]

    def encode_preference(self, example: PreferenceExample) -> dict[str, list[int]]:
        """chosen_/rejected_ input_ids and labels of one pair, in `preference_format`."""
        encoded, _ = self.encode_preference_batch([example])[0]
        if isinstance(encoded, EmptyLossError):
            raise encoded
        return encoded

    def encode_preference_batch(self, batch: Sequence[PreferenceExample]) -> list[tuple[dict | EmptyLossError, int]]:
        """Each pair's encoding (or its EmptyLossError) and how many tokens truncation removed from its two sides."""
        if self.preference_format is None:
            raise ConfigError("this encoder was built for instruction rows only (preference_format=None)")
        if self.preference_format == "rose":
            ids_of = self._ids_of(t for e in batch for t in (e.prompt, e.chosen, e.rejected))
            return [self._rose_pair(ids_of[e.prompt], ids_of[e.chosen], ids_of[e.rejected]) for e in batch]
        sides_of = []
        for example in batch:
            sides_of.append({side: self.template.pieces([{"role": "user", "content": example.prompt},
                                                         {"role": "assistant", "content": response}], self.tokenizer)
                             for side, response in (("chosen", example.chosen), ("rejected", example.rejected))})
        ids_of = self._ids_of(p.text for sides in sides_of for pieces in sides.values() for p in pieces)
        out = []
        for sides in sides_of:
            parts_of = {side: self._tokenized(pieces, ids_of) for side, pieces in sides.items()}
            total = sum(self._length(parts) for parts in parts_of.values())
            excess = max(self._length(parts) for parts in parts_of.values()) - self.max_seq_length
            encoded = {}
            try:
                for side, parts in parts_of.items():
                    self._cut_prompt(parts, excess)  # the same prompt in front of both responses
                    joined = self._join(parts, f"{side} side: ")
                    encoded[f"{side}_input_ids"], encoded[f"{side}_labels"] = joined["input_ids"], joined["labels"]
            except EmptyLossError as e:
                out.append((e, total))
                continue
            out.append((encoded, total - len(encoded["chosen_input_ids"]) - len(encoded["rejected_input_ids"])))
        return out

    def _with_eos(self, ids: list[int]) -> list[int]:
        return list(ids) if self.eos_id in ids else list(ids) + [self.eos_id]  # as the authors' code: EOS unless present

    def _rose_pair(self, prompt: list[int], chosen: list[int], rejected: list[int]) -> tuple[dict, int]:
        p, c, r = self._with_eos(prompt), self._with_eos(chosen), self._with_eos(rejected)
        total = 2 * len(p) + len(c) + len(r)
        longer = max(len(c), len(r))
        if len(p) + longer > self.max_seq_length:
            k = self.max_prompt_length
            p = p[:k] if self.prompt_truncation == "keep_start" else p[-k:]
        if len(p) + longer > self.max_seq_length:
            keep = self.max_seq_length - self.max_prompt_length
            c, r = c[:keep], r[:keep]
        encoded = {"chosen_input_ids": p + c, "chosen_labels": [IGNORE_INDEX] * len(p) + c,
                   "rejected_input_ids": p + r, "rejected_labels": [IGNORE_INDEX] * len(p) + r}
        return encoded, total - len(encoded["chosen_input_ids"]) - len(encoded["rejected_input_ids"])

    def text(self, messages: Sequence[dict[str, str]]) -> str:
        """The conversation as text in this encoder's template."""
        return self.template.text(messages, self.tokenizer)
