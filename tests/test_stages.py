"""Stage bookkeeping without any model: fingerprints propagate downstream, stale outputs are never mixed, damaged
outputs are found and redone with exactly their dependents, and a damaged run.json costs nothing."""

import json

import pytest

from rose_pl.errors import StaleOutputError
from rose_pl.layout import RunLayout
from rose_pl.pipeline.records import Records
from rose_pl.pipeline.stages import RunManifest, Stage, plan, run_stages


def graph(root, log, a_value=1, b_value=2):
    """a -> c -> d, and b alone; each stage writes its own file (d a folder with two files)."""

    def write(name, text=None):
        def action():
            # Outputs of a finished run under another configuration are gone before a stage runs again.
            assert not (root / name).exists(), f"stale output {name} was not removed"
            log.append(name)
            if name == "d":
                (root / "d").mkdir()
                (root / "d" / "x.bin").write_bytes(b"x" * 1000)
                (root / "d" / "resume").mkdir()
                (root / "d" / "resume" / "last.ckpt").write_text("scratch")
            else:
                (root / name).write_text(text or name)
        return action

    return [
        Stage("a", {"v": a_value}, write("a"), outputs=["a"]),
        Stage("b", {"v": b_value}, write("b"), outputs=["b"]),
        Stage("c", {}, write("c"), depends=["a"], outputs=["c"]),
        Stage("d", {}, write("d"), depends=["c"], outputs=["d"]),
    ]


def test_a_finished_graph_is_skipped_on_rerun(tmp_path):
    log = []
    assert run_stages(tmp_path, graph(tmp_path, log)) == {"a": "ran", "b": "ran", "c": "ran", "d": "ran"}
    assert run_stages(tmp_path, graph(tmp_path, log)) == dict.fromkeys("abcd", "skipped")
    assert log == ["a", "b", "c", "d"]
    record = Records(tmp_path).read("d")
    assert record["status"] == "complete" and set(record["files"]) == {"d/x.bin"}  # resume/ is scratch
    assert json.loads(RunLayout(tmp_path).manifest.read_text())["stages"]["d"]["status"] == "complete"


def test_an_upstream_change_makes_its_dependents_stale(tmp_path):
    log = []
    run_stages(tmp_path, graph(tmp_path, log))
    with pytest.raises(StaleOutputError, match=r"\['a', 'c', 'd'\]") as info:
        run_stages(tmp_path, graph(tmp_path, log, a_value=5))
    assert "v: 1 -> 5" in str(info.value)  # the message says what changed
    assert log == ["a", "b", "c", "d"]  # refused before anything ran
    assert run_stages(tmp_path, graph(tmp_path, log, a_value=5), on_change="redo") == {
        "a": "ran", "b": "skipped", "c": "ran", "d": "ran"}


def test_a_stage_that_died_is_resumed_and_one_from_another_config_starts_clean(tmp_path):
    log = []
    run_stages(tmp_path, graph(tmp_path, log)[:1])
    records = Records(tmp_path)
    records.running("b", "0000")  # died under another configuration
    (tmp_path / "b").write_text("partial output of another configuration")
    result = run_stages(tmp_path, graph(tmp_path, log))
    assert result == {"a": "skipped", "b": "ran", "c": "ran", "d": "ran"}
    assert (tmp_path / "b").read_text() == "b"


@pytest.mark.parametrize("damage", ["truncate", "delete_file", "delete_folder", "empty", "replace"])
def test_a_damaged_output_is_redone_with_exactly_its_dependents(tmp_path, damage):
    log = []
    run_stages(tmp_path, graph(tmp_path, log))
    target = tmp_path / "d" / "x.bin"
    if damage == "truncate":
        target.write_bytes(b"x" * 100)
    elif damage == "delete_file":
        target.unlink()
    elif damage == "delete_folder":
        import shutil
        shutil.rmtree(tmp_path / "d")
    elif damage == "empty":
        target.write_bytes(b"")
    else:  # same size, other bytes
        target.write_bytes(b"y" * 1000)
    found = plan(tmp_path, graph(tmp_path, []))
    assert found.states == {"a": "done", "b": "done", "c": "done", "d": "damaged"}
    assert str(tmp_path / "d") in found.reasons["d"][0]
    log.clear()
    assert run_stages(tmp_path, graph(tmp_path, log)) == {"a": "skipped", "b": "skipped", "c": "skipped", "d": "ran"}
    assert log == ["d"] and target.read_bytes() == b"x" * 1000


def test_damage_upstream_redoes_the_dependents_too(tmp_path):
    log = []
    run_stages(tmp_path, graph(tmp_path, log))
    (tmp_path / "a").write_text("")  # an emptied file
    log.clear()
    assert run_stages(tmp_path, graph(tmp_path, log)) == {"a": "ran", "b": "skipped", "c": "ran", "d": "ran"}
    assert log == ["a", "c", "d"]


def test_removing_scratch_folders_does_not_count_as_damage(tmp_path):
    run_stages(tmp_path, graph(tmp_path, []))
    (tmp_path / "d" / "resume" / "last.ckpt").unlink()
    assert set(plan(tmp_path, graph(tmp_path, [])).states.values()) == {"done"}


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_a_damaged_run_json_is_rebuilt_from_the_records_and_nothing_is_redone(tmp_path, damage):
    log = []
    run_stages(tmp_path, graph(tmp_path, log))
    manifest = RunLayout(tmp_path).manifest
    if damage == "truncate":
        manifest.write_text(manifest.read_text()[:40])
    elif damage == "garbage":
        manifest.write_text("[1, 2")
    else:
        manifest.unlink()
    assert run_stages(tmp_path, graph(tmp_path, log)) == dict.fromkeys("abcd", "skipped")
    assert log == ["a", "b", "c", "d"]
    assert set(json.loads(manifest.read_text())["stages"]) == set("abcd")


def test_outputs_without_a_record_are_not_resumed_into(tmp_path):
    log = []
    run_stages(tmp_path, graph(tmp_path, log))
    Records(tmp_path).remove("b")
    (tmp_path / "b").write_text("of unknown origin")
    found = plan(tmp_path, graph(tmp_path, []))
    assert found.states["b"] == "restart" and "no record" in found.reasons["b"][0]
    assert run_stages(tmp_path, graph(tmp_path, log))["b"] == "ran"
    assert (tmp_path / "b").read_text() == "b"


def test_a_stage_recorded_complete_elsewhere_counts_as_done(tmp_path):
    """What StageRecorder does when a stage's YAML is run by hand: the next run adopts it."""
    log = []
    stages = graph(tmp_path, log)
    run_stages(tmp_path, stages[:1])
    found = plan(tmp_path, graph(tmp_path, []))
    (tmp_path / "b").write_text("b")
    Records(tmp_path).complete("b", next(s for s in found.stages if s.name == "b").fingerprint, ["b"])
    assert run_stages(tmp_path, graph(tmp_path, log))["b"] == "skipped"


def test_a_failed_stage_is_recorded_failed_not_running(tmp_path):
    def boom():
        raise RuntimeError("no memory")

    with pytest.raises(RuntimeError):
        run_stages(tmp_path, [Stage("a", {}, lambda: (tmp_path / "a").write_text("a"), outputs=["a"]),
                              Stage("b", {}, boom, outputs=["b"])])
    entry = RunManifest(tmp_path).entry("b")
    assert entry["status"] == "failed" and "no memory" in entry["error"]
    assert RunManifest(tmp_path).entry("a")["status"] == "complete"


def test_a_dependency_must_come_first(tmp_path):
    with pytest.raises(ValueError, match="depends on"):
        run_stages(tmp_path, [Stage("c", {}, lambda: None, depends=["a"])])
