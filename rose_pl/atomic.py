"""Atomic file writes: readers see the old file or the new one, never a part of one.

Every output rose_pl promises to write atomically (manifests, metadata, scores, selections, results)
goes through here: write a temporary file in the same folder, fsync it, rename it over the target, fsync
the folder so the rename survives a crash.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable; some filesystems refuse to open a folder, which is harmless here.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(f)` on a temporary binary file, then move it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **dumps_kwargs) -> Path:
    """JSON with sorted keys and indentation unless `dumps_kwargs` say otherwise."""
    kwargs = {"indent": 2, "sort_keys": True} | dumps_kwargs
    return atomic_write_text(path, json.dumps(obj, **kwargs) + "\n")
