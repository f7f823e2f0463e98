import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "ROSE_PL_TOKEN_CACHE" not in os.environ:  # token caches of DataModules used outside a run: not the user's
    import tempfile

    os.environ["ROSE_PL_TOKEN_CACHE"] = tempfile.mkdtemp(prefix="rose_pl_token_cache_")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def no_leaked_launcher_variables():
    """A test that leaves a process-group variable behind fails itself: every later DDP run started from pytest
    would inherit it and wait for a master that is not there."""
    from rose_pl.pipeline.nodes import LAUNCHER_VARS

    before = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    yield
    after = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    assert after == before, f"the test changed launcher variables: {before} -> {after}"


@pytest.fixture(scope="session")
def tokenizer():
    from rose_pl.testing import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture
def tiny_model():
    from rose_pl.testing import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny model + tokenizer saved as a local Hugging Face folder."""
    from rose_pl.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def rose_validation_dir():
    """The ROSE paper's few-shot validation data, present on developer machines and CI, not shipped."""
    from pathlib import Path

    here = Path(__file__).resolve().parents[1]
    for candidate in (here.parent / "shared" / "data" / "rose_validation", here / ".." / "shared" / "data" / "rose_validation"):
        if candidate.is_dir():
            return candidate
    pytest.skip("shared/data/rose_validation not present on this machine")


@pytest.fixture(scope="session", autouse=True)
def the_repository_stays_clean():
    """Tests write under tmp_path only: a stray file in the repository (a Lightning config.yaml, logs) is an error."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    before = {p.name for p in root.iterdir()}
    yield
    new = sorted({p.name for p in root.iterdir()} - before - {".pytest_cache", "runs"})
    assert not new, f"tests left files in the repository: {new}"
