"""Feature store: round trip, resume, refusal of mismatched metadata, truncation, and real Lightning runs
(killed mid-way and resumed; 2-process DDP) that must write the same bytes as one uninterrupted run."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap

import lightning.pytorch as L
import numpy as np
import pytest
import torch

from rose_pl.errors import ConfigError, StoreMismatchError
from rose_pl.features.store import (
    COMPLETE_FILE,
    FEATURES_FILE,
    META_FILE,
    WRITTEN_FILE,
    FeatureStore,
    FeatureStoreWriter,
    atomic_write_json,
    check_compatible,
)

DIM = 16
META = {"module": {"model": "tiny", "checkpoint": "epoch-1", "mode": "sft"},
        "projector": {"kind": "countsketch", "dim": DIM, "seed": 0, "normalize": True},
        "dataset_fingerprint": "abc"}
NUM_ROWS = 37  # predict runs: not a multiple of the batch size or of the world size
BATCH_SIZE = 4
CRASH_AFTER = 3  # batches written before the process kills itself
SUBPROCESS_TIMEOUT = 180


def _features(n, seed=0):
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


def test_round_trip_rows_land_at_their_indices(tmp_path):
    feats = _features(10)
    store = FeatureStore.create(tmp_path / "s", 10, DIM, META)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    store.write(perm[:6], feats[perm[:6]])
    store.write(perm[6:].numpy(), feats[perm[6:]].numpy())
    assert store.missing_indices().size == 0 and not store.is_complete
    store.finalize()
    store.close()
    opened = FeatureStore.open(tmp_path / "s", expected_meta=META)
    assert opened.is_complete and opened.num_rows == 10 and opened.dim == DIM
    out = opened.features()
    assert out.dtype == np.float16 and out.shape == (10, DIM)
    np.testing.assert_array_equal(out, feats.numpy().astype(np.float16))
    assert opened.meta["projector"]["seed"] == 0 and opened.meta["dtype"] == "float16"
    assert sorted(os.listdir(tmp_path / "s")) == sorted([META_FILE, FEATURES_FILE, WRITTEN_FILE, COMPLETE_FILE])


def test_float32_store_keeps_exact_values(tmp_path):
    feats = _features(4)
    with FeatureStore.create(tmp_path / "s", 4, DIM, META, dtype="float32") as store:
        store.write(range(4), feats)
        store.finalize()
    np.testing.assert_array_equal(FeatureStore.open(tmp_path / "s").features(), feats.numpy())


def test_create_on_equal_metadata_resumes_and_reports_missing_rows(tmp_path):
    feats = _features(8)
    with FeatureStore.create(tmp_path / "s", 8, DIM, META) as store:
        store.write([5, 1, 6], feats[[5, 1, 6]])
    with FeatureStore.create(tmp_path / "s", 8, DIM, META) as store:
        assert store.missing_indices().tolist() == [0, 2, 3, 4, 7]
        assert store.written_indices().tolist() == [1, 5, 6]
        with pytest.raises(StoreMismatchError, match=r"5 of 8 rows are not written, first ones: \[0, 2, 3, 4, 7\]"):
            store.finalize()
        with pytest.raises(StoreMismatchError, match="not complete"):
            store.features()
        partial = store.features(allow_incomplete=True)
        np.testing.assert_array_equal(partial[[1, 5, 6]], feats[[1, 5, 6]].numpy().astype(np.float16))
        assert not partial[[0, 2]].any()
        store.write([0, 2, 3, 4, 7], feats[[0, 2, 3, 4, 7]])
        store.finalize()
    np.testing.assert_array_equal(FeatureStore.open(tmp_path / "s").features(), feats.numpy().astype(np.float16))


@pytest.mark.parametrize("key, value", [
    ("projector.seed", 1), ("projector.dim", 32), ("projector.kind", "gaussian"), ("dataset_fingerprint", "xyz"),
])
def test_mismatched_metadata_is_refused_naming_the_key(tmp_path, key, value):
    with FeatureStore.create(tmp_path / "s", 8, DIM, META) as store:
        store.write([0], _features(1))
    other = json.loads(json.dumps(META))
    section, _, leaf = key.rpartition(".")
    (other[section] if section else other)[leaf] = value
    with pytest.raises(StoreMismatchError, match=key.replace(".", r"\.")) as info:
        FeatureStore.create(tmp_path / "s", 8, DIM, other)
    assert "overwrite=True" in str(info.value)
    with pytest.raises(StoreMismatchError, match=key.replace(".", r"\.")):
        FeatureStore.open(tmp_path / "s", expected_meta=other)
    with pytest.raises(StoreMismatchError, match=key.replace(".", r"\.")):
        check_compatible(META, other, keys=("projector", "dim", "dataset_fingerprint"))
    with FeatureStore.create(tmp_path / "s", 8, DIM, other, overwrite=True) as fresh:
        assert fresh.written_indices().size == 0 and fresh.meta[section or leaf] == other[section or leaf]


def test_mismatch_lists_every_differing_key_with_both_values(tmp_path):
    FeatureStore.create(tmp_path / "s", 8, DIM, META).close()
    other = {**META, "projector": {**META["projector"], "seed": 3}, "dataset_fingerprint": "new"}
    with pytest.raises(StoreMismatchError) as info:
        FeatureStore.create(tmp_path / "s", 9, DIM, other)
    text = str(info.value)
    for line in ("projector.seed: stored 0, requested 3", "dataset_fingerprint: stored 'abc', requested 'new'",
                 "num_rows: stored 8, requested 9"):
        assert line in text


def test_overwrite_discards_only_mismatched_or_damaged_stores(tmp_path):
    with FeatureStore.create(tmp_path / "s", 8, DIM, META) as store:
        store.write([0], _features(1))
    with FeatureStore.create(tmp_path / "s", 8, DIM, META, overwrite=True) as store:
        assert store.written_indices().tolist() == [0]  # same metadata: resumed, not discarded
    os.truncate(tmp_path / "s" / FEATURES_FILE, 10)
    with pytest.raises(StoreMismatchError, match=FEATURES_FILE):
        FeatureStore.create(tmp_path / "s", 8, DIM, META)
    with FeatureStore.create(tmp_path / "s", 8, DIM, META, overwrite=True) as store:
        assert store.written_indices().size == 0


def test_check_compatible_compares_projector_and_dim_only():
    check_compatible(META, {**META, "module": {"mode": "dpo"}, "dataset_fingerprint": "other"})
    with pytest.raises(StoreMismatchError, match="projector.normalize"):
        check_compatible(META, {**META, "projector": {**META["projector"], "normalize": False}})


@pytest.mark.parametrize("name", [FEATURES_FILE, WRITTEN_FILE])
def test_truncated_file_is_detected_naming_the_file(tmp_path, name):
    FeatureStore.create(tmp_path / "s", 8, DIM, META).close()
    path = tmp_path / "s" / name
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(StoreMismatchError, match=f"{name}: .*expected"):
        FeatureStore.open(tmp_path / "s")


def test_invalid_writes_and_arguments_are_refused(tmp_path):
    with FeatureStore.create(tmp_path / "s", 8, DIM, META) as store:
        with pytest.raises(StoreMismatchError, match="dim 16"):
            store.write([0], torch.zeros(1, DIM + 1))
        with pytest.raises(IndexError, match=r"\[8\]"):
            store.write([8], torch.zeros(1, DIM))
        with pytest.raises(ValueError, match="duplicate"):
            store.write([1, 1], torch.zeros(2, DIM))
        with pytest.raises(ValueError, match=r"rows \[2\] overflow float16"):
            store.write([2], torch.full((1, DIM), 1e5))
        assert store.written_indices().size == 0
    with pytest.raises(PermissionError):
        FeatureStore.open(tmp_path / "s").write([0], torch.zeros(1, DIM))
    with pytest.raises(ConfigError) as info:
        FeatureStore.create(tmp_path / "t", -1, 0, {"dim": 3}, dtype="int8")
    assert len(info.value.problems) == 4
    with pytest.raises(FileNotFoundError, match="not a feature store"):
        FeatureStore.open(tmp_path / "nowhere")


def test_atomic_json_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": (1, 2)})
    atomic_write_json(tmp_path / "x.json", {"a": [3]})
    assert os.listdir(tmp_path) == ["x.json"] and json.loads((tmp_path / "x.json").read_text()) == {"a": [3]}


# ---- real Lightning runs ------------------------------------------------------------------------------
FAKE_PREDICT = '''
"""A fake gradient module and datamodule: sample i's 'gradient' is a fixed function of i."""
import os, signal, sys
from pathlib import Path

import lightning.pytorch as L
import torch

from rose_pl.features.projection import ProjectionCallback
from rose_pl.features.store import FeatureStoreWriter

SHAPES = {"blocks.0.lora_A.weight": (4, 24), "blocks.0.lora_B.weight": (40, 4), "head.bias": (19,)}
ZERO_ROW = 3  # its gradient is zero: the stored row must stay zero


def fake_grad(i, k, shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1000 * i + k))
    return g * 0 if i == ZERO_ROW else g


class FakeGradientModule(L.LightningModule):
    def __init__(self, crash_after=None):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.gradient_sink, self.crash_after = None, crash_after

    def gradient_shapes(self):
        return {n: torch.Size(s) for n, s in SHAPES.items()}

    def feature_metadata(self):
        return {"model": "fake", "checkpoint": "epoch-1", "mode": "sft"}

    def predict_step(self, batch, batch_idx):
        if self.crash_after is not None and batch_idx == self.crash_after:
            os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no cleanup, no finally blocks
        index = batch["index"]
        self.gradient_sink.begin(len(index), self.device)
        for k, (name, shape) in reversed(list(enumerate(SHAPES.items()))):
            self.gradient_sink.add(name, torch.stack([fake_grad(int(i), k, shape) for i in index]))
        return {"index": index, "features": self.gradient_sink.finish()}


class FakeData(L.LightningDataModule):
    def __init__(self, num_rows, batch_size, fingerprint="fake-v1", yield_rows=None, predict_indices=None):
        super().__init__()
        self.n, self.batch_size, self._fingerprint = num_rows, batch_size, fingerprint
        self.yield_rows, self.skip_indices = yield_rows, None
        if predict_indices is not None:
            self.predict_indices = predict_indices

    @property
    def num_examples(self):
        return self.n

    def fingerprint(self):
        return self._fingerprint

    def predict_dataloader(self):
        rows = self.yield_rows if self.yield_rows is not None else range(self.n)
        rows = [i for i in rows if i not in (self.skip_indices or ())][::-1]  # not in index order
        return torch.utils.data.DataLoader(rows, batch_size=self.batch_size,
                                           collate_fn=lambda b: {"index": torch.tensor(b)})


class LoggingWriter(FeatureStoreWriter):
    """Appends each batch's indices to log_dir/rank<k>.log to check which rows were computed."""

    def __init__(self, output_dir, log_dir=None, **kw):
        super().__init__(output_dir, **kw)
        self.log_dir = log_dir

    def write_on_batch_end(self, trainer, pl_module, prediction, *args, **kwargs):
        super().write_on_batch_end(trainer, pl_module, prediction, *args, **kwargs)
        if self.log_dir:
            with open(Path(self.log_dir) / f"rank{trainer.global_rank}.log", "a") as f:
                f.write(" ".join(str(int(i)) for i in prediction["index"]) + "\\n")


def run(out, log_dir=None, num_rows=37, batch_size=4, devices=1, crash_after=None, seed=0, data=None):
    torch.set_num_threads(1)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False,
                        callbacks=[ProjectionCallback(kind="countsketch", dim=16, seed=seed),
                                   LoggingWriter(out, log_dir)])
    trainer.predict(FakeGradientModule(crash_after), datamodule=data or FakeData(num_rows, batch_size),
                    return_predictions=False)


if __name__ == "__main__":
    out, log_dir, devices, crash_after = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    run(out, log_dir, devices=devices, crash_after=None if crash_after == "none" else int(crash_after))
'''


@pytest.fixture(scope="module")
def fake_predict(tmp_path_factory):
    """The fake predict script, written to disk (subprocesses run it) and imported (in-process tests)."""
    path = tmp_path_factory.mktemp("script") / "fake_predict.py"
    path.write_text(textwrap.dedent(FAKE_PREDICT))
    spec = importlib.util.spec_from_file_location("fake_predict", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def _run_script(script, out, log_dir, devices=1, crash_after=None):
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), str(out), str(log_dir), str(devices),
                           "none" if crash_after is None else str(crash_after)],
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env, cwd=script.parent)


def _logged_rows(log_dir):
    rows = {}
    for f in sorted(log_dir.glob("rank*.log")):
        rows[f.stem] = [int(i) for line in f.read_text().split("\n") if line for i in line.split()]
    return rows


@pytest.fixture(scope="module")
def reference_store(fake_predict, tmp_path_factory):
    """One uninterrupted single-process run."""
    root = tmp_path_factory.mktemp("reference")
    result = _run_script(fake_predict[0], root / "store", root / "logs")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "store"


def test_uninterrupted_run_writes_a_complete_normalized_store(reference_store):
    store = FeatureStore.open(reference_store)
    feats = store.features().astype(np.float32)
    assert store.is_complete and feats.shape == (NUM_ROWS, DIM)
    norms = np.linalg.norm(feats, axis=1)
    assert not feats[3].any()  # the zero gradient
    np.testing.assert_allclose(np.delete(norms, 3), 1.0, atol=2e-3)
    assert store.meta["projector"]["kind"] == "countsketch" and store.meta["projector"]["normalize"] is True
    assert store.meta["module"]["model"] == "fake" and store.meta["dataset_fingerprint"] == "fake-v1"


def test_killed_run_resumes_computing_only_missing_rows_and_matches_uninterrupted_bytes(
        fake_predict, reference_store, tmp_path):
    script, out = fake_predict[0], tmp_path / "store"
    crashed = _run_script(script, out, tmp_path / "logs1", crash_after=CRASH_AFTER)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    store = FeatureStore.open(out)
    assert not store.is_complete
    done = set(store.written_indices().tolist())
    assert len(done) == CRASH_AFTER * BATCH_SIZE
    assert done == set(sum(_logged_rows(tmp_path / "logs1").values(), []))

    resumed = _run_script(script, out, tmp_path / "logs2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    recomputed = sum(_logged_rows(tmp_path / "logs2").values(), [])
    assert sorted(recomputed) == sorted(set(range(NUM_ROWS)) - done)
    assert FeatureStore.open(out).is_complete
    assert (out / FEATURES_FILE).read_bytes() == (reference_store / FEATURES_FILE).read_bytes()


@pytest.mark.slow
def test_two_process_ddp_writes_the_same_bytes_as_one_process_each_row_once(fake_predict, reference_store, tmp_path):
    result = _run_script(fake_predict[0], tmp_path / "store", tmp_path / "logs", devices=2)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _logged_rows(tmp_path / "logs")
    assert set(rows) == {"rank0", "rank1"} and all(rows.values())
    everything = rows["rank0"] + rows["rank1"]
    assert sorted(everything) == list(range(NUM_ROWS))  # each row written exactly once
    assert FeatureStore.open(tmp_path / "store").is_complete
    assert (tmp_path / "store" / FEATURES_FILE).read_bytes() == (reference_store / FEATURES_FILE).read_bytes()


def test_writer_refuses_a_store_made_with_another_projector_seed(fake_predict, tmp_path):
    module = fake_predict[1]
    module.run(tmp_path / "store", num_rows=6)
    with pytest.raises(StoreMismatchError, match=r"projector\.seed: stored 0, requested 1"):
        module.run(tmp_path / "store", num_rows=6, seed=1)


def test_writer_reports_rows_never_predicted_and_records_dropped_rows(fake_predict, tmp_path):
    module = fake_predict[1]
    with pytest.raises(StoreMismatchError, match=r"2 of 6 rows are not written, first ones: \[1, 4\]"):
        module.run(tmp_path / "a", data=module.FakeData(6, 4, yield_rows=[0, 2, 3, 5]))
    # A datamodule that says which rows it yields (predict_indices) gets the others recorded as excluded.
    module.run(tmp_path / "b", data=module.FakeData(6, 4, yield_rows=[0, 2, 3, 5], predict_indices=[0, 2, 3, 5]))
    store = FeatureStore.open(tmp_path / "b")
    assert store.is_complete and store.excluded_indices().tolist() == [1, 4]
    assert not store.features()[[1, 4]].any()


def test_writer_needs_projection_or_feature_dim(fake_predict, tmp_path):
    module = fake_predict[1]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[FeatureStoreWriter(str(tmp_path / "s"))])
    with pytest.raises(ConfigError, match="feature_dim"):
        trainer.predict(module.FakeGradientModule(), datamodule=module.FakeData(4, 2), return_predictions=False)


def test_every_output_is_written_with_the_mode_open_would_give(tmp_path):
    import os

    from rose_pl.files import atomic_dir, atomic_write_text

    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_text(tmp_path / "a.txt", "a")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("x")
    (tmp_path / "plain.txt").write_text("p")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask
