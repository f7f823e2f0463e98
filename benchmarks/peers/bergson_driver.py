"""Runs inside Bergson's own virtualenv, started by bergson_vs_rose.py; never imports rose_pl.

    <bergson-venv>/bin/python bergson_driver.py probe  OUT.json
    <bergson-venv>/bin/python bergson_driver.py batches SPEC.json OUT.json   # Bergson's own batch allocation
    <bergson-venv>/bin/python bergson_driver.py floor   SPEC.json OUT.json   # plain forward + backward floor
    <bergson-venv>/bin/python bergson_driver.py cli     SPEC.json OUT.json   # `bergson <argv>`, `rounds` times

`cli` runs Bergson's real command line entry point (bergson.__main__.main) in this process, so the timed work is
exactly what `bergson build ...` / `bergson score ...` does. The gradient pass alone is timed by wrapping the
`collect_gradients` that build.py and score/score.py call (nothing else is patched). Peak memory: sampled process
RSS during the pass (and torch.cuda.max_memory_allocated on CUDA), plus the process's lifetime ru_maxrss.
Run with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 (the caller sets them).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

MIB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Sampled peak RSS of a block (and CUDA peak allocation when CUDA is used)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s

    def __enter__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        import torch

        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.cuda_peak = None
        if self.cuda:
            torch.cuda.synchronize()
            self.cuda_peak = torch.cuda.max_memory_allocated()


def versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {name: md.version(name) for name in ("bergson", "torch", "transformers", "peft", "datasets", "numpy")}
    out["cuda_available"] = torch.cuda.is_available()
    out["torch_threads"] = torch.get_num_threads()
    return out


def cmd_probe(out: Path) -> None:
    import bergson.build  # noqa: F401  (fails here if transformers cannot import its models)
    import bergson.score.score  # noqa: F401

    out.write_text(json.dumps(versions(), indent=1))


def _lengths(dataset: str) -> list[int]:
    with open(dataset) as f:
        return [len(json.loads(line)["input_ids"]) for line in f if line.strip()]


def cmd_batches(spec: dict, out: Path) -> None:
    """Bergson's allocation of each dataset's rows into token-budget batches (bergson.data.allocate_batches),
    so that rose_pl can run the very same batches."""
    from bergson.data import allocate_batches

    batches = {name: allocate_batches(_lengths(path), spec["token_batch_size"],
                                      max_batch_size=spec.get("max_batch_size"))
               for name, path in spec["datasets"].items()}
    out.write_text(json.dumps({"batches": batches, "versions": versions()}))


def _index_cfg(spec: dict):
    from bergson.config.config import DataConfig, IndexConfig

    return IndexConfig(run_path=spec["run_path"], model=spec["model"], tokenizer=spec.get("tokenizer", ""),
                       precision=spec.get("precision", "fp32"), model_kwargs=spec.get("model_kwargs", ""),
                       token_batch_size=spec["token_batch_size"], loss_reduction=spec.get("loss_reduction", "mean"),
                       data=DataConfig(dataset=spec["dataset"]))


def cmd_floor(spec: dict, out: Path) -> None:
    """Bergson's own forward + backward (collector.fwd_bwd_factory) on its own batches with no collector hooks:
    the floor its gradient passes are compared with."""
    import torch
    from bergson.collector.collector import fwd_bwd_factory
    from bergson.data import allocate_batches, pad_and_tensor
    from bergson.utils.worker_utils import setup_data_pipeline, setup_model_and_peft

    cfg = _index_cfg(spec)
    ds, _ = setup_data_pipeline(cfg)
    model, _ = setup_model_and_peft(cfg)
    device = torch.device(model.device)
    batches = allocate_batches(ds["length"][:], cfg.token_batch_size, max_batch_size=spec.get("max_batch_size"))
    fwd_bwd = fwd_bwd_factory(cfg)
    rounds = []
    for _ in range(spec.get("rounds", 1)):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            for indices in batches:
                batch = ds[indices]
                x, y, _, _ = pad_and_tensor(batch["input_ids"], labels=batch.get("labels"), device=device,
                                            sync_max_len=False)
                fwd_bwd(model, x, y, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        rounds.append({"pass_s": seconds, "peak_rss_mib": mem.peak / MIB, "start_rss_mib": mem.start / MIB,
                       "cuda_peak_mib": None if mem.cuda_peak is None else mem.cuda_peak / MIB})
    out.write_text(json.dumps({"rounds": rounds, "model_training_mode": bool(model.training),
                               "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                               "versions": versions()}, indent=1))


def cmd_cli(spec: dict, out: Path) -> None:
    """`bergson <argv>` (argv from the spec) `rounds` times in this process, timing each whole command and its
    gradient pass; then writes what the caller needs as .npy beside the run (scores, or the gradients)."""
    import numpy as np
    import torch

    import bergson.build as build_mod
    import bergson.score.score as score_mod
    from bergson.__main__ import main as bergson_main

    passes: list[dict] = []
    state = {}

    def timed(original):
        def wrapper(*args, **kwargs):
            model = kwargs.get("model")
            state["model_training_mode"] = bool(getattr(model, "training", False))
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                result = original(*args, **kwargs)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
            passes.append({"pass_s": seconds, "peak_rss_mib": mem.peak / MIB, "start_rss_mib": mem.start / MIB,
                           "cuda_peak_mib": None if mem.cuda_peak is None else mem.cuda_peak / MIB})
            return result
        return wrapper

    build_mod.collect_gradients = timed(build_mod.collect_gradients)
    score_mod.collect_gradients = timed(score_mod.collect_gradients)

    argv = [str(a) for a in spec["argv"]]
    rounds = []
    for r in range(spec.get("rounds", 1)):
        before = len(passes)
        sys.argv = ["bergson", *argv, *(["--overwrite", "true"] if "--overwrite" not in argv else [])]
        t0 = time.perf_counter()
        bergson_main()
        total = time.perf_counter() - t0
        if len(passes) != before + 1:
            raise RuntimeError(f"expected one gradient pass per command, saw {len(passes) - before}")
        rounds.append({"command_s": total, **passes[-1]})
        print(f"[bergson_driver] {argv[0]} round {r + 1}: command {total:.2f}s, pass {passes[-1]['pass_s']:.2f}s",
              flush=True)

    run_path = Path(argv[1])
    info = json.loads((run_path / "info.json").read_text()) if (run_path / "info.json").exists() else None
    export = {}
    if (run_path / "scores.bin").exists():
        from bergson.data import load_scores

        scores = np.asarray(load_scores(run_path)[:], dtype=np.float64)
        np.save(run_path / "scores.npy", scores)
        export = {"scores": str(run_path / "scores.npy"), "shape": list(scores.shape)}
    elif (run_path / "gradients.bin").exists():
        from bergson.data import load_gradients

        grads = np.asarray(load_gradients(run_path), dtype=np.float32)
        np.save(run_path / "gradients.npy", grads)
        export = {"gradients": str(run_path / "gradients.npy"), "shape": list(grads.shape),
                  "grad_sizes": info.get("grad_sizes")}
    normalizers = None
    if (run_path / "normalizers.pth").exists():
        normalizers = len(torch.load(run_path / "normalizers.pth", weights_only=True))
    out.write_text(json.dumps({"rounds": rounds, "export": export, "info": info, "normalizers_loaded": normalizers,
                               "model_training_mode": state.get("model_training_mode"),
                               "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                               "versions": versions()}, indent=1))


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "probe":
        return cmd_probe(Path(sys.argv[2]))
    spec = json.loads(Path(sys.argv[2]).read_text())
    out = Path(sys.argv[3])
    {"batches": cmd_batches, "floor": cmd_floor, "cli": cmd_cli}[cmd](spec, out)


if __name__ == "__main__":
    main()
