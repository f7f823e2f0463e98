import pytest
import torch

from rose_pl.data.chat import (
    IGNORE_INDEX,
    ChatEncoder,
    EmptyLossError,
    encode_messages,
    encode_preference,
    format_tulu,
)
from rose_pl.data.collate import PreferenceCollator, SFTCollator
from rose_pl.data.formats import PreferenceExample

MULTI_TURN = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": " Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4, héllo"},
]


def loss_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t, l in zip(encoded["input_ids"], encoded["labels"]) if l != IGNORE_INDEX])


def test_format_tulu_matches_the_less_template():
    text = format_tulu(MULTI_TURN, "</s>")
    assert text == ("<|system|>\nBe kind.\n<|user|>\nHi there\n<|assistant|>\nHello!</s>\n"
                    "<|user|>\n2+2?\n<|assistant|>\n4, héllo</s>\n")


def test_input_ids_spell_the_tulu_text(tokenizer):
    encoded = encode_messages(MULTI_TURN, tokenizer, 4096)
    assert tokenizer.decode(encoded["input_ids"]) == format_tulu(MULTI_TURN, tokenizer.eos_token)


def test_labels_cover_exactly_assistant_content_and_eos_single_turn(tokenizer):
    messages = [{"role": "user", "content": "Question"}, {"role": "assistant", "content": " Answer."}]
    encoded = encode_messages(messages, tokenizer, 4096)
    assert loss_text(tokenizer, encoded) == "Answer.</s>"  # stripped, as LESS does
    # The labels are the input ids where they count (the model shifts them itself).
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(encoded["input_ids"], encoded["labels"]))
    assert encoded["labels"][-1] == IGNORE_INDEX  # the newline after EOS
    assert encoded["labels"][-2] == tokenizer.eos_token_id


def test_labels_cover_every_assistant_turn_in_multi_turn_chats(tokenizer):
    encoded = encode_messages(MULTI_TURN, tokenizer, 4096)
    assert loss_text(tokenizer, encoded) == "Hello!</s>4, héllo</s>"
    # The loss spans are contiguous runs, one per assistant message.
    mask = [l != IGNORE_INDEX for l in encoded["labels"]]
    starts = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    assert starts == 2


def test_right_truncation_keeps_the_start_and_the_mask_aligned(tokenizer):
    full = encode_messages(MULTI_TURN, tokenizer, 4096)
    cut = len(full["input_ids"]) - 12
    encoded = encode_messages(MULTI_TURN, tokenizer, cut)
    assert encoded["input_ids"] == full["input_ids"][:cut]
    assert encoded["labels"] == full["labels"][:cut]


def test_truncating_away_every_assistant_token_raises(tokenizer):
    messages = [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y"}]
    with pytest.raises(EmptyLossError, match="max_seq_length=40"):
        encode_messages(messages, tokenizer, 40)
    # One assistant token left is enough.
    header = len(tokenizer("<|user|>\n" + "x" * 50 + "\n<|assistant|>\n", add_special_tokens=False)["input_ids"])
    assert loss_text(tokenizer, encode_messages(messages, tokenizer, header + 1)) == "y"


def test_bos_is_prepended_only_when_the_tokenizer_adds_one(tokenizer):
    class BosTokenizer:
        """Wraps the byte tokenizer and adds BOS when asked for special tokens, like Llama."""

        bos_token_id, eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id

        def __call__(self, text, add_special_tokens=True):
            out = tokenizer(text, add_special_tokens=False)
            if add_special_tokens:
                out["input_ids"] = [self.bos_token_id] + out["input_ids"]
            return out

    plain = encode_messages(MULTI_TURN, tokenizer, 4096)
    with_bos = encode_messages(MULTI_TURN, BosTokenizer(), 4096)
    assert plain["input_ids"][0] != tokenizer.bos_token_id
    assert with_bos["input_ids"] == [tokenizer.bos_token_id] + plain["input_ids"]
    assert with_bos["labels"] == [IGNORE_INDEX] + plain["labels"]


def test_encode_preference_masks_each_response(tokenizer):
    example = PreferenceExample("p0", "t", "\n\nHuman: Why?\n\nAssistant:", " Because.", " No idea")
    encoded = encode_preference(example, tokenizer, 4096)
    assert loss_text(tokenizer, {"input_ids": encoded["chosen_input_ids"], "labels": encoded["chosen_labels"]}) \
        == "Because.</s>"
    assert loss_text(tokenizer, {"input_ids": encoded["rejected_input_ids"], "labels": encoded["rejected_labels"]}) \
        == "No idea</s>"
    # Same prompt tokens in front of both responses.
    prompt_len = len(tokenizer("<|user|>\n" + example.prompt.strip() + "\n<|assistant|>\n")["input_ids"])
    assert encoded["chosen_input_ids"][:prompt_len] == encoded["rejected_input_ids"][:prompt_len]


def test_encode_preference_names_the_side_that_lost_its_loss(tokenizer):
    example = PreferenceExample("p0", "t", "x" * 30, "short", "a much longer rejected response")
    with pytest.raises(EmptyLossError, match="chosen side"):
        encode_preference(example, tokenizer, 10)


def test_sft_collator_pads_right_with_masked_labels(tokenizer):
    encoder = ChatEncoder(tokenizer, 4096)
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
    encoder = ChatEncoder(tokenizer, 4096)
    examples = [PreferenceExample("a", "t", "Q?", " yes", " no way at all"), PreferenceExample("b", "t", "Q", "y", "n")]
    features = [dict(encoder.encode_preference(e), index=i) for i, e in enumerate(examples)]
    batch = PreferenceCollator(tokenizer.pad_token_id)(features)
    assert set(batch) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "labels")
                          } | {"index"}
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert batch["rejected_attention_mask"][0].sum() == len(features[0]["rejected_input_ids"])
    assert (batch["chosen_labels"][1, len(features[1]["chosen_labels"]):] == IGNORE_INDEX).all()
