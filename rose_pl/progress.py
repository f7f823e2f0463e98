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


def _sampler_of(loader):
    """The index sampler under a loader, through Lightning's batch-sampler wrappers."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    while batch_sampler is not None and not hasattr(batch_sampler, "sampler") and hasattr(batch_sampler, "_batch_sampler"):
        batch_sampler = batch_sampler._batch_sampler
    if batch_sampler is not None and hasattr(batch_sampler, "sampler"):
        return batch_sampler.sampler
    return getattr(loader, "sampler", None)


def _shares(loaders, world: int) -> tuple[int, int] | None:
    """(rows this rank will see, rows all ranks see together) of its loaders, None when unknown.

    Under DDP the rank's sampler is a distributed sampler over the original one (Lightning wraps it): its length
    is the rank's share and the length of what it samples is the whole. Without one, every rank sees it all."""
    from torch.utils.data import DistributedSampler

    if loaders is None:
        return None
    if not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    mine = total = 0
    for loader in loaders:
        batches = getattr(loader, "batch_sampler", None)
        batches = getattr(batches, "_batch_sampler", batches)
        if hasattr(batches, "num_rows") and hasattr(batches, "total_rows"):  # batches sharded by the data itself
            mine, total = mine + batches.num_rows, total + batches.total_rows
            continue
        sampler = _sampler_of(loader)
        if sampler is None or not hasattr(sampler, "__len__"):
            return None
        rows = len(sampler)
        whole = getattr(sampler, "dataset", None)
        if isinstance(sampler, DistributedSampler) and whole is not None and hasattr(whole, "__len__"):
            mine, total = mine + rows, total + len(whole)
        else:
            mine, total = mine + rows, total + rows * (1 if world == 1 else world)
    return mine, total


def _batch_rows(batch) -> int:
    if isinstance(batch, dict):
        for key in ("index", "input_ids", "chosen_input_ids"):
            if key in batch:
                return int(batch[key].shape[0])
    return 1


class ProgressCallback(pl.Callback):
    """Rows per second and ETA of fit epochs and predict passes: one line from rank 0, with the global count.

    Ranks run in step, so all ranks' rows are estimated from rank 0's share: rank 0's rows done times
    (all rows / rank 0's rows). The count reaches 100% when rank 0 is done, and the ETA is rank 0's.

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
        shares = _shares(loaders, trainer.world_size)
        self._scale = shares[1] / shares[0] if shares and shares[0] else float(trainer.world_size)
        self._mine, self._counted = 0, 0
        self._progress = Progress(shares[1] if shares else None, desc, every_percent=self.every_percent,
                                  every_seconds=self.every_seconds)

    def _step(self, trainer: pl.Trainer, batch) -> None:
        if self._progress is not None:
            self._mine += _batch_rows(batch)
            estimate = round(self._mine * self._scale)
            if self._progress.total is not None:
                estimate = min(estimate, self._progress.total)
            self._progress.update(estimate - self._counted)
            self._counted = estimate

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
