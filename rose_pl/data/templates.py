"""Chat templates: how a conversation becomes text pieces, and which pieces carry the loss.

A template turns messages into an ordered list of `Piece`s (a text, or the tokenizer's EOS token) each
flagged in or out of the loss. The encoder tokenizes the pieces one by one, so the label mask is exact
whatever the tokenizer merges. Contents are stripped of surrounding whitespace, as LESS does.

Built in (`CHAT_TEMPLATES`):
- `tulu` (default, LESS/ROSE): `<|role|>\\n{content}\\n`; an assistant turn is `<|assistant|>\\n{content}{EOS}\\n`,
  with the content, the EOS and the newline after it in the loss (LESS labels that newline too).
- `chatml`: `<|im_start|>role\\n{content}<|im_end|>\\n`; the assistant content, `<|im_end|>` and the newline in
  the loss.
- `tokenizer`: the tokenizer's own `apply_chat_template` (Llama-3, Qwen, SmolLM2...), rendered one message
  at a time; each assistant turn's text after its generation header is in the loss.

Add one by subclassing `ChatTemplate` (or instantiating `MarkupTemplate`) and registering it in
`rose_pl.registry.CHAT_TEMPLATES`, or name it in YAML by import path (`chat_template: my_package.templates.MINE`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

from rose_pl.errors import ConfigError
from rose_pl.registry import CHAT_TEMPLATES

EOS = "<EOS>"
"""Marker piece replaced by the tokenizer's EOS token id (never tokenized as text)."""


@dataclass(frozen=True)
class Piece:
    """A text (or `EOS`) and whether its tokens are in the loss."""

    text: str
    in_loss: bool
    prompt: bool = False
    """Content of a message before the first assistant turn: what prompt-side truncation may cut."""


def _first_assistant(messages: Sequence[dict]) -> int:
    return next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))


class ChatTemplate(ABC):
    """Renders conversations into `Piece`s; the extension point for chat formats. Subclasses set `name`."""

    @abstractmethod
    def pieces(self, messages: Sequence[dict[str, str]], tokenizer) -> list[Piece]:
        """The conversation, in order; assistant content (and its end marker) in the loss."""

    @abstractmethod
    def prompt_pieces(self, messages: Sequence[dict[str, str]], tokenizer) -> list[Piece]:
        """The conversation followed by the header of a new assistant turn (what generation continues)."""

    def adds_bos(self) -> bool:
        """Whether the encoder puts the tokenizer's BOS in front (when the tokenizer itself would)."""
        return True

    def stop_texts(self, tokenizer) -> list[str]:
        """Texts that end an assistant turn (generation is cut at the first one)."""
        return [tokenizer.eos_token] if tokenizer.eos_token else []

    def text(self, messages: Sequence[dict[str, str]], tokenizer) -> str:
        """The conversation as one string (display, BM25); token ids come from the encoder, not this text."""
        return "".join(tokenizer.eos_token if p.text == EOS else p.text for p in self.pieces(messages, tokenizer))


@dataclass(frozen=True)
class MarkupTemplate(ChatTemplate):
    """A template of fixed role headers and footers (Tulu, ChatML)."""

    name: str
    header: str
    """Text before each message's content; `{role}` is filled in."""
    footer: tuple[str, ...]
    """Pieces after a non-assistant message's content (out of the loss)."""
    assistant_footer: tuple[str, ...]
    """Pieces after an assistant message's content (in the loss); `EOS` is the tokenizer's EOS token."""

    def pieces(self, messages, tokenizer) -> list[Piece]:
        first = _first_assistant(messages)
        out: list[Piece] = []
        for i, m in enumerate(messages):
            assistant = m["role"] == "assistant"
            out.append(Piece(self.header.format(role=m["role"]), False))
            out.append(Piece(m["content"].strip(), assistant, prompt=i < first))
            out += [Piece(p, assistant) for p in (self.assistant_footer if assistant else self.footer)]
        return out

    def prompt_pieces(self, messages, tokenizer) -> list[Piece]:
        return self.pieces(messages, tokenizer) + [Piece(self.header.format(role="assistant"), False)]

    def stop_texts(self, tokenizer) -> list[str]:
        ends = [p for p in self.assistant_footer if p != EOS and p.strip()]
        stops = [tokenizer.eos_token] if EOS in self.assistant_footer and tokenizer.eos_token else []
        # A new turn's header also ends the answer (a model that skips the end marker).
        return stops + [e.strip() for e in ends] + [self.header.split("{role}")[0]]


class TokenizerTemplate(ChatTemplate):
    """The tokenizer's own chat template, rendered incrementally to find each message's text.

    Message i's text is render(messages[:i+1]) minus render(messages[:i]); an assistant turn is split at
    the end of render(messages[:i], add_generation_prompt=True): the header before, the loss after. This
    needs every rendering to be a prefix of the next, which holds for common templates; others are refused.
    """

    name = "tokenizer"

    def _render(self, tokenizer, messages, generation: bool = False) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("chat_template 'tokenizer': this tokenizer has no chat template of its own; "
                              "use 'tulu' or 'chatml'")
        if not messages and not generation:
            return ""
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation)

    def _split(self, messages, tokenizer, generation: bool) -> list[Piece]:
        messages = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
        first = _first_assistant(messages)
        out: list[Piece] = []
        done = ""
        for i, m in enumerate(messages):
            full = self._render(tokenizer, messages[: i + 1])
            if m["role"] == "assistant":
                header = self._render(tokenizer, messages[:i], generation=True)
                self._check_prefix(done, header, i)
                self._check_prefix(header, full, i)
                out += [Piece(header[len(done):], False), Piece(full[len(header):], True)]
            else:
                self._check_prefix(done, full, i)
                out.append(Piece(full[len(done):], False, prompt=i < first))
            done = full
        if generation:
            header = self._render(tokenizer, messages, generation=True)
            self._check_prefix(done, header, len(messages))
            out.append(Piece(header[len(done):], False))
        return out

    @staticmethod
    def _check_prefix(shorter: str, longer: str, i: int) -> None:
        if not longer.startswith(shorter):
            raise ConfigError(f"chat_template 'tokenizer': rendering message {i} changes the text before it, so "
                              "the loss mask cannot be found message by message; use 'tulu' or 'chatml'")

    def pieces(self, messages, tokenizer) -> list[Piece]:
        return self._split(messages, tokenizer, generation=False)

    def prompt_pieces(self, messages, tokenizer) -> list[Piece]:
        return self._split(messages, tokenizer, generation=True)

    def adds_bos(self) -> bool:
        return False  # the template writes BOS itself where the model wants one


TULU = MarkupTemplate("tulu", header="<|{role}|>\n", footer=("\n",), assistant_footer=(EOS, "\n"))
CHATML = MarkupTemplate("chatml", header="<|im_start|>{role}\n", footer=("<|im_end|>\n",),
                        assistant_footer=("<|im_end|>\n",))

for _template in (TULU, CHATML, TokenizerTemplate()):
    CHAT_TEMPLATES.register(_template.name, _template)


def get_template(template: str | ChatTemplate) -> ChatTemplate:
    """A template by name (registered in `rose_pl.registry.CHAT_TEMPLATES`, or an import path), or the one given."""
    found = template if isinstance(template, ChatTemplate) else CHAT_TEMPLATES.get(template)
    if not isinstance(found, ChatTemplate):
        raise ConfigError(f"chat_template {template!r} is a {type(found).__name__}, not a ChatTemplate")
    return found
