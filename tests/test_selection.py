import json

import numpy as np
import pytest

from rose_pl.errors import ConfigError
from rose_pl.selection.select import (
    SELECTION_META_FILE,
    budget,
    rank,
    read_selection,
    select,
    selection_meta_path,
    write_selection,
)


def test_selection_is_global_top_scores_in_rank_order():
    scores = np.array([0.1, 0.9, -1.0, 0.5, 0.7, 0.3])
    np.testing.assert_array_equal(select(scores, k=3), [1, 4, 3])
    np.testing.assert_array_equal(select(scores, fraction=0.5), [1, 4, 3])


@pytest.mark.parametrize(
    "n, fraction, expected",
    [(1000, 0.05, 50), (1001, 0.05, 51), (100, 0.07, 7), (10, 0.01, 1), (3, 1.0, 3), (270_679, 0.05, 13_534)],
)
def test_fraction_budget_is_ceil_and_at_least_one(n, fraction, expected):
    assert budget(n, fraction=fraction) == expected
    assert select(np.arange(n, dtype=np.float32), fraction=fraction).shape == (expected,)


def test_top_k_size_is_exactly_k_and_overrides_default_fraction():
    scores = np.random.default_rng(0).standard_normal(200)
    assert select(scores, k=17).shape == (17,)
    assert select(scores).shape == (10,)  # default 5% of 200


def test_ties_are_deterministic_for_a_seed_and_differ_across_seeds():
    scores = np.zeros(100)
    scores[:3] = 5.0  # three clear winners, then 97 tied rows
    a = select(scores, k=10, seed=0)
    assert sorted(a[:3].tolist()) == [0, 1, 2]
    np.testing.assert_array_equal(a, select(scores, k=10, seed=0))
    b = select(scores, k=10, seed=1)
    assert sorted(b[:3].tolist()) == [0, 1, 2]
    assert set(a[3:].tolist()) != set(b[3:].tolist())


def test_ties_do_not_favor_file_order():
    scores = np.ones(1000)
    picked = np.concatenate([select(scores, k=10, seed=s) for s in range(20)])
    # File order would always pick rows 0..9; a random tiebreak spreads picks over the pool.
    assert picked.max() > 500 and len(set(picked.tolist())) > 100


def test_rank_is_a_permutation_with_scores_non_increasing():
    scores = np.random.default_rng(2).integers(0, 5, 300).astype(np.float64)
    order = rank(scores, seed=4)
    assert sorted(order.tolist()) == list(range(300))
    assert np.all(np.diff(scores[order]) <= 0)


def test_nan_scores_are_an_error_naming_the_count():
    scores = np.array([1.0, np.nan, 0.5, np.nan])
    with pytest.raises(ConfigError, match="2 of 4 scores are NaN"):
        select(scores, k=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fraction": 0.0}, "fraction must be in"),
        ({"fraction": 1.5}, "fraction must be in"),
        ({"fraction": None}, "give fraction or k"),
        ({"k": 0}, "k must be an integer"),
        ({"k": 11}, "k must be an integer"),
        ({"k": 3, "fraction": 0.2}, "not both"),
    ],
)
def test_invalid_budgets_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        select(np.arange(10.0), **kwargs)


@pytest.fixture
def pool_rows():
    # Rows in the pool's own format, including keys rose_pl does not use and non-ASCII text.
    return [
        {"dataset": "dolly" if i % 2 else "oasst1", "id": f"{'dolly' if i % 2 else 'oasst1'}_{i}",
         "messages": [{"role": "user", "content": f"question {i} – über"},
                      {"role": "assistant", "content": f"answer {i}"}],
         "extra": {"nested": [i, None, True]}}
        for i in range(40)
    ]


def test_written_jsonl_rows_are_identical_to_input_rows_in_rank_order(pool_rows, tmp_path):
    scores = np.random.default_rng(0).standard_normal(len(pool_rows))
    selected = select(scores, fraction=0.1, seed=3)
    out = write_selection(pool_rows, selected, tmp_path / "selected.jsonl", scores=scores, fraction=0.1,
                          seed=3, source=["pool/dolly.jsonl", "pool/oasst1.jsonl"])
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [pool_rows[i] for i in selected]
    assert "über" in lines[0]  # written as UTF-8 text, not \u escapes, like the pool files


def test_selection_sidecar_records_indices_ids_scores_ranks_and_settings(pool_rows, tmp_path):
    scores = np.linspace(0, 1, len(pool_rows))
    selected = select(scores, k=4)
    path = tmp_path / "sel" / "selected.jsonl"
    write_selection(pool_rows, selected, path, scores=scores, k=4, seed=0, source="pool.jsonl",
                    datasets=[r["dataset"] for r in pool_rows])
    assert selection_meta_path(path) == tmp_path / "sel" / SELECTION_META_FILE
    meta = read_selection(path)
    assert meta["k"] == 4 and meta["fraction"] is None and meta["seed"] == 0
    assert meta["source"] == ["pool.jsonl"] and meta["pool_size"] == 40 and meta["num_selected"] == 4
    assert [r["index"] for r in meta["selected"]] == [39, 38, 37, 36]
    assert [r["rank"] for r in meta["selected"]] == [0, 1, 2, 3]
    assert [r["id"] for r in meta["selected"]] == ["dolly_39", "oasst1_38", "dolly_37", "oasst1_36"]
    assert meta["selected"][0]["score"] == pytest.approx(1.0)
    assert meta["threshold"] == pytest.approx(scores[36])
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_write_selection_rejects_out_of_range_and_repeated_indices(pool_rows, tmp_path):
    with pytest.raises(ConfigError, match=r"lie in \[0, 40\)"):
        write_selection(pool_rows, [0, 40], tmp_path / "a.jsonl")
    with pytest.raises(ConfigError, match="repeated"):
        write_selection(pool_rows, [1, 1], tmp_path / "a.jsonl")
    with pytest.raises(ConfigError, match="3 scores for a pool of 40"):
        write_selection(pool_rows, [1], tmp_path / "a.jsonl", scores=np.zeros(3))
    assert not (tmp_path / "a.jsonl").exists()


def test_a_fraction_that_rounds_far_up_is_logged_with_the_count(caplog):
    from rose_pl.selection.select import budget

    with caplog.at_level("WARNING", logger="rose_pl.selection.select"):
        assert budget(160, fraction=0.001) == 1
    assert "fraction 0.001 of 160 rows is 0.16 rows: selecting 1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rose_pl.selection.select"):
        assert budget(200, fraction=0.05) == 10
    assert caplog.text == ""
