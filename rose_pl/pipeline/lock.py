"""One writer per run folder: an OS-level exclusive lock held by `rose-pl run` for its whole life.

The lock is `flock(2)` on `<run>/run.lock`: the kernel releases it when the process ends, however it ends (a
kill -9 included), so a stale lock cannot outlive its holder and nothing needs cleaning up. The file keeps the
holder's pid, host, start time and command line, so a second `run` on the same folder can say who holds it.
The file itself is never deleted (deleting a lock file while another process waits on it splits the lock in two).

Read-only commands (`--verify`, a summary, `compare`) take no lock; under several nodes only the coordinating
process holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from rose_pl.errors import RoseError
from rose_pl.files import FILE_MODE
from rose_pl.layout import RunLayout


class RunLockedError(RoseError):
    """Another process holds the run folder's lock."""


class RunLock:
    """`with RunLock(root):` holds `<root>/run.lock` exclusively, or raises RunLockedError at once."""

    def __init__(self, root: str | Path):
        self.file = RunLayout(root).lock
        self._fd: int | None = None

    def holder(self) -> dict:
        """What the holder wrote about itself (empty if unreadable)."""
        try:
            return json.loads(self.file.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def describe_holder(self) -> str:
        h = self.holder()
        if not h:
            return "another process (it wrote nothing about itself yet)"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("since", 0)))
        return f"pid {h.get('pid')} on host {h.get('host')} since {since} (`{h.get('command', '?')}`)"

    def is_held(self) -> bool:
        """Whether some process holds the lock now (takes and drops it if free)."""
        if not self.file.exists():
            return False
        with open(self.file, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False

    def acquire(self) -> "RunLock":
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"{self.file.parent} is in use by another `rose-pl run`: {self.describe_holder()}. Wait for it to "
                "finish or stop it; two runs on one folder would mix their results") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "command": " ".join(["rose-pl", *sys.argv[1:]])[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Release the lock and remove the lock file, and the run folder too if nothing else is in it."""
        self.file.unlink(missing_ok=True)
        self.release()
        try:
            self.file.parent.rmdir()
        except OSError:  # not empty: something else lives there
            pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
