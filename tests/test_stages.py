"""Stage bookkeeping without any model: fingerprints propagate downstream, stale outputs are never mixed."""

import pytest

from rose_pl.errors import StaleOutputError
from rose_pl.pipeline.stages import RunManifest, Stage, run_stages


def graph(root, log, a_value=1, b_value=2):
    def write(name):
        def action():
            # Outputs of a finished run under another configuration are gone before a stage runs again.
            assert not (root / name).exists(), f"stale output {name} was not removed"
            log.append(name)
            (root / name).write_text(name)
        return action

    return [
        Stage("a", {"v": a_value}, write("a"), outputs=["a"]),
        Stage("b", {"v": b_value}, write("b"), outputs=["b"]),
        Stage("c", {}, write("c"), depends=["a"], outputs=["c"]),
    ]


def test_a_finished_graph_is_skipped_on_rerun(tmp_path):
    log = []
    assert run_stages(tmp_path, graph(tmp_path, log)) == {"a": "ran", "b": "ran", "c": "ran"}
    assert run_stages(tmp_path, graph(tmp_path, log)) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    assert log == ["a", "b", "c"]


def test_an_upstream_change_makes_its_dependents_stale(tmp_path):
    log = []
    run_stages(tmp_path, graph(tmp_path, log))
    with pytest.raises(StaleOutputError, match=r"\['a', 'c'\]"):
        run_stages(tmp_path, graph(tmp_path, log, a_value=5))
    assert log == ["a", "b", "c"]  # refused before anything ran
    assert run_stages(tmp_path, graph(tmp_path, log, a_value=5), on_change="redo") == {
        "a": "ran", "b": "skipped", "c": "ran"}


def test_a_stage_that_died_is_run_again_and_one_from_another_config_starts_clean(tmp_path):
    log = []
    stages = graph(tmp_path, log)
    run_stages(tmp_path, stages[:1])
    manifest = RunManifest(tmp_path)
    manifest.mark("b", "0000", "running")  # died under another configuration
    (tmp_path / "b").write_text("partial output of another configuration")
    result = run_stages(tmp_path, graph(tmp_path, log))
    assert result == {"a": "skipped", "b": "ran", "c": "ran"}
    assert (tmp_path / "b").read_text() == "b"


def test_a_dependency_must_come_first(tmp_path):
    with pytest.raises(ValueError, match="depends on"):
        run_stages(tmp_path, [Stage("c", {}, lambda: None, depends=["a"])])
