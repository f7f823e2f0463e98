import json
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DistributedSampler

from rose_pl.data.encoding import IGNORE_INDEX
from rose_pl.data.datamodule import FeatureDataModule, SFTDataModule
from rose_pl.data.samplers import LengthGroupedSampler
from rose_pl.errors import ConfigError, DataFormatError


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from rose_pl.testing import byte_tokenizer

    path = tmp_path_factory.mktemp("byte_tokenizer")
    byte_tokenizer().save_pretrained(path)
    return str(path)


def write_pool(path, n=40):
    rows = [{"dataset": "toy", "id": f"toy_{i}",
             "messages": [{"role": "user", "content": "q" * (1 + i % 7)}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_preferences(path, n_tasks=3, shots=2):
    data = {f"Prompt {i} " + "p" * i: {"responses": [f" good {i}", f" bad {i}"], "pairs": [[0, 1]],
                                       "sft_target": f" good {i}", "rejected_target": f" bad {i}"}
            for i in range(n_tasks * shots)}
    path.write_text(json.dumps(data))
    return str(path)


def test_subset_is_seeded_and_of_the_requested_size(tmp_path, tokenizer_dir):
    pool = write_pool(tmp_path / "pool.jsonl")

    def subset(fraction, seed):
        dm = SFTDataModule(pool, tokenizer_dir, subset_fraction=fraction, subset_seed=seed)
        dm.setup("fit")
        return dm

    a, b, c = subset(0.25, 0), subset(0.25, 0), subset(0.25, 1)
    assert len(a.subset_indices) == 10 == len(a.train_dataset)
    assert a.subset_indices == b.subset_indices != c.subset_indices
    assert sorted(f["index"] for f in a.train_dataset) == a.subset_indices
    assert len(subset(0.001, 0).subset_indices) == 1  # at least one example


def test_setup_twice_reuses_the_tokenized_data(tmp_path, tokenizer_dir):
    dm = SFTDataModule(write_pool(tmp_path / "pool.jsonl"), tokenizer_dir)
    dm.setup("fit")
    first = dm.train_dataset
    dm.setup("validate")
    assert dm.train_dataset is first and dm.subset_indices is None


def test_train_batches_carry_row_indices_and_assistant_labels(tmp_path, tokenizer_dir):
    dm = SFTDataModule(write_pool(tmp_path / "pool.jsonl"), tokenizer_dir, batch_size=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, LengthGroupedSampler)
    seen = []
    for batch in loader:
        assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
        for row, index in zip(batch["labels"], batch["index"].tolist()):
            text = dm.tokenizer.decode(row[row != IGNORE_INDEX])
            assert text == f"a{index}</s>\n"
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(40))
    assert 0 <= dm.padding_fraction < 0.5


def test_train_sampler_follows_the_trainers_world(tmp_path, tokenizer_dir):
    dm = SFTDataModule(write_pool(tmp_path / "pool.jsonl"), tokenizer_dir, batch_size=2, shuffle_seed=3)
    dm.trainer = SimpleNamespace(world_size=4, global_rank=1)
    sampler = dm.train_dataloader().sampler
    assert (sampler.num_replicas, sampler.rank, sampler.seed, sampler.batch_size) == (4, 1, 3, 2)
    dm = SFTDataModule(write_pool(tmp_path / "pool.jsonl"), tokenizer_dir, group_by_length=False)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0)
    sampler = dm.train_dataloader().sampler
    assert type(sampler) is DistributedSampler and sampler.num_replicas == 2 and sampler.shuffle


def headers_only_row(content="lost"):
    """A row whose chat headers alone (system + user + assistant, 36 byte tokens) outgrow max_seq_length=30:
    cutting the prompt cannot save it. A plain prompt/completion row needs 24 + its answer."""
    return {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x" * 100},
                         {"role": "assistant", "content": content}]}


def test_a_long_prompt_loses_prompt_tokens_not_the_row(tmp_path, tokenizer_dir):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"prompt": "x" * 100, "completion": "kept"}) + "\n")
    dm = SFTDataModule(str(pool), tokenizer_dir, max_seq_length=30, on_empty="error")
    dm.setup("fit")
    (row,) = list(dm.train_dataset)
    assert len(row["input_ids"]) == 30 and dm.tokenizer.decode(row["labels"][row["labels"] >= 0]) == "kept</s>\n"


def test_empty_loss_row_raises_naming_file_and_line(tmp_path, tokenizer_dir):
    pool = tmp_path / "pool.jsonl"
    rows = [{"prompt": "short", "completion": "ok"}, headers_only_row()]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = SFTDataModule(str(pool), tokenizer_dir, max_seq_length=30, on_empty="error")
    with pytest.raises(DataFormatError, match=re.escape(f"{pool}, line 2: id 'pool_1': no loss token")):
        dm.setup("fit")


def test_dropped_rows_are_counted_and_reported(tmp_path, tokenizer_dir, caplog):
    pool = tmp_path / "pool.jsonl"
    rows = [headers_only_row() if i in (1, 4) else {"prompt": "x" * 100, "completion": "c"} for i in range(6)]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = SFTDataModule(str(pool), tokenizer_dir, max_seq_length=30)  # dropping is the default
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert [(d.id, d.where) for d in dm.dropped] == [("pool_1", 2), ("pool_4", 5)]
    assert len(dm.train_dataset) == 4
    assert "dropped 2 of 6 rows" in caplog.text and "pool_1, pool_4" in caplog.text and str(pool) in caplog.text


def test_bad_arguments_are_reported_together(tokenizer_dir):
    with pytest.raises(ConfigError) as info:
        SFTDataModule("x.jsonl", tokenizer_dir, batch_size=0, subset_fraction=1.5, on_empty="skip")
    assert len(info.value.problems) == 3
    with pytest.raises(ConfigError, match="kind='sft'"):
        FeatureDataModule("x.jsonl", tokenizer_dir, shots_per_task=2)


def test_resuming_on_other_data_is_refused(tmp_path, tokenizer_dir):
    pool = write_pool(tmp_path / "pool.jsonl")
    dm = SFTDataModule(pool, tokenizer_dir, subset_fraction=0.5)
    dm.setup("fit")
    state = dm.state_dict()
    other = SFTDataModule(pool, tokenizer_dir, subset_fraction=0.5)
    other.load_state_dict(state)
    other.setup("fit")  # same data: fine
    other = SFTDataModule(pool, tokenizer_dir, subset_fraction=0.5, subset_seed=1)
    other.setup("fit")
    with pytest.raises(ConfigError, match="other data"):
        other.load_state_dict(state)


def test_feature_preference_rows_carry_task_ids_and_original_indices(tmp_path, tokenizer_dir):
    path = write_preferences(tmp_path / "prefs.json")
    dm = FeatureDataModule(path, tokenizer_dir, kind="preference", shots_per_task=2, batch_size=4)
    assert dm.num_examples == 6
    assert dm.task_ids == ["prefs/0", "prefs/0", "prefs/1", "prefs/1", "prefs/2", "prefs/2"]
    assert dm.ids == [f"prefs_{i}" for i in range(6)]
    batches = list(dm.predict_dataloader())
    seen = [i for b in batches for i in b["index"].tolist()]
    assert seen == [5, 4, 3, 2, 1, 0]  # longest prompt first
    for batch in batches:
        for row, index in zip(batch["rejected_labels"], batch["index"].tolist()):
            assert dm.tokenizer.decode(row[row != IGNORE_INDEX]) == f" bad {index}</s>"  # the raw response


def test_preference_sft_kind_trains_on_prompt_and_chosen(tmp_path, tokenizer_dir):
    dm = FeatureDataModule(write_preferences(tmp_path / "prefs.json"), tokenizer_dir, kind="preference_sft",
                           shots_per_task="all")
    batch = next(iter(dm.predict_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    assert dm.task_ids == ["prefs"] * 6
    row = batch["labels"][0]
    assert dm.tokenizer.decode(row[row != IGNORE_INDEX]) == f"good {batch['index'][0].item()}</s>\n"


def test_skip_indices_leave_rows_out_but_keep_indices(tmp_path, tokenizer_dir):
    dm = FeatureDataModule(write_pool(tmp_path / "pool.jsonl", n=20), tokenizer_dir, batch_size=3)
    dm.skip_indices = {0, 5, 19}
    seen = [i for b in dm.predict_dataloader() for i in b["index"].tolist()]
    assert sorted(seen) == sorted(set(range(20)) - {0, 5, 19})
    assert seen == dm.predict_indices.tolist()
    dm.skip_indices = {20}
    with pytest.raises(ConfigError, match="skip_indices"):
        dm.predict_dataloader()


def test_feature_drop_keeps_the_index_space(tmp_path, tokenizer_dir):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(headers_only_row() if i == 2 else {"prompt": "x", "completion": "c"}) + "\n"
                            for i in range(5)))
    dm = FeatureDataModule(str(pool), tokenizer_dir, max_seq_length=30)
    assert dm.num_examples == 5 and [d.id for d in dm.dropped] == ["pool_2"]
    assert sorted(dm.predict_indices) == [0, 1, 3, 4]


def test_fingerprint_changes_with_bytes_and_settings(tmp_path, tokenizer_dir):
    path = write_preferences(tmp_path / "prefs.json")
    def fp(**kw):
        return FeatureDataModule(path, tokenizer_dir, **{"kind": "preference", "shots_per_task": 2, **kw}).fingerprint()

    base = fp()
    assert base == fp()
    others = [fp(kind="preference_sft"), fp(max_seq_length=1000), fp(shots_per_task=3), fp(all_pairs=True),
              fp(preference_format="chat"), fp(max_prompt_length=100), fp(prompt_truncation="keep_end"),
              fp(chat_template="chatml"), fp(on_invalid_pair="drop")]
    assert len({base} | set(others)) == 1 + len(others)
    write_preferences(tmp_path / "prefs.json", n_tasks=2)
    assert fp() != base


def test_shared_rose_preferences_featurize(rose_validation_dir, tokenizer_dir):
    dm = FeatureDataModule(str(rose_validation_dir / "se" / "se_2_shot_preference.json"), tokenizer_dir,
                           kind="preference", shots_per_task=2, max_seq_length=4096, batch_size=16)
    seen = [i for b in dm.predict_dataloader() for i in b["index"].tolist()]
    assert sorted(seen) == list(range(20)) and len(set(dm.task_ids)) == 10


class _IndexModule(L.LightningModule):
    """Trains one scalar and returns batch indices at predict time: enough to run the Trainer loops."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return self.w * batch["attention_mask"].float().mean()

    def predict_step(self, batch, batch_idx):
        return batch["index"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_keeps_our_samplers_in_fit_and_predict(tmp_path, tokenizer_dir):
    pool = write_pool(tmp_path / "pool.jsonl", n=12)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(_IndexModule(), datamodule=SFTDataModule(pool, tokenizer_dir, batch_size=4))
    assert isinstance(trainer.train_dataloader.sampler, LengthGroupedSampler)
    dm = FeatureDataModule(pool, tokenizer_dir, batch_size=5)
    dm.skip_indices = {3}
    out = trainer.predict(_IndexModule(), datamodule=dm)
    assert sorted(torch.cat(out).tolist()) == [i for i in range(12) if i != 3]
