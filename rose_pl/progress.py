"""Progress of long loops: rows done, rows/s and ETA, on a terminal and in log files alike.

On a terminal `Progress` draws a tqdm bar. Without one (a log file, nohup, srun) it logs one line every
`every_percent` percent or `every_seconds` seconds, whichever comes first, so a long stage is never silent.
`ProgressCallback` does this for Lightning's fit and predict loops; under DDP rank 0 reports the rows of all
ranks (each rank's count times the world size, as ranks run in step).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time

import lightning.pytorch as pl

log = logging.getLogger("rose_pl.progress")

PROGRESS_ENV = "ROSE_PL_PROGRESS"
"""Force the kind of progress: "bar", "lines" or "off" (default: a bar on a terminal, else lines)."""


def _mode(stream) -> str:
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in ("bar", "lines", "off"):
        return forced
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts `total` units of work; draws a bar on a terminal, logs lines otherwise."""

    def __init__(self, total: int | None, desc: str, unit: str = "rows", every_percent: float = 10.0,
                 every_seconds: float = 60.0, stream=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.every_percent, self.every_seconds = every_percent, every_seconds
        self.stream = stream if stream is not None else sys.stderr
        self.mode = _mode(self.stream)
        self.done = 0
        self.start = time.perf_counter()
        self._last_time, self._last_percent = self.start, 0.0
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=self.stream, dynamic_ncols=True,
                             smoothing=0.1)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines":
            now = time.perf_counter()
            percent = 100.0 * self.done / self.total if self.total else 0.0
            if now - self._last_time >= self.every_seconds or percent - self._last_percent >= self.every_percent:
                self._last_time, self._last_percent = now, percent
                log.info("%s", self.line())

    def line(self) -> str:
        """`desc: done/total rows (p%), r rows/s, elapsed m:ss, ETA m:ss`."""
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({100.0 * self.done / self.total:.0f}%), "
                    f"{rate:.3g} {self.unit}/s, elapsed {_duration(elapsed)}, ETA {_duration(left)}")
        return f"{self.desc}: {self.done} {self.unit}, {rate:.3g} {self.unit}/s, elapsed {_duration(elapsed)}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and self.done and self._last_percent < 100.0:
            log.info("%s", self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rows_total(loaders) -> int | None:
    """Rows one rank will see: the sum of its loaders' sampler lengths (None when unknown)."""
    if loaders is None:
        return None
    if not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    total = 0
    for loader in loaders:
        sampler = getattr(loader, "sampler", None)
        if sampler is None or not hasattr(sampler, "__len__"):
            return None
        total += len(sampler)
    return total


def _batch_rows(batch) -> int:
    if isinstance(batch, dict):
        for key in ("index", "input_ids", "chosen_input_ids"):
            if key in batch:
                return int(batch[key].shape[0])
    return 1


class ProgressCallback(pl.Callback):
    """Rows per second and ETA of fit epochs and predict passes (rank 0 reports all ranks' rows).

    Replaces Lightning's own bar (set `enable_progress_bar: false`): this one counts rows, not batches, and
    keeps writing lines when there is no terminal.
    """

    def __init__(self, every_percent: float = 10.0, every_seconds: float = 60.0):
        """
        Args:
            every_percent: Without a terminal, log a line at least every this many percent...
            every_seconds: ...or every this many seconds.
        """
        self.every_percent, self.every_seconds = every_percent, every_seconds
        self._progress: Progress | None = None

    def _start(self, trainer: pl.Trainer, desc: str, loaders) -> None:
        if not trainer.is_global_zero:
            return
        total = _rows_total(loaders)
        total = total * trainer.world_size if total is not None else None
        self._progress = Progress(total, desc, every_percent=self.every_percent, every_seconds=self.every_seconds)

    def _step(self, trainer: pl.Trainer, batch) -> None:
        if self._progress is not None:
            self._progress.update(_batch_rows(batch) * trainer.world_size)

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def on_predict_start(self, trainer, pl_module) -> None:
        self._start(trainer, "predict", trainer.predict_dataloaders)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._step(trainer, batch)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._stop()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, f"train epoch {trainer.current_epoch + 1}/{trainer.max_epochs}", trainer.train_dataloader)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._step(trainer, batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop()
