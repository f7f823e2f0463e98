"""Files on disk: atomic writes of files and folders, JSON values as they read back, content digests.

Every output rose_pl promises to write atomically (manifests, metadata, scores, selections, results,
checkpoint folders) goes through here: write a temporary file (or folder) beside the target, fsync it,
rename it over the target, fsync the parent so the rename survives a crash. Readers see the old version
or the new one, never a part of one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, IO, Iterator


def _umask() -> int:
    # The umask can only be read by setting it; done once, at import, before any thread starts writing.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()
FILE_MODE = 0o666 & ~_UMASK
"""Mode of every file rose_pl writes: what `open()` would give (mkstemp alone gives 0600)."""
DIR_MODE = 0o777 & ~_UMASK
"""Mode of every folder rose_pl writes (mkdtemp alone gives 0700)."""


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
        os.fchmod(fd, FILE_MODE)
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


@contextmanager
def atomic_dir(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; when the block ends without error, it becomes `path`.

    An existing `path` is replaced (or, with `replace=False`, kept and the new folder discarded: another
    process finished first). On error the temporary folder is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp.chmod(DIR_MODE)
        yield tmp
        if path.exists():
            if not replace:
                shutil.rmtree(tmp)
                return
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def jsonable(value: Any, nan_as_null: bool = False) -> Any:
    """`value` as JSON reads it back: tuples become lists, paths, dtypes and devices strings, numpy scalars
    Python numbers, tensors' shapes lists; with `nan_as_null`, NaN and infinities become null (strict JSON).
    Anything else that JSON cannot hold is a TypeError naming it."""
    import numpy as np  # numpy and torch are imported here so that this module stays light
    import torch

    def convert(v: Any) -> Any:
        if isinstance(v, (np.integer, np.floating, np.bool_)):
            v = v.item()
        if isinstance(v, float):
            return None if nan_as_null and not math.isfinite(v) else v
        if v is None or isinstance(v, (str, int, bool)):
            return v
        if isinstance(v, dict):
            return {str(k): convert(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, torch.Size):
            return list(v)
        if isinstance(v, (Path, torch.dtype, torch.device)):
            return str(v)
        raise TypeError(f"cannot be written as JSON: a {type(v).__name__}: {v!r}")

    return convert(value)


def file_digest(path: str | Path, *settings: Any, length: int = 16) -> str:
    """sha256 of a file's bytes (and of any JSON-able `settings` that change how it is read), hex, shortened."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    for s in settings:
        digest.update(json.dumps(s, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:length]


FULL_DIGEST_BYTES = 32 << 20
"""Files up to this size are hashed whole when their digest is recorded; larger ones are sampled."""
SAMPLE_BYTES = 1 << 20


def output_digest(path: str | Path) -> dict:
    """What a finished output file should be: {"size", "sha256"} (whole file, when small) or {"size", "sampled"}
    (the size and the first, middle and last MiB: a truncated, emptied or replaced file is caught without reading
    gigabytes of features)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_DIGEST_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            return {"size": size, "sha256": digest.hexdigest()[:32]}
        for offset in (0, size // 2, size - SAMPLE_BYTES):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BYTES))
    return {"size": size, "sampled": digest.hexdigest()[:32]}
