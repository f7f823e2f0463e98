"""`run` across several nodes, simulated on one machine: two `rose-pl run` processes (NODE_RANK 0 and 1, gloo on
CPU) with a shared output folder equal one process; a killed node stops the other with a clear error, and a rerun
resumes; different output folders fail at start; a stage run by hand counts; progress counts global rows once."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_pipeline import manifest_stages, run, run_config, target

TARGETS = ("cooking", "python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(root: Path, model_dir: Path, out: str, nodes: int, **overrides) -> Path:
    """Two targets, rose and random, one warmup checkpoint, a fine-tune and evaluations. Two nodes with one device
    each and batch size 1 make the same global batches as one process with batch size 2."""
    batch = 2 // nodes
    settings = {"validation": None, "test": None, "targets": {t: target(root, t) for t in TARGETS},
                "methods": ["rose", "random"],
                "warmup.epochs": 1, "warmup.batch_size": batch, "finetune.batch_size": batch,
                "features.batch_size": 2,
                "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": nodes, "strategy": "ddp",
                            "node_timeout": 40, "timeout": 60}}
    settings.update(overrides)
    return run_config(root, model_dir, out, **settings)


def start_nodes(config_files: list[Path], port: int | None = None) -> list[subprocess.Popen]:
    port = port or free_port()
    procs = []
    for rank, file in enumerate(config_files):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "rose_pl", "run", "--config", str(file)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            _, err = p.communicate()
            raise AssertionError(f"a node did not finish in {timeout} s:\n{err[-3000:]}")
        out.append((p.returncode, err))
    return out


def results(out: Path) -> dict:
    found = {}
    for t in TARGETS:
        base = out / "targets" / t
        for m in ("rose", "random"):
            found[f"{t}/{m}"] = (base / "selection" / m / "selected.jsonl").read_text()
        with np.load(base / "selection" / "rose" / "scores" / "scores.npz") as z:
            found[f"{t}/scores"] = z["per_task"]
        for name in ("base", "rose"):
            metrics = json.loads((base / "evaluation" / f"{name}.json").read_text())["metrics"]
            found[f"{t}/eval/{name}"] = {k: v for k, v in metrics.items() if isinstance(v, float)}
    return found


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("/scores"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
        elif "/eval/" in key:
            # The fine-tune's gradients are averaged by an all-reduce across nodes instead of summed in one
            # process: the adapters differ in the last float bits, a reward margin of 0.002 by about 1e-6.
            assert a[key].keys() == b[key].keys()
            for m in a[key]:
                assert a[key][m] == pytest.approx(b[key][m], rel=1e-3, abs=1e-5), (key, m)
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("nodes")
    run(config(root, tiny_model_dir, "single", 1, trainer={"accelerator": "cpu", "devices": 1}))
    return root, results(root / "single")


@pytest.mark.slow
def test_two_nodes_equal_one_process(one_process, tiny_model_dir):
    root, expected = one_process
    file = config(root, tiny_model_dir, "two", 2)
    (code0, err0), (code1, err1) = finish(start_nodes([file, file]))
    assert code0 == 0, err0[-4000:]
    assert code1 == 0, err1[-4000:]
    assert_same(results(root / "two"), expected)
    stages = manifest_stages(root / "two")
    assert all(s["status"] == "complete" for s in stages.values())
    # Node 1 wrote no bookkeeping: only node 0 holds the lock and writes records.
    assert "node 1: stage warmup" in err1 and "run complete" not in err1
    # Two nodes, two targets, every stage's ranks read the pool: it was tokenized once.
    assert len((root / "two" / "cache" / "pool" / "builds.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_a_killed_node_stops_the_other_with_a_clear_error_and_a_rerun_resumes(one_process, tiny_model_dir):
    root, expected = one_process
    file = config(root, tiny_model_dir, "killed", 2)
    out = root / "killed"
    procs = start_nodes([file, file])
    store = out / "targets" / "cooking" / "exact" / "epoch-1" / "written.bin"
    deadline = time.time() + 600
    while time.time() < deadline:
        assert all(p.poll() is None for p in procs), "a node ended before the pool pass"
        if store.is_file() and 0 < np.fromfile(store, dtype=np.uint8).sum():
            break
        time.sleep(0.05)
    os.killpg(procs[1].pid, signal.SIGKILL)  # node 1 and its stage process die mid pass
    start = time.time()
    (code0, err0), _ = finish(procs, timeout=240)
    assert code0 != 0 and time.time() - start < 120
    assert "node 1" in err0 and "exact" in err0, err0[-3000:]
    assert "Traceback" not in err0.split("rose-pl: ")[-1]
    written = np.fromfile(store, dtype=np.uint8).sum()
    (code0, err0), (code1, err1) = finish(start_nodes([file, file]))
    assert code0 == 0 and code1 == 0, err0[-3000:] + err1[-3000:]
    assert "warmup" not in {k for k, v in manifest_stages(out).items() if v.get("status") != "complete"}
    if 0 < written < 24:
        assert re.search(r"\d+ of 24 rows already written", err0 + err1), "the pass did not resume its rows"
    assert_same(results(out), expected)


@pytest.mark.slow
def test_nodes_that_see_different_output_folders_fail_at_start(tmp_path, tiny_model_dir):
    files = [config(tmp_path, tiny_model_dir, f"apart{rank}", 2) for rank in (0, 1)]
    (code0, err0), (code1, err1) = finish(start_nodes(files), timeout=240)
    assert code0 != 0 and code1 != 0
    for err in (err0, err1):
        assert "not on storage every node shares" in err
    assert "apart1" not in str(list((tmp_path / "apart0").rglob("*")))
    assert not (tmp_path / "apart0" / "warmup").exists()


@pytest.mark.slow
def test_a_stage_run_alone_from_its_generated_yaml_counts_as_done(one_process, tiny_model_dir):
    root, expected = one_process
    out = root / "by_hand"
    shutil.copytree(root / "single", out)
    file = config(root, tiny_model_dir, "by_hand", 1, trainer={"accelerator": "cpu", "devices": 1})
    stage = "targets/python/exact/epoch-1"
    (out / "stages" / "targets__python__exact__epoch-1.json").unlink()
    shutil.rmtree(out / "targets" / "python" / "exact" / "epoch-1")
    yaml_file = out / "configs" / "exact__cooking+python__epoch-1.yaml"
    # The pass generated for both targets (in the folder copied from): run alone, for the one target whose record
    # and outputs are gone.
    generated = yaml.safe_load(yaml_file.read_text().replace(str(root / "single"), str(out)))
    callbacks = generated["trainer"]["callbacks"]
    writer = next(c for c in callbacks if c["class_path"].endswith("ExactScoreWriter"))
    writer["init_args"]["targets"] = [t for t in writer["init_args"]["targets"] if "/python/" in t["output_dir"]]
    recorder = next(c for c in callbacks if c["class_path"].endswith("StageRecorder"))
    recorder["init_args"]["stages"] = [s for s in recorder["init_args"]["stages"] if s["name"] == stage]
    alone = out / "configs" / "alone.yaml"
    alone.write_text(yaml.safe_dump(generated))
    done = subprocess.run([sys.executable, "-m", "rose_pl", "predict", "--config", str(alone)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = run(file)
    assert result[stage] == "skipped" and set(result.values()) == {"skipped"}
    assert_same(results(out), expected)


def test_progress_of_a_two_process_pass_counts_the_global_rows_once_to_100_percent(tmp_path, tiny_model_dir):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"question {i} " + "x" * (i % 7), "completion": f"answer {i}"})
                            + "\n" for i in range(20)))
    stage = {"trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "inference_mode": False,
                         "enable_progress_bar": False, "logger": False,
                         "callbacks": [{"class_path": "rose_pl.features.projection.ProjectionCallback",
                                        "init_args": {"dim": 16}},
                                       {"class_path": "rose_pl.features.store.FeatureStoreWriter",
                                        "init_args": {"output_dir": str(tmp_path / "features")}},
                                       {"class_path": "rose_pl.progress.ProgressCallback",
                                        "init_args": {"every_percent": 20}}]},
             "model": {"class_path": "rose_pl.features.module.GradientFeatureModule",
                       "init_args": {"model": str(tiny_model_dir), "parameters": ["*q_proj.weight"]}},
             "data": {"class_path": "rose_pl.data.datamodule.FeatureDataModule",
                      "init_args": {"data_file": str(pool), "tokenizer": str(tiny_model_dir), "max_seq_length": 64,
                                    "batch_size": 2}},
             "return_predictions": False}
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump(stage))
    env = {**os.environ, "ROSE_PL_PROGRESS": "lines", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "rose_pl", "predict", "--config", str(tmp_path / "stage.yaml")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = [(int(a), int(b)) for a, b in re.findall(r"predict: (\d+)/(\d+) rows", done.stderr)]
    assert counts and all(total == 20 for _, total in counts), counts
    assert [c for c in counts if c[0] == 20] == [(20, 20)]  # 100% once
    assert [a for a, _ in counts] == sorted(a for a, _ in counts)


@pytest.mark.parametrize("launcher", ["srun", "torchrun", "env"])
def test_the_cluster_is_read_as_lightning_reads_it_and_one_process_per_node_is_required(monkeypatch, launcher):
    from rose_pl.errors import ConfigError
    from rose_pl.pipeline.nodes import detect_cluster, stage_env

    for key in list(os.environ):
        if key.startswith(("SLURM_", "TORCHELASTIC_")) or key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "RANK"):
            monkeypatch.delenv(key)
    if launcher == "srun":
        env = {"SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "1",
               "SLURM_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456", "SLURM_JOB_NAME": "rose"}
        expected = (1, 2, "gpu07", 15000 + 3456)
        crowded = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2"}
    elif launcher == "torchrun":
        env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "node0", "MASTER_PORT": "29500", "TORCHELASTIC_USE_AGENT_STORE": "True"}
        expected = (1, 2, "node0", 29500)
        crowded = {"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4"}
    else:
        env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400", "NODE_RANK": "1"}
        expected = (1, 2, "10.0.0.1", 29400)
        crowded = None
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cluster = detect_cluster(2)
    assert (cluster.node_rank, cluster.num_nodes, cluster.address, cluster.port) == expected
    # Reading the cluster changes nothing that later processes started from here inherit.
    assert {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")} == {k: env.get(k) for k in
                                                                             ("MASTER_ADDR", "MASTER_PORT")}
    assert cluster.agent_store == (launcher == "torchrun")
    clean = stage_env(("node0", 1234), 1)
    assert not any(k.startswith(("SLURM_", "TORCHELASTIC_")) or k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
                   for k in clean)
    assert (clean["MASTER_ADDR"], clean["MASTER_PORT"], clean["NODE_RANK"]) == ("node0", "1234", "1")
    if crowded:
        for key, value in crowded.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(ConfigError, match="one `rose-pl run` per node"):
            detect_cluster(2)
    else:
        monkeypatch.delenv("NODE_RANK")
        with pytest.raises(ConfigError, match="missing here: NODE_RANK"):
            detect_cluster(2)
    assert detect_cluster(1) is None


def test_a_stage_process_dies_with_the_run_that_started_it(tmp_path):
    # A stage left running after its `run` was killed (OOM, SIGKILL) would write beside the rerun that takes the lock.
    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signal is Linux only")
    parent = tmp_path / "parent.py"
    parent.write_text(textwrap.dedent("""
        import subprocess, sys, time
        from rose_pl.pipeline.nodes import stage_env
        code = "from rose_pl.pipeline.nodes import die_with_parent; die_with_parent(); import time; time.sleep(120)"
        child = subprocess.Popen([sys.executable, "-c", code], env=stage_env())
        print(child.pid, flush=True)
        time.sleep(120)
    """))
    proc = subprocess.Popen([sys.executable, str(parent)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    time.sleep(3)  # the child has set its parent-death signal
    assert _alive(child)
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state and "\nState:\tX" not in state
