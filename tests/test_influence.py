import json

import numpy as np
import pytest
import torch

from rose_pl.errors import ConfigError, DataFormatError, StoreMismatchError
from rose_pl.selection.influence import (
    SCORES_ARRAYS_FILE,
    SCORES_META_FILE,
    check_store_metas,
    influence_scores,
    load_scores,
    save_scores,
    score_stores,
)

RTOL, ATOL = 1e-4, 1e-4  # float32 streaming vs float64 reference, d <= 64


def dense_reference(train, val, task_ids, weights):
    """Eq. 7 written out directly in float64: loop over tasks and checkpoints, no streaming."""
    eta = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    tasks = sorted(set(task_ids))
    out = np.zeros((train[0].shape[0], len(tasks)))
    for j, task in enumerate(tasks):
        rows = [r for r, t in enumerate(task_ids) if t == task]
        for i in range(len(train)):
            mean = np.asarray(val[i], dtype=np.float64)[rows].mean(axis=0)
            out[:, j] += eta[i] * np.asarray(train[i], dtype=np.float64) @ mean
    return out, tasks


def make_memmap(path, array, dtype=np.float16):
    mm = np.memmap(path, dtype=dtype, mode="w+", shape=array.shape)
    mm[:] = array
    mm.flush()
    return np.memmap(path, dtype=dtype, mode="r", shape=array.shape)


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    n, m, d, c = 53, 11, 16, 3
    # Tasks of unequal size (5, 4, 2) in shuffled row order.
    task_ids = list(rng.permutation(["gsm"] * 5 + ["mmlu"] * 4 + ["bbh"] * 2))
    train = [rng.standard_normal((n, d)).astype(np.float32) for _ in range(c)]
    val = [rng.standard_normal((m, d)).astype(np.float32) for _ in range(c)]
    weights = [2e-5, 1e-5, 5e-6]  # mean lr per epoch of a linear decay: unequal, not summing to 1
    return train, val, task_ids, weights


def test_scores_equal_dense_float64_reference_with_shuffled_unequal_tasks(problem):
    train, val, task_ids, weights = problem
    result = influence_scores(train, val, task_ids, weights, device="cpu")
    ref, tasks = dense_reference(train, val, task_ids, weights)
    assert result.tasks == tasks
    np.testing.assert_allclose(result.per_task, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(result.scores, ref.max(axis=1), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(result.best_task, ref.argmax(axis=1))
    np.testing.assert_allclose(result.weights, np.asarray(weights) / np.sum(weights))
    assert result.scores.dtype == np.float32 and result.per_task.shape == (53, 3)


def test_scores_do_not_depend_on_validation_row_order(problem):
    train, val, task_ids, weights = problem
    perm = np.random.default_rng(1).permutation(len(task_ids))
    a = influence_scores(train, val, task_ids, weights, device="cpu")
    b = influence_scores(train, [v[perm] for v in val], [task_ids[p] for p in perm], weights, device="cpu")
    np.testing.assert_allclose(a.per_task, b.per_task, rtol=1e-5, atol=1e-5)


def test_streamed_memmap_pool_larger_than_block_equals_reference(problem, tmp_path):
    train, val, task_ids, weights = problem
    train_mm = [make_memmap(tmp_path / f"train{i}.bin", t) for i, t in enumerate(train)]
    val_mm = [make_memmap(tmp_path / f"val{i}.bin", v) for i, v in enumerate(val)]
    result = influence_scores(train_mm, val_mm, task_ids, weights, block_size=7, device="cpu")
    # Reference on the fp16-rounded values actually stored.
    ref, _ = dense_reference([np.asarray(t) for t in train_mm], [np.asarray(v) for v in val_mm], task_ids, weights)
    np.testing.assert_allclose(result.per_task, ref, rtol=RTOL, atol=ATOL)


def test_block_size_does_not_change_scores(problem):
    train, val, task_ids, weights = problem
    a = influence_scores(train, val, task_ids, weights, block_size=1000, device="cpu")
    b = influence_scores(train, val, task_ids, weights, block_size=4, device="cpu")
    np.testing.assert_allclose(a.per_task, b.per_task, rtol=1e-6, atol=1e-6)


def test_single_checkpoint_weight_one_is_plain_task_mean_inner_product(problem):
    train, val, task_ids, _ = problem
    result = influence_scores(train[:1], val[:1], task_ids, [1.0], device="cpu")
    ref, _ = dense_reference(train[:1], val[:1], task_ids, [1.0])
    np.testing.assert_allclose(result.per_task, ref, rtol=RTOL, atol=ATOL)
    assert result.weights.tolist() == [1.0]


def test_torch_tensor_inputs_match_numpy(problem):
    train, val, task_ids, weights = problem
    a = influence_scores(train, val, task_ids, weights, device="cpu")
    b = influence_scores([torch.from_numpy(t) for t in train], [torch.from_numpy(v) for v in val], task_ids,
                         weights, device="cpu")
    np.testing.assert_allclose(a.per_task, b.per_task, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda t, v, ids, w: (t[:2], v, ids, w[:2]), ConfigError, "3 validation checkpoints"),
        (lambda t, v, ids, w: (t, v, ids, w[:2]), ConfigError, "2 weights for 3 checkpoints"),
        (lambda t, v, ids, w: (t, v, ids[:-1], w), ConfigError, "10 task ids for 11 validation rows"),
        (lambda t, v, ids, w: (t, v, ids, [1.0, 0.0, 1.0]), ConfigError, "positive and finite"),
        (lambda t, v, ids, w: (t, v, ids, [1.0, float("nan"), 1.0]), ConfigError, "positive and finite"),
        (lambda t, v, ids, w: ([t[0], t[1][:, :8], t[2]], v, ids, w), StoreMismatchError, "dims differ"),
        (lambda t, v, ids, w: ([t[0], t[1][:50], t[2]], v, ids, w), StoreMismatchError, "row counts"),
        (lambda t, v, ids, w: (t, v, [""] + ids[1:], w), ConfigError, "non-empty strings"),
    ],
)
def test_invalid_inputs_raise_named_errors(problem, mutate, error, match):
    args = mutate(*problem)
    with pytest.raises(error, match=match):
        influence_scores(*args, device="cpu")


def test_requested_cuda_without_cuda_is_an_error_not_a_fallback(problem):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        influence_scores(*problem, device="cuda")


def test_auto_device_is_logged(problem, caplog):
    with caplog.at_level("INFO", logger="rose_pl.selection.influence"):
        result = influence_scores(*problem, device=None)
    assert "chosen automatically" in caplog.text
    assert "renormalized" in caplog.text
    assert result.info["device"] in ("cpu", "cuda", "cuda:0")


def _meta(ckpt, kind="countsketch", seed=0, dim=16, rows=53):
    return {"num_rows": rows, "dim": dim, "dtype": "float16", "weights": ckpt,
            "projector": {"kind": kind, "dim": dim, "seed": seed}}


def test_store_metadata_checks_list_every_mismatch():
    train = [_meta("epoch1"), _meta("epoch2", seed=1), _meta("epoch2")]
    val = [_meta("epoch1", rows=11), _meta("epoch2", rows=11), _meta("epoch3", kind="gaussian", rows=11)]
    with pytest.raises(StoreMismatchError) as info:
        check_store_metas(train, val, ["t0", "t1", "t2"], ["v0", "v1", "v2"])
    text = str(info.value)
    assert "projector.seed: t1 1, v1 0" in text
    assert "projector.kind: t2 'countsketch', v2 'gaussian'" in text
    assert "checkpoint weights 'epoch2' (t2) != 'epoch3' (v2)" in text
    assert "same checkpoint" in text


def test_store_metadata_checks_compare_the_parameter_layout_and_the_normalization():
    def meta(ckpt, **projector):
        out = _meta(ckpt)
        out["projector"].update({"layout_hash": "abc", "normalize": True, "input_dim": 100}, **projector)
        return out

    check_store_metas([meta("e1")], [meta("e1")], ["t0"], ["v0"])
    with pytest.raises(StoreMismatchError, match="projector.layout_hash: t0 'abc', v0 'other'"):
        check_store_metas([meta("e1")], [meta("e1", layout_hash="other")], ["t0"], ["v0"])
    with pytest.raises(StoreMismatchError, match="projector.normalize: t0 True, v0 False"):
        check_store_metas([meta("e1")], [meta("e1", normalize=False)], ["t0"], ["v0"])


def test_compatible_store_metadata_passes():
    check_store_metas([_meta("e1"), _meta("e2")], [_meta("e1", rows=9), _meta("e2", rows=9)],
                      ["t0", "t1"], ["v0", "v1"])


def test_saved_scores_round_trip_with_their_ids(problem, tmp_path):
    train, val, task_ids, weights = problem
    result = influence_scores(train, val, task_ids, weights, device="cpu")
    ids = [f"row-{i}" for i in range(result.num_rows)]
    datasets = ["dolly" if i % 3 else "oasst1" for i in range(result.num_rows)]
    save_scores(tmp_path / "scores", result, ids, datasets, meta={"method": "rose", "seed": 3})
    assert {p.name for p in (tmp_path / "scores").iterdir()} == {SCORES_ARRAYS_FILE, SCORES_META_FILE}
    loaded = load_scores(tmp_path / "scores")
    np.testing.assert_array_equal(loaded.result.scores, result.scores)
    np.testing.assert_array_equal(loaded.result.per_task, result.per_task)
    np.testing.assert_array_equal(loaded.result.best_task, result.best_task)
    assert loaded.result.tasks == result.tasks
    assert loaded.ids.tolist() == ids and loaded.datasets == datasets
    assert loaded.meta == {"method": "rose", "seed": 3}


def test_save_scores_rejects_wrong_id_count_and_load_rejects_incomplete(problem, tmp_path):
    result = influence_scores(*problem, device="cpu")
    with pytest.raises(ConfigError, match="53 scores but 2 ids"):
        save_scores(tmp_path / "s", result, ["a", "b"], ["x", "y"], {})
    save_scores(tmp_path / "s", result, [str(i) for i in range(53)], ["d"] * 53, {})
    (tmp_path / "s" / SCORES_META_FILE).unlink()
    with pytest.raises(DataFormatError, match="not a complete score set"):
        load_scores(tmp_path / "s")
    save_scores(tmp_path / "s", result, [str(i) for i in range(53)], ["d"] * 53, {})
    meta = json.loads((tmp_path / "s" / SCORES_META_FILE).read_text())
    meta["format_version"] = 99
    (tmp_path / "s" / SCORES_META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match="format_version"):
        load_scores(tmp_path / "s")


# ---- against real FeatureStore folders ---------------------------------------------------------------
def _store(path, rows, checkpoint, seed=0, excluded=()):
    from rose_pl.features.store import FeatureStore

    meta = {"module": {"weights": checkpoint}, "projector": {"kind": "countsketch", "dim": rows.shape[1], "seed": seed},
            "dataset_fingerprint": "x"}
    store = FeatureStore.create(path, rows.shape[0], rows.shape[1], meta, dtype="float32", durable=False)
    keep = [i for i in range(rows.shape[0]) if i not in set(excluded)]
    store.write(np.asarray(keep), rows[keep])
    store.finalize(excluded)
    store.close()
    return path


def test_score_stores_equals_the_dense_computation_and_skips_dropped_rows(tmp_path):
    rng = np.random.default_rng(0)
    train = [rng.standard_normal((9, 6)).astype(np.float32) for _ in range(2)]
    val = [rng.standard_normal((5, 6)).astype(np.float32) for _ in range(2)]
    tasks = ["b", "a", "b", "a", "a"]
    train_dirs = [_store(tmp_path / f"t{i}", train[i], f"ckpt{i}", excluded=[7]) for i in range(2)]
    val_dirs = [_store(tmp_path / f"v{i}", val[i], f"ckpt{i}", excluded=[3] if i == 1 else []) for i in range(2)]
    result = score_stores(train_dirs, val_dirs, tasks, [1.0, 3.0])
    # Reference: validation row 3 left out everywhere, training row 7 never selectable.
    keep = [0, 1, 2, 4]
    expected = np.zeros((9, 2))
    for i, w in enumerate((0.25, 0.75)):
        for j, task in enumerate(["a", "b"]):
            rows = [r for r in keep if tasks[r] == task]
            expected[:, j] += w * train[i].astype(np.float64) @ val[i][rows].astype(np.float64).mean(0)
    expected[7] = -np.inf
    np.testing.assert_allclose(result.per_task, expected, rtol=1e-5, atol=1e-6)
    assert result.scores[7] == -np.inf and result.info["dropped_val_rows"] == [3]


def test_score_stores_refuses_stores_from_different_checkpoints_or_seeds(tmp_path):
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((4, 3)).astype(np.float32)
    t = [_store(tmp_path / "t0", rows, "ckpt0")]
    with pytest.raises(StoreMismatchError, match="checkpoint"):
        score_stores(t, [_store(tmp_path / "v0", rows, "ckpt1")], ["a"] * 4, [1.0])
    with pytest.raises(StoreMismatchError, match="seed"):
        score_stores(t, [_store(tmp_path / "v1", rows, "ckpt0", seed=5)], ["a"] * 4, [1.0])
