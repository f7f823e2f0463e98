"""Wall time and peak memory of every step of a run that does not compute gradients, from 10K to 1M pool rows.

A synthetic pool (four source datasets, about 512 tokens a row for the tiny model's byte tokenizer) goes through:

| step | what is timed |
|---|---|
| cache | reading, validating and tokenizing the pool into the token cache (`build_cache`, `--num-proc` processes) |
| loading | one pool pass's data side: `FeatureDataModule` on the cache, every predict batch collated (no model) |
| scoring | ROSE Eq. 7 from exact score stores, 4 checkpoints x 30 task columns (`exact_scores`) |
| selection | the top 5% ranked and written in the pool's own format with its sidecar (`select_and_write`, no report) |
| report | report.md with its plots and top examples (`write_report`: only the shown rows are read) |
| bm25 | BM25 of every pool row against 60 validation texts in 30 tasks (`bm25_scores`, streamed texts) |
| summary | compare.md / compare.json and the run summary over the selection's sidecar |
| ddp | a 2-process DDP predict pass over the cache with the tiny model (50 batches), every rank's peak RSS |

Each step runs in a fresh process; its wall time and peak RSS (the process's high-water mark, imports included)
are recorded. `--import-rss` reports what a process holds after importing rose_pl and torch, so that the part a
step adds is visible. Nothing here runs in CI.

    python benchmarks/pool_scale.py --rows 10000 100000 1000000 --out benchmarks/results/pool_scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("cache", "loading", "scoring", "selection", "report", "bm25", "summary", "ddp")
DATASETS = ("flan", "cot", "dolly", "oasst")
TASKS, CHECKPOINTS = 30, 4


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_parts_mb() -> dict:
    """Resident memory now: anonymous (what the process holds) and file-backed (pages of memory-mapped files it
    touched, which the kernel can drop at any time), from /proc/self/status."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


class AnonPeak:
    """Samples RssAnon every 20 ms in a thread: the peak of what the process itself holds."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_parts_mb().get("RssAnon", 0.0))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_parts_mb().get("RssAnon", 0.0))


# ---- fixtures (not timed) --------------------------------------------------------------------------------
def write_pool(path: Path, rows: int, seed: int = 0) -> None:
    """Rows of about 480 characters (a 512-token row for a byte tokenizer with the tulu template)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.asarray(["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "paper", "seven", "light",
                        "green", "quick", "fox", "lazy", "dog", "north", "south", "table", "chair", "window"])
    with open(path, "w") as f:
        for i in range(rows):
            prompt = " ".join(words[rng.integers(0, len(words), 50)])
            answer = " ".join(words[rng.integers(0, len(words), 30)])
            f.write(json.dumps({"dataset": DATASETS[i % 4], "id": f"row_{i}", "messages": [
                {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}) + "\n")


def write_exact_stores(folder: Path, rows: int) -> list[Path]:
    """CHECKPOINTS exact score stores of random inner products and norms (what a pool pass leaves)."""
    import numpy as np

    from rose_pl.features.store import FeatureStore

    columns = [f"val_dpo/task{t}" for t in range(TASKS)] + ["norm2"]
    rng = np.random.default_rng(1)
    stores = []
    for c in range(CHECKPOINTS):
        path = folder / f"exact/epoch-{c + 1}"
        meta = {"module": {"checkpoint_lr": 1e-4 * (c + 1), "weights": f"checkpoint-{c + 1}"},
                "exact": {"columns": columns}}
        store = FeatureStore.create(path, rows, len(columns), meta, dtype="float32", durable=False)
        for start in range(0, rows, 65536):
            stop = min(start + 65536, rows)
            block = rng.standard_normal((stop - start, len(columns))).astype(np.float32)
            block[:, -1] = np.abs(block[:, -1]) + 1
            store.write(np.arange(start, stop), block)
        store.finalize()
        store.close()
        stores.append(path)
    return stores


# ---- steps (each in its own process) --------------------------------------------------------------------
def step(name: str, work: Path, model: str, num_proc: int) -> dict:
    import numpy as np

    pool = work / "pool.jsonl"
    cache_dir = work / "cache"
    extra: dict = {}
    if name == "cache":
        from rose_pl.data.cache import CacheSettings, build_cache

        cache = build_cache(pool, model, CacheSettings(max_seq_length=512), cache_dir, num_proc=num_proc)
        extra = cache.figures()
    elif name == "loading":
        from rose_pl.data.datamodule import FeatureDataModule

        dm = FeatureDataModule(str(pool), model, max_seq_length=512, cache=str(cache_dir))
        dm.setup("predict")
        rows = tokens = 0
        for batch in dm.predict_dataloader():
            rows += batch["input_ids"].shape[0]
            tokens += int(batch["attention_mask"].sum())
        extra = {"rows": rows, "tokens": tokens}
    elif name == "scoring":
        from rose_pl.selection.influence import exact_scores, save_scores

        result = exact_scores(sorted((work / "exact").iterdir()), "val_dpo")
        np.save(work / "scores.npy", result.scores)
        np.save(work / "best_task.npy", result.best_task)
        extra = {"tasks": len(result.tasks)}
    elif name in ("selection", "report"):
        from rose_pl.data.cache import TokenCache
        from rose_pl.data.table import PoolTable
        from rose_pl.selection.influence import InfluenceResult
        from rose_pl.selection.report import write_report
        from rose_pl.selection.select import select, select_and_write

        pool_table = PoolTable.from_cache(TokenCache(cache_dir))
        scores = np.load(work / "scores.npy")
        best = np.load(work / "best_task.npy")
        result = InfluenceResult(scores, scores[:, None], best, [f"task{t}" for t in range(TASKS)], np.ones(1))
        if name == "selection":
            select_and_write(work / "selection", result, pool_table, source=str(pool), fraction=0.05, k=None, seed=0,
                             title="scale", report=False)
        else:
            chosen = select(scores, fraction=0.05)
            write_report(work / "selection", scores, chosen, (pool_table.dataset_codes, pool_table.dataset_names),
                         pool_table.ids, texts=lambda rows: next(pool_table.texts(rows)), best_task=best,
                         tasks=result.tasks, title="scale")
    elif name == "bm25":
        from rose_pl.data.cache import TokenCache
        from rose_pl.data.table import PoolTable
        from rose_pl.selection.baselines import bm25_scores

        pool_table = PoolTable.from_cache(TokenCache(cache_dir))
        val = [f"validation text {t} alpha river seven {t % 5}" for t in range(TASKS) for _ in range(2)]
        scores, _, _ = bm25_scores(pool_table.texts(), val, [f"t{i // 2}" for i in range(len(val))])
        extra = {"rows": int(scores.size)}
    elif name == "summary":
        from rose_pl.selection.report import comparison_table, composition
        from rose_pl.selection.select import read_selection

        sidecar = read_selection(work / "selection" / "selected.jsonl")
        shares = composition([r["dataset"] for r in sidecar["selected"]])
        table = comparison_table([{"method": "rose", "selected": sidecar["num_selected"], "composition %": shares}])
        (work / "compare.md").write_text(table)
    return {"peak_rss_mb": round(peak_rss_mb(), 1), **extra}


def ddp_pass(work: Path, model_dir: Path) -> dict:
    """Two ranks (gloo, CPU) predicting 50 batches each from the cache; each rank reports its peak RSS."""
    import yaml

    out = work / "ddp"
    config = {"trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "inference_mode": False,
                          "logger": False, "enable_progress_bar": False, "limit_predict_batches": 50,
                          "default_root_dir": str(out),
                          # 50 batches of a pass, features projected and dropped (a store would refuse to finish)
                          "callbacks": [{"class_path": "rose_pl.features.projection.ProjectionCallback",
                                         "init_args": {"dim": 64}},
                                        {"class_path": "pool_scale.RankMemory", "init_args": {"out": str(out)}}]},
              "model": {"class_path": "rose_pl.features.module.GradientFeatureModule",
                        "init_args": {"model": str(model_dir), "parameters": ["*q_proj.weight"],
                                      "max_tokens_per_pass": None}},
              "data": {"class_path": "rose_pl.data.datamodule.FeatureDataModule",
                       "init_args": {"data_file": str(work / "pool.jsonl"), "tokenizer": str(model_dir),
                                     "max_seq_length": 512, "cache": str(work / "cache"), "batch_size": 8}},
              "return_predictions": False}
    out.mkdir(parents=True, exist_ok=True)
    (out / "predict.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rose_pl", "-q", "predict", "--config", str(out / "predict.yaml")],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
    return {"wall_s": round(wall, 2), "ranks": ranks}


import lightning.pytorch as pl  # noqa: E402  (the callback below is named by class path in the DDP pass)


class RankMemory(pl.Callback):
    """Writes its rank's peak RSS when the DDP pass ends."""

    def __init__(self, out: str):
        self.out = out

    def setup(self, trainer, pl_module, stage):
        self.anon = AnonPeak()

    def teardown(self, trainer, pl_module, stage):
        Path(self.out, f"rank-{trainer.global_rank}.json").write_text(json.dumps(
            {"rank": trainer.global_rank, "peak_rss_mb": round(peak_rss_mb(), 1), "peak_anon_mb": self.anon.stop(),
             **rss_parts_mb()}))


def run_step(name: str, work: Path, model: str, num_proc: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--step", name, "--work", str(work), "--model", model,
                           "--num-proc", str(num_proc)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": done.stderr[-3000:]}
    return {"wall_s": round(wall, 2), **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10000, 100000, 1000000])
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--work", default="/tmp/rose_pl_pool_scale")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:  # one step, in this fresh process (work_s: the step alone, imports excluded)
        import rose_pl.data.datamodule  # noqa: F401  (the imports every step needs, before the clock starts)
        import rose_pl.selection.baselines  # noqa: F401
        import rose_pl.selection.report  # noqa: F401
        import rose_pl.selection.select  # noqa: F401

        anon = AnonPeak()
        start = time.perf_counter()
        found = step(args.step, Path(args.work), args.model, args.num_proc)
        print(json.dumps({"work_s": round(time.perf_counter() - start, 2), "peak_anon_mb": anon.stop(), **found}))
        return

    from rose_pl.testing import save_tiny_model

    base = Path(args.work)
    model_dir = save_tiny_model(base / "model", max_position_embeddings=1024)
    imports = subprocess.run([sys.executable, "-c", "import resource, torch, rose_pl.data.datamodule, "
                              "rose_pl.selection.select; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                             capture_output=True, text=True)
    results = {"import_rss_mb": round(int(imports.stdout.strip()) / 1024, 1), "threads": args.threads,
               "num_proc": args.num_proc, "cpus": os.cpu_count(), "sizes": {}}
    for rows in args.rows:
        work = base / f"pool_{rows}"
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "pool.jsonl").is_file():
            write_pool(work / "pool.jsonl", rows)
        if "scoring" in args.steps and not (work / "exact").is_dir():
            write_exact_stores(work, rows)
        size = {"pool_mb": round((work / "pool.jsonl").stat().st_size / 2**20, 1)}
        for name in args.steps:
            size[name] = ddp_pass(work, model_dir) if name == "ddp" else run_step(
                name, work, str(model_dir), args.num_proc, args.threads)
            print(rows, name, size[name], flush=True)
        results["sizes"][str(rows)] = size
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
