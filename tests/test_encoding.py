"""Token ids and labels: chat templates, prompt-first truncation, the ROSE authors' pair format, collators."""

import pytest
import torch

from rose_pl.data.collate import PreferenceCollator, SFTCollator
from rose_pl.data.encoding import IGNORE_INDEX, EmptyLossError, Encoder
from rose_pl.data.formats import PreferenceExample
from rose_pl.data.templates import MarkupTemplate
from rose_pl.registry import CHAT_TEMPLATES
from rose_pl.errors import ConfigError

MULTI_TURN = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": " Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4, héllo"},
]
SINGLE = [{"role": "user", "content": "Question " + "q" * 40}, {"role": "assistant", "content": " Answer."}]


def loss_text(tokenizer, encoded, side="") -> str:
    ids, labels = encoded[f"{side}input_ids"], encoded[f"{side}labels"]
    return tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])


def text(tokenizer, encoded, side="") -> str:
    return tokenizer.decode(encoded[f"{side}input_ids"])


def sft(tokenizer, max_len=4096, **kw):
    return Encoder(tokenizer, max_len, preference_format=None, **kw)


def test_tulu_text_matches_the_less_template(tokenizer):
    encoded = sft(tokenizer).encode_messages(MULTI_TURN)
    assert text(tokenizer, encoded) == ("<|system|>\nBe kind.\n<|user|>\nHi there\n<|assistant|>\nHello!</s>\n"
                                        "<|user|>\n2+2?\n<|assistant|>\n4, héllo</s>\n")
    assert sft(tokenizer).text(MULTI_TURN) == text(tokenizer, encoded)


def test_loss_covers_assistant_content_eos_and_the_newline_after_it_as_less_does(tokenizer):
    encoded = sft(tokenizer).encode_messages(SINGLE)
    assert loss_text(tokenizer, encoded) == "Answer.</s>\n"  # stripped, as LESS does
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(encoded["input_ids"], encoded["labels"]))
    assert encoded["labels"][-2:] == [tokenizer.eos_token_id, tokenizer("\n", add_special_tokens=False)["input_ids"][0]]


def test_loss_covers_every_assistant_turn_of_a_multi_turn_chat(tokenizer):
    encoded = sft(tokenizer).encode_messages(MULTI_TURN)
    assert loss_text(tokenizer, encoded) == "Hello!</s>\n4, héllo</s>\n"
    mask = [l != IGNORE_INDEX for l in encoded["labels"]]
    assert sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])) == 2  # one run per turn


def test_a_long_prompt_is_cut_before_the_response_loses_a_token(tokenizer):
    full = sft(tokenizer).encode_messages(SINGLE)
    limit = len(full["input_ids"]) - 30
    start = sft(tokenizer, limit).encode_messages(SINGLE)
    end = sft(tokenizer, limit, prompt_truncation="keep_end").encode_messages(SINGLE)
    for cut in (start, end):
        assert len(cut["input_ids"]) == limit
        assert loss_text(tokenizer, cut) == "Answer.</s>\n"  # the whole response survives
    assert text(tokenizer, start).startswith("<|user|>\nQuestion " + "q" * 10 + "\n<|assistant|>\n")
    assert text(tokenizer, end).startswith("<|user|>\n" + "q" * 19 + "\n<|assistant|>\n")


def test_when_no_prompt_is_left_the_response_is_right_truncated(tokenizer):
    messages = [{"role": "user", "content": "x" * 20}, {"role": "assistant", "content": "y" * 30}]
    headers = len("<|user|>\n\n<|assistant|>\n")
    encoded = sft(tokenizer, headers + 5).encode_messages(messages)
    assert loss_text(tokenizer, encoded) == "yyyyy"
    with pytest.raises(EmptyLossError, match="max_seq_length=20"):
        sft(tokenizer, 20).encode_messages(messages)


def test_only_the_prompt_before_the_first_answer_is_cut_in_multi_turn_chats(tokenizer):
    full = sft(tokenizer).encode_messages(MULTI_TURN)
    cut = sft(tokenizer, len(full["input_ids"]) - 8).encode_messages(MULTI_TURN)
    # keep_start cuts from the end of the prompt: the user turn goes first, then the system turn.
    assert text(tokenizer, cut).startswith("<|system|>\nBe kind.\n<|user|>\n\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?")
    assert loss_text(tokenizer, cut) == loss_text(tokenizer, full)


def test_bos_is_prepended_only_when_the_tokenizer_adds_one(tokenizer):
    class BosTokenizer:
        """Wraps the byte tokenizer and adds BOS when asked for special tokens, like Llama."""

        bos_token_id, eos_token_id, eos_token = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token

        def __call__(self, text, add_special_tokens=True):
            out = tokenizer(text, add_special_tokens=False)
            if add_special_tokens:
                out["input_ids"] = [self.bos_token_id] + out["input_ids"]
            return out

    plain = sft(tokenizer).encode_messages(MULTI_TURN)
    with_bos = sft(BosTokenizer()).encode_messages(MULTI_TURN)
    assert plain["input_ids"][0] != tokenizer.bos_token_id
    assert with_bos["input_ids"] == [tokenizer.bos_token_id] + plain["input_ids"]
    assert with_bos["labels"] == [IGNORE_INDEX] + plain["labels"]
    # The paper's pair format never has BOS.
    pair = Encoder(BosTokenizer(), 4096).encode_preference(PreferenceExample("p", "t", "Q", " a", " b"))
    assert pair["chosen_input_ids"][0] != tokenizer.bos_token_id


def test_chatml_template_puts_the_end_marker_and_newline_in_the_loss(tokenizer):
    encoded = sft(tokenizer, chat_template="chatml").encode_messages(MULTI_TURN[1:3])
    assert text(tokenizer, encoded) == ("<|im_start|>user\nHi there<|im_end|>\n"
                                        "<|im_start|>assistant\nHello!<|im_end|>\n")
    assert loss_text(tokenizer, encoded) == "Hello!<|im_end|>\n"


JINJA = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% if m['role'] == 'assistant' %}"
         "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def test_the_tokenizers_own_template_masks_each_answer_after_its_generation_header(tokenizer):
    from rose_pl.testing import byte_tokenizer

    own = byte_tokenizer()
    own.chat_template = JINJA
    encoded = sft(own, chat_template="tokenizer").encode_messages(MULTI_TURN)
    assert text(own, encoded) == "[system]Be kind.\n[user]Hi there\n[assistant]Hello!</s>\n[user]2+2?\n[assistant]4, héllo</s>\n"
    assert loss_text(own, encoded) == "Hello!</s>\n4, héllo</s>\n"
    prompt = sft(own, chat_template="tokenizer").encode_prompt(MULTI_TURN[:2])
    assert own.decode(prompt) == "[system]Be kind.\n[user]Hi there\n[assistant]"
    with pytest.raises(ConfigError, match="no chat template"):
        sft(tokenizer, chat_template="tokenizer").encode_messages(MULTI_TURN)


def test_a_template_can_be_registered_or_named_by_import_path(tokenizer):
    mine = MarkupTemplate("bracket", header="[{role}] ", footer=(" ",), assistant_footer=("</s>",))
    CHAT_TEMPLATES.register("bracket", mine, replace=True)
    encoded = sft(tokenizer, chat_template="bracket").encode_messages(SINGLE)
    assert loss_text(tokenizer, encoded) == "Answer.</s>"
    by_path = sft(tokenizer, chat_template="rose_pl.data.templates.CHATML").encode_messages(SINGLE)
    assert by_path == sft(tokenizer, chat_template="chatml").encode_messages(SINGLE)
    with pytest.raises(ConfigError, match="unknown chat template 'nope'.*tulu"):
        sft(tokenizer, chat_template="nope")


def test_generation_prompt_ends_with_the_assistant_header(tokenizer):
    assert tokenizer.decode(sft(tokenizer).encode_prompt(SINGLE[:1])) == f"<|user|>\n{SINGLE[0]['content']}\n<|assistant|>\n"


def rose_reference(tokenizer, prompt, chosen, rejected, max_length, max_prompt_length, keep="keep_start"):
    """The pair format as described in issue 8, written independently of the package."""
    eos = tokenizer.eos_token_id
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"] + [eos]
    c = tokenizer(chosen, add_special_tokens=False)["input_ids"] + [eos]
    r = tokenizer(rejected, add_special_tokens=False)["input_ids"] + [eos]
    if len(p) + max(len(c), len(r)) > max_length:
        p = p[:max_prompt_length] if keep == "keep_start" else p[len(p) - max_prompt_length:]
    if len(p) + max(len(c), len(r)) > max_length:
        c, r = c[: max_length - max_prompt_length], r[: max_length - max_prompt_length]
    return {"chosen_input_ids": p + c, "chosen_labels": [-100] * len(p) + c,
            "rejected_input_ids": p + r, "rejected_labels": [-100] * len(p) + r}


@pytest.mark.parametrize("max_length,max_prompt,keep", [(4096, 256, "keep_start"), (40, 12, "keep_start"),
                                                         (40, 12, "keep_end"), (24, 16, "keep_start")])
def test_rose_pair_format_equals_the_described_reference(tokenizer, max_length, max_prompt, keep):
    example = PreferenceExample("p", "t", "\n\nHuman: Why is the sky blue?\n\nAssistant:", " Rayleigh scattering.",
                                " Because it is.")
    encoder = Encoder(tokenizer, max_length, prompt_truncation=keep, max_prompt_length=max_prompt)
    assert encoder.encode_preference(example) == rose_reference(tokenizer, example.prompt, example.chosen,
                                                                example.rejected, max_length, max_prompt, keep)


def test_chat_pair_format_cuts_the_same_prompt_in_front_of_both_responses(tokenizer):
    example = PreferenceExample("p", "t", "Prompt " + "p" * 40, " yes", " a much longer rejected response")
    full = Encoder(tokenizer, 4096, preference_format="chat").encode_preference(example)
    limit = len(full["rejected_input_ids"]) - 20
    cut = Encoder(tokenizer, limit, preference_format="chat").encode_preference(example)
    header = len("<|user|>\nPrompt " + "p" * 20 + "\n<|assistant|>\n")
    assert cut["chosen_input_ids"][:header] == cut["rejected_input_ids"][:header]
    assert len(cut["rejected_input_ids"]) == limit
    assert loss_text(tokenizer, cut, "chosen_") == "yes</s>\n"
    assert loss_text(tokenizer, cut, "rejected_") == "a much longer rejected response</s>\n"


def test_invalid_settings_are_reported_together(tokenizer):
    with pytest.raises(ConfigError) as e:
        Encoder(tokenizer, 100, prompt_truncation="middle", preference_format="dpo", max_prompt_length=0)
    assert len(e.value.problems) == 3
    with pytest.raises(ConfigError, match="max_prompt_length .256. must be below max_seq_length .200."):
        Encoder(tokenizer, 200)
    sft(tokenizer, 200)  # no pairs: max_prompt_length does not matter


def test_sft_collator_pads_right_with_masked_labels(tokenizer):
    encoder = sft(tokenizer)
    features = [dict(encoder.encode_messages(MULTI_TURN[1:3]), index=7),
                dict(encoder.encode_messages(MULTI_TURN), index=2)]
    batch = SFTCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    n0, n1 = (len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape[1] == -(-n1 // 8) * 8
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]
    assert (batch["input_ids"][0, n0:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all()
    assert batch["labels"][0, :n0].tolist() == features[0]["labels"]
    assert batch["index"].tolist() == [7, 2]


def test_preference_collator_pads_both_sides_to_one_length(tokenizer):
    encoder = Encoder(tokenizer, 4096)
    examples = [PreferenceExample("a", "t", "Q?", " yes", " no way at all"), PreferenceExample("b", "t", "Q", "y", "n")]
    features = [dict(encoder.encode_preference(e), index=i) for i, e in enumerate(examples)]
    batch = PreferenceCollator(tokenizer.pad_token_id)(features)
    assert set(batch) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "labels")
                          } | {"index"}
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert batch["rejected_attention_mask"][0].sum() == len(features[0]["rejected_input_ids"])
    assert (batch["chosen_labels"][1, len(features[1]["chosen_labels"]):] == IGNORE_INDEX).all()
