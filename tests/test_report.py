import numpy as np
import pytest

from rose_pl.errors import ConfigError
from rose_pl.selection.report import (
    DATASET_PLOT,
    REPORT_FILE,
    SCORES_PLOT,
    TASK_PLOT,
    comparison_table,
    composition,
    write_report,
)
from rose_pl.selection.select import select

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def selection():
    rng = np.random.default_rng(0)
    n = 400
    datasets = list(rng.choice(["flan_v2", "cot", "dolly", "oasst1"], n, p=[0.4, 0.3, 0.2, 0.1]))
    tasks = ["bbh", "mmlu", "tydiqa"]
    per_task = rng.standard_normal((n, 3)) + np.array([0.0, 0.3, -0.2])
    scores = per_task.max(axis=1)
    ids = [f"{d}_{i}" for i, d in enumerate(datasets)]
    texts = [f"Prompt {i} | with a pipe\nand a newline " + "x" * 300 for i in range(n)]
    selected = select(scores, fraction=0.05)
    return dict(scores=scores, selected=selected, datasets=datasets, ids=ids, texts=texts,
                best_task=per_task.argmax(axis=1), tasks=tasks)


def test_report_and_plots_are_written_with_expected_sections(selection, tmp_path):
    path = write_report(tmp_path, title="ROSE 5% of the pool", extra={"method": "rose", "seed": 0}, **selection)
    assert path == tmp_path / REPORT_FILE
    for name in (SCORES_PLOT, DATASET_PLOT, TASK_PLOT):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    text = path.read_text(encoding="utf-8")
    for section in ("# ROSE 5% of the pool", "## Summary", "## Score distribution",
                    "## Composition by source dataset", "## Composition by best-matching task",
                    "## Top 5 selected examples per task", "### bbh", "### mmlu", "### tydiqa", "## Settings"):
        assert section in text
    assert "- selected rows: 20 (5.00% of the pool)" in text
    assert f"]({SCORES_PLOT})" in text and f"]({DATASET_PLOT})" in text


def test_report_lists_the_top_selected_ids_of_each_task(selection, tmp_path):
    text = write_report(tmp_path, **selection).read_text(encoding="utf-8")
    sel, best = selection["selected"], selection["best_task"]
    for t, name in enumerate(selection["tasks"]):
        top = [i for i in sel if best[i] == t][:5]
        section = text.split(f"### {name}")[1].split("###")[0]
        for i in top:
            assert selection["ids"][i] in section
    # The best-ranked row is listed with rank 1.
    assert f"| 1 | {selection['ids'][sel[0]]} |" in text


def test_report_prompts_are_cut_to_one_escaped_table_line(selection, tmp_path):
    text = write_report(tmp_path, text_chars=50, **selection).read_text(encoding="utf-8")
    i = selection["selected"][0]
    assert f"Prompt {i} \\| with a pipe and a newline " in text
    row = next(line for line in text.splitlines() if line.startswith(f"| 1 | {selection['ids'][i]} |"))
    assert row.endswith("… |") and "x" * 60 not in row


def test_report_without_tasks_lists_top_examples_overall(selection, tmp_path):
    selection.update(best_task=None, tasks=None, texts=None)
    text = write_report(tmp_path, **selection).read_text(encoding="utf-8")
    assert "## Top 5 selected examples" in text and "best-matching task" not in text
    assert not (tmp_path / TASK_PLOT).exists()


def test_report_composition_table_counts_pool_and_selection(selection, tmp_path):
    text = write_report(tmp_path, **selection).read_text(encoding="utf-8")
    ds, sel = selection["datasets"], selection["selected"]
    flan_pool, flan_sel = ds.count("flan_v2"), sum(ds[i] == "flan_v2" for i in sel)
    assert f"| flan_v2 | {flan_pool} | {100 * flan_pool / 400:.1f} | {flan_sel} | {100 * flan_sel / 20:.1f} |" in text


def test_report_rejects_misaligned_inputs(selection, tmp_path):
    selection["ids"] = selection["ids"][:-1]
    with pytest.raises(ConfigError, match="399 ids for 400 scores"):
        write_report(tmp_path, **selection)


def test_composition_is_percent_of_selected_rows():
    assert composition(["a", "b", "a", "c"], [0, 1, 2]) == pytest.approx({"a": 200 / 3, "b": 100 / 3})
    assert composition(["a", "b"]) == {"a": 50.0, "b": 50.0}


def test_comparison_table_lines_up_methods_and_expands_dict_columns():
    rows = [
        {"method": "ROSE", "composition": {"flan_v2": 35.0, "dolly": 20.5}, "pref_acc": 0.6125},
        {"method": "random", "composition": {"flan_v2": 40.0, "oasst1": 10.0}, "pref_acc": 0.55, "n": 13534},
        {"pref_acc": float("nan"), "method": "BM25"},
    ]
    lines = comparison_table(rows).splitlines()
    assert lines[0] == ("| method | composition: flan_v2 | composition: dolly | pref_acc | composition: oasst1 | n |")
    assert lines[1] == "|---|---:|---:|---:|---:|---:|"
    assert lines[2] == "| ROSE | 35 | 20.5 | 0.6125 | – | – |"
    assert lines[3] == "| random | 40 | – | 0.55 | 10 | 13534 |"
    assert lines[4] == "| BM25 | – | – | – | – | – |"
