"""Any Hugging Face dataset as the pool, read and tokenized once into a memory-mapped cache: JSONL, Parquet, saved
and hub-style datasets give the same rows; the cache equals the encoder row for row; bad rows are named by dataset
and row; selections are written in the pool's own format and only the rows shown are read."""

import json
from pathlib import Path

import numpy as np
import pytest

from rose_pl.config import DatasetSpec
from rose_pl.data.cache import CacheSettings, TokenCache, build_cache
from rose_pl.data.encoding import Encoder
from rose_pl.data.formats import read_instructions
from rose_pl.data.sources import HFSource, open_source
from rose_pl.errors import DataFormatError

DATA = Path(__file__).resolve().parents[1] / "data"


def pool_rows() -> list[dict]:
    return [json.loads(line) for line in (DATA / "pool.jsonl").read_text().splitlines()]


def messy_rows() -> list[dict]:
    """Long, messy rows: a 60 KB prompt, unicode, a system turn, empty user turns, multi-turn, a repeated id."""
    return [
        {"dataset": "long", "id": "long_0", "messages": [
            {"role": "user", "content": "Résumé ✓ " + "word " * 12000},
            {"role": "assistant", "content": "short answer"}]},
        {"dataset": "sys", "id": "sys_0", "messages": [
            {"role": "system", "content": "Be brief.\n\n\t"}, {"role": "user", "content": ""},
            {"role": "assistant", "content": "🙂 " * 300}]},
        {"dataset": "multi", "id": "multi_0", "messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c" * 3000}, {"role": "assistant", "content": "d\n" * 400}]},
        {"prompt": "no id or dataset", "completion": "fine"},
        {"dataset": "sys", "id": "sys_0", "messages": [{"role": "user", "content": "again"},
                                                      {"role": "assistant", "content": "same id"}]},
    ]


def write_formats(root: Path, rows: list[dict]) -> dict[str, str]:
    """The same rows as JSONL, a Parquet file, and a save_to_disk folder with renamed columns."""
    import datasets

    (root / "pool.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    table = datasets.Dataset.from_list([{"dataset": r.get("dataset"), "id": r.get("id"),
                                         "messages": r.get("messages")} for r in rows])
    table.to_parquet(str(root / "pool.parquet"))
    renamed = datasets.Dataset.from_list([
        {"source": r["dataset"], "uid": r["id"],
         "conversation": [{"speaker": m["role"], "text": m["content"]} for m in r["messages"]]} for r in rows])
    renamed.save_to_disk(str(root / "saved"))
    return {"jsonl": str(root / "pool.jsonl"), "parquet": str(root / "pool.parquet"), "saved": str(root / "saved")}


SAVED_COLUMNS = {"messages": "conversation", "id": "uid", "dataset": "source", "role": "speaker", "content": "text"}


def spec(kind: str, paths: dict) -> DatasetSpec:
    return DatasetSpec(paths[kind], columns=SAVED_COLUMNS if kind == "saved" else None)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved"])
def test_every_source_reads_the_same_rows(tmp_path, kind):
    paths = write_formats(tmp_path, pool_rows())
    examples = read_instructions(spec(kind, paths))
    reference = read_instructions(paths["jsonl"])
    assert [(e.id, e.dataset, e.messages) for e in examples] == [(e.id, e.dataset, e.messages) for e in reference]
    source = open_source(spec(kind, paths))
    assert len(source) == 160 and source.format == {"jsonl": "jsonl", "parquet": "parquet", "saved": "arrow"}[kind]
    assert [r[1] if kind == "jsonl" else r[1] for r in next(source.batches(10, 12))] == (
        [11, 12] if kind == "jsonl" else ["row 10", "row 11"])


def test_a_hub_dataset_is_read_through_load_dataset(tmp_path):
    """The hub path (datasets.load_dataset with split and revision) on a local data folder, as offline as a hub id."""
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_formats(folder, pool_rows()[:12])
    (folder / "pool.jsonl").unlink()
    (folder / "saved").rename(tmp_path / "elsewhere")
    source = HFSource(DatasetSpec(str(folder), split="train"), local=False)
    assert len(source) == 12 and source.take([3])[0]["id"] == pool_rows()[3]["id"]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_bad_row_is_named_by_dataset_and_line_or_row(tmp_path, kind):
    import datasets

    rows = pool_rows()[:6]
    rows[4] = {"id": "broken", "messages": [{"role": "user", "content": "no answer"}]}
    if kind == "jsonl":
        path = tmp_path / "pool.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        where = f"{path}, line 5"
    else:
        path = tmp_path / "pool.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
        where = f"{path}, row 4"
    with pytest.raises(DataFormatError, match=f"{where}: no assistant message"):
        build_cache(path, "unused", CacheSettings(), tmp_path / "cache", tokenizer=_tokenizer())


def _tokenizer():
    from rose_pl.testing import byte_tokenizer

    return byte_tokenizer()


@pytest.mark.parametrize("num_proc", [1, 2])
def test_the_cache_equals_the_encoder_row_for_row_on_long_messy_rows(tmp_path, tokenizer_dir, num_proc, monkeypatch):
    import rose_pl.data.cache as cache_module

    monkeypatch.setattr(cache_module, "SHARD_ROWS", 4)  # several shards, built by several processes
    rows = pool_rows()[:11] + messy_rows()
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    settings = CacheSettings(max_seq_length=256, duplicate_ids="rename")
    cache = build_cache(path, tokenizer_dir, settings, tmp_path / "cache", num_proc=num_proc)
    encoder = Encoder(_tokenizer(), 256, "tulu", "keep_start", None)
    examples = read_instructions(path, duplicate_ids="rename")
    assert cache.num_rows == len(examples) == 16
    for i, example in enumerate(examples):
        expected = encoder.encode_messages(example.messages)
        got = cache.row(i)
        assert got["input_ids"].tolist() == expected["input_ids"], example.id
        assert got["labels"].tolist() == expected["labels"], example.id
        assert cache.id(i) == example.id and cache.datasets([i]) == [example.dataset]
    assert cache.id(15) == "sys_0#2"  # the repeat, renamed in row order
    figures = cache.figures()
    assert figures["truncated_rows"] >= 2 and figures["truncated_tokens"] > 59000  # the 60 KB prompt was cut
    assert int(cache.truncated[11]) > 59000 and cache.where(11) == 12
    assert len((tmp_path / "cache" / "builds.jsonl").read_text().splitlines()) == 1
    assert build_cache(path, tokenizer_dir, settings, tmp_path / "cache").key == cache.key  # reused, not rebuilt
    assert len((tmp_path / "cache" / "builds.jsonl").read_text().splitlines()) == 1


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("byte_tokenizer")
    _tokenizer().save_pretrained(path)
    return str(path)


def test_a_killed_build_resumes_at_the_next_shard(tmp_path, tokenizer_dir, monkeypatch):
    import rose_pl.data.cache as cache_module

    monkeypatch.setattr(cache_module, "SHARD_ROWS", 16)
    real = cache_module._build_instruction_shard
    built = []

    def dies_at_the_third(source, tokenizer, settings, start, stop, folder):
        if len(built) == 2:
            raise KeyboardInterrupt
        built.append(start)
        real(source, tokenizer, settings, start, stop, folder)

    monkeypatch.setattr(cache_module, "_build_instruction_shard", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        build_cache(DATA / "pool.jsonl", tokenizer_dir, CacheSettings(), tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache" / "shards").iterdir()) == ["000000", "000001"]
    monkeypatch.setattr(cache_module, "_build_instruction_shard", real)
    calls = []
    monkeypatch.setattr(cache_module, "_build_instruction_shard", lambda *a: (calls.append(a[3]), real(*a)))
    cache = build_cache(DATA / "pool.jsonl", tokenizer_dir, CacheSettings(), tmp_path / "cache")
    assert calls == list(range(32, 160, 16)) and cache.num_rows == 160
    whole = build_cache(DATA / "pool.jsonl", tokenizer_dir, CacheSettings(), tmp_path / "whole")
    for name in ("tokens.bin", "loss.bin", "offsets.npy", "ids.bin"):
        assert (tmp_path / "cache" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert whole.key == cache.key


class CountingSource:
    """A Source that counts the rows it is asked for by index."""

    def __init__(self, source):
        self.inner, self.taken = source, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def take(self, indices):
        self.taken += list(indices)
        return self.inner.take(indices)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved"])
def test_a_selection_is_written_in_the_pools_own_format_reading_only_the_rows_shown(tmp_path, tokenizer_dir, kind):
    import datasets

    from rose_pl.data.table import PoolTable
    from rose_pl.selection.influence import InfluenceResult
    from rose_pl.selection.select import read_selection, select_and_write

    paths = write_formats(tmp_path, pool_rows())
    data = spec(kind, paths)
    cache = build_cache(data, tokenizer_dir, CacheSettings(max_seq_length=256), tmp_path / f"cache_{kind}")
    source = CountingSource(open_source(data))
    pool = PoolTable.from_cache(cache, source)
    scores = np.random.default_rng(0).random(160).astype(np.float32)
    result = InfluenceResult(scores, scores[:, None], np.zeros(160, dtype=np.int64), ["t"], np.ones(1))
    out = tmp_path / f"selection_{kind}"
    select_and_write(out, result, pool, source=data.name, fraction=0.05, k=None, seed=0, title="test")
    chosen = np.argsort(-scores, kind="stable")[:8].tolist()
    assert [r["index"] for r in read_selection(out / "selected.jsonl")["selected"]] == chosen
    assert len(source.taken) <= 8 + 5  # the selected rows, then the report's top examples
    if kind == "jsonl":
        lines = (out / "selected.jsonl").read_text().splitlines()
        assert lines == [(DATA / "pool.jsonl").read_text().splitlines()[i] for i in chosen]  # byte for byte
    elif kind == "parquet":
        table = datasets.Dataset.from_parquet(str(out / "selected.parquet"))
        assert table["rose_pl_index"] == chosen and table["id"] == [pool_rows()[i]["id"] for i in chosen]
    else:
        saved = datasets.load_from_disk(str(out / "selected"))
        assert saved["rose_pl_index"] == chosen and saved["uid"] == [pool_rows()[i]["id"] for i in chosen]


def test_the_papers_validation_files_cache_as_pairs_and_as_their_sft_view(tmp_path, tokenizer_dir,
                                                                           rose_validation_dir):
    path = rose_validation_dir / "se" / "se_2_shot_preference.json"
    pairs = build_cache(path, tokenizer_dir, CacheSettings("preference", 512, shots_per_task=2,
                                                           preference_format="rose", on_invalid_pair="drop"),
                        tmp_path / "pairs")
    sft = build_cache(path, tokenizer_dir, CacheSettings("preference_sft", 512, shots_per_task=2,
                                                         on_invalid_pair="drop"), tmp_path / "sft")
    assert pairs.num_rows == sft.num_rows == 20 and len(set(pairs.tasks())) == 10
    assert set(pairs.row(0)) == {"index", "chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                 "rejected_labels"}
    assert TokenCache(tmp_path / "pairs").key == pairs.key


@pytest.mark.slow
def test_a_run_gives_the_same_selections_from_jsonl_parquet_and_a_saved_dataset_tokenizing_the_pool_once(
        tmp_path, tiny_model_dir):
    from test_pipeline import run, run_config, small_inputs, target

    small_inputs(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "pool.jsonl").read_text().splitlines()]
    (tmp_path / "formats").mkdir()
    paths = write_formats(tmp_path / "formats", rows)
    selected = {}
    for kind in ("jsonl", "parquet", "saved"):
        pool = spec(kind, paths)
        config = run_config(tmp_path, tiny_model_dir, f"run_{kind}", validation=None, test=None,
                            pool=pool.path if pool.columns is None else {"path": pool.path, "columns": pool.columns},
                            targets={t: target(tmp_path, t, test=False) for t in ("cooking", "python")},
                            methods=["rose", "random", "bm25"], **{"finetune.methods": []})
        result = run(config)
        out = tmp_path / f"run_{kind}"
        # Two checkpoints, two targets, several stages read the pool: it was read and tokenized once.
        assert result["cache/pool"] == "ran"
        assert len((out / "cache" / "pool" / "builds.jsonl").read_text().splitlines()) == 1
        selected[kind] = {f"{t}/{m}": [(r["index"], r["id"]) for r in json.loads(
            (out / "targets" / t / "selection" / m / "selection.json").read_text())["selected"]]
            for t in ("cooking", "python") for m in ("rose", "random", "bm25")}
        written = {"jsonl": "selected.jsonl", "parquet": "selected.parquet", "saved": "selected"}[kind]
        assert (out / "targets" / "python" / "selection" / "rose" / written).exists()
    assert selected["jsonl"] == selected["parquet"] == selected["saved"]
