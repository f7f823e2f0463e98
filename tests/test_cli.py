"""Every shipped YAML parses against the current signatures (so configs cannot rot), and the CLI dispatches."""

import subprocess
import sys
from pathlib import Path

import pytest

from rose_pl.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LIGHTNING = {"warmup.yaml": "fit", "finetune.yaml": "fit", "grads_train.yaml": "predict", "grads_val.yaml": "predict",
             "means_val.yaml": "predict", "exact_train.yaml": "predict"}
OTHER = {"score.yaml": "score", "select.yaml": "select", "evaluate.yaml": "evaluate", "rose.yaml": "run",
         "paper/rose.yaml": "run"}


def test_every_config_file_is_covered():
    assert {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")} == set(LIGHTNING) | set(OTHER)


@pytest.mark.parametrize("name", sorted(LIGHTNING) + sorted(OTHER))
def test_config_parses_against_the_signatures(name, capsys):
    command = LIGHTNING.get(name) or OTHER[name]
    with pytest.raises(SystemExit) as e:
        main([command, "--config", str(CONFIGS / name), "--print_config"])
    assert e.value.code in (0, None)
    printed = capsys.readouterr().out
    assert printed.strip(), f"{name}: nothing printed"


def test_the_paper_preset_holds_the_papers_settings(capsys):
    import yaml

    with pytest.raises(SystemExit):
        main(["run", "--config", str(CONFIGS / "paper" / "rose.yaml"), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"] == "meta-llama/Llama-3.1-8B"
    assert (cfg["warmup"]["epochs"], cfg["warmup"]["optim"]["lr"], cfg["warmup"]["fraction"]) == (4, 2e-5, 0.05)
    assert cfg["warmup"]["lora"] == {"r": 128, "alpha": 512, "dropout": 0.1,
                                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert (cfg["features"]["dim"], cfg["selection"]["fraction"], cfg["data"]["max_seq_length"]) == (8192, 0.05, 2048)
    assert (cfg["trainer"]["devices"], cfg["trainer"]["strategy"], cfg["trainer"]["precision"]) == (4, "ddp", "bf16-mixed")
    assert {t: v["shots_per_task"] for t, v in cfg["targets"].items()} == {"se": 2, "shp": 5, "hh": 1}
    assert cfg["targets"]["hh"]["preference"]["prompt_truncation"] == "keep_end"


def test_a_bad_key_in_a_config_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "rose.yaml").read_text().replace("max_seq_length: 512", "max_seq_lenght: 512"))
    with pytest.raises(SystemExit) as e:
        main(["run", "--config", str(bad), "--print_config"])
    assert e.value.code != 0
    assert "max_seq_lenght" in capsys.readouterr().err


def test_unknown_command_names_the_known_ones(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "frobnicate" in err and "score" in err and "fit" in err


def test_help_lists_every_command_under_the_tools_name():
    out = subprocess.run([sys.executable, "-m", "rose_pl", "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: rose-pl")
    for command in ("run", "fit", "validate", "test", "predict", "score", "select", "evaluate", "prepare-model"):
        assert f"\n  {command} " in out, command
    version = subprocess.run([sys.executable, "-m", "rose_pl", "--version"], capture_output=True, text=True, check=True)
    from rose_pl import __version__

    assert version.stdout.strip() == f"rose-pl {__version__}"


@pytest.mark.parametrize("command", ["run", "score", "select", "evaluate", "fit", "predict"])
def test_each_commands_help_documents_its_options(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "rose-pl" in out.splitlines()[0]
    expected = {"run": "--data.on_empty", "score": "--exact", "select": "--fraction", "evaluate": "--judge",
                "fit": "--trainer", "predict": "--trainer"}[command]
    assert expected in out


def _cli(*args, cwd=None, timeout=600):
    import os
    import time

    start = time.perf_counter()
    env = {**os.environ, "ROSE_PL_PROGRESS": ""}  # whatever the caller's setting: no terminal here, so lines
    proc = subprocess.run([sys.executable, "-m", "rose_pl", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)
    return proc, time.perf_counter() - start


def test_a_malformed_validation_file_stops_the_run_before_any_stage_with_its_line_and_no_traceback(
        tmp_path, tiny_model_dir):
    import yaml

    val = tmp_path / "val.jsonl"
    good = '{"prompt": "p", "chosen": "a", "rejected": "b", "task": "t"}\n'
    val.write_text(good + good.replace('"p"', '"q"') + '{"prompt": "r", "chosen": "a", "rejected": \n')
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "model": str(tiny_model_dir),
                                      "pool": str(CONFIGS.parent / "data" / "pool.jsonl"), "validation": str(val),
                                      "methods": ["rose", "random"], "trainer": {"accelerator": "cpu"}}))
    proc, seconds = _cli("run", "--config", str(config))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert seconds < 10, seconds
    assert f"{val}, line 3: malformed JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "warmup").exists()  # nothing ran
    debug, _ = _cli("--debug", "run", "--config", str(config))
    assert "Traceback" in debug.stderr  # the traceback is one flag away


def test_every_problem_of_the_inputs_is_reported_at_once(tmp_path, tiny_model_dir):
    import json

    import yaml

    rose_json = tmp_path / "se_2_shot_preference.json"
    rose_json.write_text(json.dumps({"Q": {"responses": ["a", "b"], "pairs": [[0, 1]], "sft_target": "a",
                                           "rejected_target": "b"}}))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "model": str(tmp_path / "no-model"),
                                      "pool": str(tmp_path / "missing.jsonl"), "validation": str(rose_json),
                                      "methods": ["rose", "nope"], "trainer": {"accelerator": "cpu"}}))
    proc, _ = _cli("run", "--config", str(config))
    assert proc.returncode == 2
    assert "unknown selection method 'nope'" in proc.stderr  # the arguments first
    config.write_text(config.read_text().replace("- nope\n", ""))
    proc, _ = _cli("run", "--config", str(config))
    assert proc.returncode == 2
    for expected in (f"{tmp_path / 'missing.jsonl'}: no such file", "shots_per_task: 2", "no-model is not a model folder"):
        assert expected in proc.stderr, (expected, proc.stderr)


@pytest.mark.slow
def test_a_short_run_logs_each_line_once_without_tips_with_progress_and_a_summary(tmp_path, tiny_model_dir):
    import re

    from test_pipeline import run_config

    config = run_config(tmp_path, tiny_model_dir, "logged", methods=["rose", "random"], **{"finetune.methods": []},
                        test=None)
    proc, _ = _cli("run", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in proc.stderr.splitlines() if line.strip()]
    assert not [line for line in lines if line.startswith(("INFO: ", "WARNING: "))]  # Lightning's own handler
    assert not [a for a, b in zip(lines, lines[1:]) if a == b]
    assert "💡" not in proc.stderr + proc.stdout and "Tip:" not in proc.stderr
    assert re.search(r"rose_pl\.progress: predict: \d+/24 rows \(\d+%\), [\d.]+ rows/s, elapsed \d+:\d\d, ETA",
                     proc.stderr), proc.stderr[-3000:]
    selected = tmp_path / "logged" / "targets" / "default" / "selection" / "rose" / "selected.jsonl"
    assert str(selected) in proc.stdout and "Rerun or extend" in proc.stdout
    summary = __import__("json").loads((tmp_path / "logged" / "run.json").read_text())["summary"]
    assert any(s["file"] == str(selected) for s in summary["selections"])
    assert {s["stage"] for s in summary["stages"]} >= {"warmup", "targets/default/selection/rose"}


def test_a_finished_lightning_command_destroys_its_process_group(monkeypatch, tmp_path):
    # A gloo group left to interpreter shutdown can abort a stage that finished its work (SIGABRT).
    import torch.distributed as dist

    from rose_pl import cli
    from rose_pl.pipeline import lightning

    def fake_cli(args):
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
        return "done"

    monkeypatch.setattr(lightning, "lightning_cli", fake_cli)
    try:
        assert cli.dispatch("predict", []) == "done"
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():  # the next tests run in this process
            dist.destroy_process_group()
