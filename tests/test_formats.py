import json
import re
from pathlib import Path

import pytest

from rose_pl.data.formats import (
    Dropped,
    InstructionExample,
    PreferenceExample,
    read_instructions,
    read_preferences,
)
from rose_pl.errors import ConfigError, DataFormatError

SHARED_FILES = [f"{d}/{d}_{k}_shot_{form}.json" for d in ("hh", "se", "shp") for k in (1, 2, 5)
                for form in ("sft", "preference")]


def chat(user="Hi", answer="Hello"):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def rose_entry(chosen="A", rejected="B", responses=None, pairs=None):
    responses = responses if responses is not None else [chosen, rejected]
    return {"responses": responses, "pairs": pairs if pairs is not None else [[0, 1]],
            "sft_target": chosen, "rejected_target": rejected}


# ---------------------------------------------------------------- instructions


def test_instruction_jsonl_reads_messages_and_prompt_completion_rows(tmp_path):
    path = write_jsonl(tmp_path / "pool.jsonl", [
        {"dataset": "flan", "id": "flan_0", "messages": [{"role": "system", "content": "Be brief."}] + chat()},
        "",
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": "3+3?", "completion": "6", "dataset": "math", "id": "m1"},
    ])
    rows = read_instructions(path)
    assert [r.id for r in rows] == ["flan_0", "pool_1", "m1"]
    assert [r.dataset for r in rows] == ["flan", "pool", "math"]
    assert rows[1].messages == chat("2+2?", "4")
    assert rows[1].raw == {"prompt": "2+2?", "completion": "4"}
    assert rows[2].where == 4  # the blank line counts in line numbers


def test_instruction_raw_is_the_row_unchanged(tmp_path):
    row = {"dataset": "d", "id": "x", "messages": chat(), "extra": {"kept": [1, 2]}}
    assert read_instructions(write_jsonl(tmp_path / "p.jsonl", [row]))[0].raw == row


def test_instruction_json_list_reads(tmp_path):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps([{"dataset": "d", "id": "a", "messages": chat()}, {"prompt": "p", "completion": "c"}]))
    rows = read_instructions(path)
    assert [r.id for r in rows] == ["a", "pool_1"]
    assert isinstance(rows[0], InstructionExample)


BAD_INSTRUCTION_ROWS = {
    "malformed_json": ('{"prompt": "x", ', "malformed JSON"),
    "not_an_object": ("[1, 2]", "must be a JSON object"),
    "no_messages_or_prompt": ({"dataset": "d"}, "neither"),
    "messages_not_a_list": ({"messages": "hi"}, "non-empty list"),
    "message_without_role": ({"messages": [{"content": "x"}]}, "missing field 'role'"),
    "content_not_a_string": ({"messages": [{"role": "user", "content": 3}]}, "must be str"),
    "unknown_role": ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    "no_assistant_message": ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    "blank_assistant_content": ({"messages": chat(answer="  \n")}, "assistant content is empty"),
    "blank_completion": ({"prompt": "x", "completion": " "}, "completion is empty"),
    "missing_completion": ({"prompt": "x"}, "missing field 'completion'"),
    "id_not_a_string": ({"id": [7], "messages": chat()}, "'id' must be str (or int)"),
    "both_forms": ({"prompt": "x", "completion": "y", "messages": chat()}, "both"),
}


@pytest.mark.parametrize("case", sorted(BAD_INSTRUCTION_ROWS))
def test_bad_instruction_row_raises_naming_file_and_line(tmp_path, case):
    row, expected = BAD_INSTRUCTION_ROWS[case]
    path = write_jsonl(tmp_path / "pool.jsonl", [{"prompt": "ok", "completion": "fine"}, row])
    with pytest.raises(DataFormatError) as info:
        read_instructions(path)
    assert str(path) in str(info.value) and "line 2" in str(info.value)
    assert expected in str(info.value)
    assert info.value.where == 2 or str(info.value.where).startswith("line 2")


def test_bad_row_in_json_list_names_the_entry(tmp_path):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps([{"prompt": "p", "completion": "c"}, {"messages": chat(answer="")}]))
    with pytest.raises(DataFormatError, match=re.escape(f"{path}, entry 1, message 1: assistant content is empty")):
        read_instructions(path)


def test_duplicate_instruction_id_raises_naming_both_rows(tmp_path):
    path = write_jsonl(tmp_path / "pool.jsonl", [{"id": "a", "messages": chat()}, {"id": "a", "messages": chat()}])
    with pytest.raises(DataFormatError, match=r"line 2: duplicate id 'a' \(first at line 1\)"):
        read_instructions(path)


def test_duplicate_instruction_ids_can_be_renamed_keeping_raw(tmp_path):
    rows = [{"id": "a", "messages": chat()}, {"id": "a", "messages": chat("x")}, {"id": "a#2", "messages": chat()}]
    with pytest.raises(DataFormatError):
        read_instructions(write_jsonl(tmp_path / "p.jsonl", rows))
    rows = rows[:2]
    out = read_instructions(write_jsonl(tmp_path / "q.jsonl", rows), duplicate_ids="rename")
    assert [r.id for r in out] == ["a", "a#2"]
    assert out[1].raw == rows[1]


def test_empty_or_unknown_files_raise(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataFormatError, match="no rows"):
        read_instructions(tmp_path / "empty.jsonl")
    (tmp_path / "pool.csv").write_text("a,b\n")
    with pytest.raises(DataFormatError, match="unknown extension"):
        read_instructions(tmp_path / "pool.csv")
    (tmp_path / "bad.json").write_text('[{"prompt": "a",\n "completion": }]')
    with pytest.raises(DataFormatError, match=r"bad.json, line 2: malformed JSON"):
        read_instructions(tmp_path / "bad.json")


# ---------------------------------------------------------------- preferences


def test_rose_json_tasks_follow_shots_per_task_in_file_order(tmp_path):
    path = tmp_path / "toy_2_shot.json"
    path.write_text(json.dumps({f"Q{i}": rose_entry(f"good {i}", f"bad {i}") for i in range(6)}))
    rows = read_preferences(path, shots_per_task=2)
    assert [r.task for r in rows] == ["toy_2_shot/0"] * 2 + ["toy_2_shot/1"] * 2 + ["toy_2_shot/2"] * 2
    assert rows[3] == PreferenceExample("toy_2_shot_3", "toy_2_shot/1", "Q3", "good 3", "bad 3")
    assert {r.task for r in read_preferences(path, shots_per_task="all")} == {"toy_2_shot"}


def test_rose_json_without_shots_per_task_is_refused_naming_the_file_and_the_likely_value(tmp_path):
    path = tmp_path / "se_2_shot_preference.json"
    path.write_text(json.dumps({f"Q{i}": rose_entry() for i in range(4)}))
    with pytest.raises(ConfigError, match=re.escape(str(path))) as info:
        read_preferences(path)
    assert "shots_per_task: 2" in str(info.value) and "'all'" in str(info.value)
    with pytest.raises(ConfigError, match="not a positive integer or 'all'"):
        read_preferences(path, shots_per_task="some")


def test_rose_json_row_count_not_divisible_by_shots_raises(tmp_path):
    path = tmp_path / "toy.json"
    path.write_text(json.dumps({f"Q{i}": rose_entry() for i in range(5)}))
    with pytest.raises(DataFormatError, match="5 rows is not a multiple of shots_per_task=2"):
        read_preferences(path, shots_per_task=2)


def test_rose_json_all_pairs_expands_every_pair(tmp_path):
    path = tmp_path / "toy.json"
    entry = rose_entry("r0", "r2", responses=["r0", "r1", "r2"], pairs=[[0, 2], [1, 2], [0, 1]])
    path.write_text(json.dumps({"Q": entry, "R": rose_entry()}))
    rows = read_preferences(path, shots_per_task=1, all_pairs=True)
    assert [(r.id, r.task, r.chosen, r.rejected) for r in rows] == [
        ("toy_0_0", "toy/0", "r0", "r2"), ("toy_0_1", "toy/0", "r1", "r2"), ("toy_0_2", "toy/0", "r0", "r1"),
        ("toy_1_0", "toy/1", "A", "B"),
    ]


@pytest.mark.parametrize("pairs", [[[0, 3]], [[0, 0]], [[0]], [["0", 1]], [[True, 0]], [[-1, 0]]])
def test_rose_json_bad_pair_indices_raise_naming_the_pair(tmp_path, pairs):
    path = tmp_path / "toy.json"
    path.write_text(json.dumps({"Q": rose_entry(pairs=pairs)}))
    with pytest.raises(DataFormatError, match=r"toy.json, entry 0 \(key 'Q'\), pairs\[0\]"):
        read_preferences(path, shots_per_task=1)


def test_rose_json_duplicate_prompt_raises_naming_it(tmp_path):
    path = tmp_path / "toy.json"
    entry = json.dumps(rose_entry())
    path.write_text('{"Same prompt": %s, "Other": %s, "Same prompt": %s}' % (entry, entry, entry))
    with pytest.raises(DataFormatError, match="key 'Same prompt': duplicate key"):
        read_preferences(path)


BAD_ROSE_ENTRIES = {
    "missing_sft_target": ({"rejected_target": "B"}, "missing field 'sft_target'"),
    "not_an_object": (["A", "B"], "value must be an object"),
    "empty_chosen": (rose_entry(chosen=" "), "chosen response is empty"),
    "empty_rejected": (rose_entry(rejected=""), "rejected response is empty"),
    "identical": (rose_entry("same", "same", responses=["same", "x"]), "identical"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROSE_ENTRIES))
def test_bad_rose_entry_raises_naming_the_key(tmp_path, case):
    entry, expected = BAD_ROSE_ENTRIES[case]
    path = tmp_path / "toy.json"
    path.write_text(json.dumps({"Good": rose_entry(), "The bad one": entry}))
    with pytest.raises(DataFormatError, match=re.escape(f"{path}, entry 1 (key 'The bad one')")) as info:
        read_preferences(path, shots_per_task=1)
    assert expected in str(info.value)


def test_invalid_pairs_can_be_dropped_and_are_reported(tmp_path):
    path = tmp_path / "toy.json"
    path.write_text(json.dumps({"Q0": rose_entry(), "Q1": rose_entry("s", "s", responses=["s", "t"])}))
    dropped: list[Dropped] = []
    rows = read_preferences(path, shots_per_task=1, on_invalid_pair="drop", dropped=dropped)
    assert [r.id for r in rows] == ["toy_0"]
    assert [(d.id, d.path) for d in dropped] == [("toy_1", str(path))]
    assert "identical" in dropped[0].reason


def test_preference_jsonl_requires_task_unless_default_given(tmp_path):
    row = {"prompt": "P", "chosen": "C", "rejected": "R"}
    path = write_jsonl(tmp_path / "prefs.jsonl", [dict(row, task="t1", id="x"), row])
    with pytest.raises(DataFormatError, match=r"prefs.jsonl, line 2: missing field 'task'"):
        read_preferences(path)
    rows = read_preferences(path, default_task="fallback")
    assert [(r.id, r.task) for r in rows] == [("x", "t1"), ("prefs_1", "fallback")]


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "P", "chosen": "C", "rejected": "C", "task": "t"}, "identical"),
    ({"prompt": "P", "chosen": "", "rejected": "R", "task": "t"}, "chosen response is empty"),
    ({"prompt": "P", "chosen": "C", "rejected": 1, "task": "t"}, "'rejected' must be str"),
    ({"prompt": " ", "chosen": "C", "rejected": "R", "task": "t"}, "prompt is empty"),
    ({"prompt": "P", "chosen": "C", "rejected": "R", "task": "t", "id": "a"}, "duplicate id 'a'"),
])
def test_bad_preference_jsonl_row_raises_naming_the_line(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "P", "chosen": "C", "rejected": "R", "task": "t",
                                                   "id": "a"}, row])
    with pytest.raises(DataFormatError, match=re.escape(f"{path}, line 2")) as info:
        read_preferences(path)
    assert expected in str(info.value)


def test_rose_only_arguments_on_row_files_are_config_errors(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "P", "chosen": "C", "rejected": "R", "task": "t"}])
    with pytest.raises(ConfigError, match="shots_per_task"):
        read_preferences(path, shots_per_task=1)
    with pytest.raises(ConfigError, match="all_pairs"):
        read_preferences(path, all_pairs=True)


def test_as_instruction_is_user_prompt_and_assistant_chosen():
    example = PreferenceExample("id1", "task/0", "Question?", " good", " bad")
    inst = example.as_instruction()
    assert inst.messages == chat("Question?", " good")
    assert (inst.id, inst.dataset) == ("id1", "task/0")


# ---------------------------------------------------------------- the ROSE paper's files


@pytest.mark.parametrize("name", SHARED_FILES)
def test_shared_rose_validation_file_reads(rose_validation_dir, name):
    path = rose_validation_dir / name
    shots = int(name.split("_")[1])
    raw = json.loads(path.read_text())
    if name.endswith("_sft.json"):
        rows = read_instructions(path, duplicate_ids="rename")
        assert [r.raw for r in rows] == raw
        assert len({r.id for r in rows}) == len(rows)
        assert all(r.messages[-1]["role"] == "assistant" for r in rows)
        return
    rows = read_preferences(path, shots_per_task=shots, on_invalid_pair="drop")
    num_tasks = len(raw) // shots
    assert len({r.task for r in rows}) == num_tasks
    assert len(rows) >= len(raw) - 2
    for row in rows:
        assert row.prompt in raw and row.chosen == raw[row.prompt]["sft_target"]
    pairs = read_preferences(path, shots_per_task=shots, all_pairs=True)
    assert len(pairs) == sum(len(v["pairs"]) for v in raw.values())


def test_shared_data_quirks_are_reported_not_hidden(rose_validation_dir):
    # Published files reuse ids for different rows and once give the same text as chosen and rejected.
    with pytest.raises(DataFormatError, match="duplicate id 'se_22'"):
        read_instructions(rose_validation_dir / "se/se_2_shot_sft.json")
    with pytest.raises(DataFormatError, match="entry 2 .* identical"):
        read_preferences(rose_validation_dir / "se/se_5_shot_preference.json", shots_per_task=5)


def test_a_directory_given_as_a_data_file_is_called_a_directory(tmp_path):
    with pytest.raises(DataFormatError, match="is a directory"):
        read_instructions(tmp_path)


def test_integer_ids_of_hub_datasets_are_read_as_strings(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps({"id": 7, "messages": chat()}) + "\n")
    assert read_instructions(path)[0].id == "7"
