"""Named errors. Every message names the file and the line or key at fault."""

from __future__ import annotations

from pathlib import Path


class RoseError(Exception):
    """Base class of every error rose_pl raises on purpose."""


class DataFormatError(RoseError, ValueError):
    """An input file is malformed: the message names the file and the line (JSONL) or key (JSON)."""

    def __init__(self, path: str | Path, where: str | int | None, message: str):
        self.path = str(path)
        self.where = where
        loc = self.path
        if isinstance(where, int):
            loc += f", line {where}"
        elif where is not None:
            loc += f", {where}"
        super().__init__(f"{loc}: {message}")


class StoreMismatchError(RoseError):
    """A feature store's metadata differs from what the caller expects (projector, seed, dim, data...)."""


class StaleOutputError(RoseError):
    """An output on disk was produced under a different configuration than the one now asked for."""


class CheckpointError(RoseError):
    """A warmup checkpoint or its manifest is missing or inconsistent."""


class ConfigError(RoseError, ValueError):
    """Arguments are invalid; the message lists every problem found at once."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


class JudgeError(RoseError):
    """The judge endpoint is unreachable or answered something unusable."""
