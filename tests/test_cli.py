"""Every shipped YAML parses against the current signatures (so configs cannot rot), and the CLI dispatches."""

from pathlib import Path

import pytest

from rose_pl.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LIGHTNING = {"warmup.yaml": "fit", "finetune.yaml": "fit", "grads_train.yaml": "predict", "grads_val.yaml": "predict"}
OTHER = {"score.yaml": "score", "select.yaml": "select", "evaluate.yaml": "evaluate", "rose.yaml": "run"}


def test_every_config_file_is_covered():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(LIGHTNING) | set(OTHER)


@pytest.mark.parametrize("name", sorted(LIGHTNING) + sorted(OTHER))
def test_config_parses_against_the_signatures(name, capsys):
    command = LIGHTNING.get(name) or OTHER[name]
    with pytest.raises(SystemExit) as e:
        main([command, "--config", str(CONFIGS / name), "--print_config"])
    assert e.value.code in (0, None)
    printed = capsys.readouterr().out
    assert printed.strip(), f"{name}: nothing printed"


def test_a_bad_key_in_a_config_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "rose.yaml").read_text().replace("max_seq_length: 512", "max_seq_lenght: 512"))
    with pytest.raises(SystemExit) as e:
        main(["run", "--config", str(bad), "--print_config"])
    assert e.value.code != 0
    assert "max_seq_lenght" in capsys.readouterr().err


def test_unknown_command_names_the_known_ones():
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert "score" in str(e.value) and "fit" in str(e.value)
