"""Throughput of influence scoring from on-disk fp16 memmaps, and padding of the demo pool's batches.

Scoring: `--checkpoints` training feature files of N x d float16 (random unit rows, written once to
`--workdir`), scored by `rose_pl.selection.influence.influence_scores` against `--num-val` validation rows per
checkpoint in `--num-tasks` tasks. The memmaps are timed cold (each file's pages dropped from the page
cache with posix_fadvise, which touches no other file) and warm (second pass). Prints rows/s and the
projected time for `--project-rows` (270K, the size of LESS's Tulu pool).

Padding: the demo pool tokenized in the Tulu chat format (rose_pl.data.encoding.Encoder) with the embedded SmolLM2
tokenizer (or the byte tokenizer when that is unavailable); share of padded token slots in batches of
`--pad-batch-size` for random batches, LengthGroupedSampler batches (training) and LengthSortedSampler
batches (the gradient stage's predict order).

Run `python benchmarks/bench_scoring.py --help`; benchmarks/README.md has the recorded numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rose_pl.selection.influence import influence_scores

REPO = Path(__file__).resolve().parents[1]
WRITE_ROWS = 16384  # rows generated and written per chunk when creating the memmaps


def _drop_page_cache(path: Path) -> bool:
    """Evict this file's clean pages (POSIX_FADV_DONTNEED); False where the platform lacks it."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def write_features(path: Path, rows: int, dim: int, seed: int) -> None:
    """Random unit rows in float16, written chunk by chunk (never the whole matrix in memory)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, rows, WRITE_ROWS):
        stop = min(start + WRITE_ROWS, rows)
        block = torch.nn.functional.normalize(torch.randn(stop - start, dim, generator=gen), dim=1)
        out[start:stop] = block.half().numpy()
    out.flush()
    del out


def bench_scoring(args) -> dict:
    device = torch.device(args.device)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rose_bench_scoring."))
    workdir.mkdir(parents=True, exist_ok=True)
    files = [workdir / f"train_ckpt{c}_{args.num_train}x{args.dim}.npy" for c in range(args.checkpoints)]
    t0 = time.perf_counter()
    for c, f in enumerate(files):
        if not f.exists() or np.load(f, mmap_mode="r").shape != (args.num_train, args.dim):
            write_features(f, args.num_train, args.dim, seed=args.seed + c)
    gib = sum(f.stat().st_size for f in files) / (1 << 30)
    print(f"training features: {args.checkpoints} x {args.num_train:,} x {args.dim} fp16 = {gib:.2f} GiB in {workdir} "
          f"(ready in {time.perf_counter() - t0:.1f}s)", flush=True)
    gen = torch.Generator().manual_seed(args.seed + 1000)
    val = [torch.nn.functional.normalize(torch.randn(args.num_val, args.dim, generator=gen), dim=1).half().numpy()
           for _ in range(args.checkpoints)]
    task_ids = [f"task{i % args.num_tasks}" for i in range(args.num_val)]
    weights = [2e-5 * (1 - c / (2 * args.checkpoints)) for c in range(args.checkpoints)]  # decaying lr, as in warmup

    passes = []
    for label in ("cold", "warm"):
        dropped = all(_drop_page_cache(f) for f in files) if label == "cold" else False
        train = [np.load(f, mmap_mode="r") for f in files]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        result = influence_scores(train, val, task_ids, weights, block_size=args.block_size, device=device)
        seconds = time.perf_counter() - t0
        rows_per_s = args.num_train / seconds
        passes.append({"pass": label, "page_cache_dropped": dropped, "seconds": seconds, "rows_per_s": rows_per_s,
                       "projected_seconds": args.project_rows / rows_per_s,
                       "read_gib_per_s": gib / seconds})
        print(f"  {label}: {seconds:.2f}s, {rows_per_s:,.0f} rows/s, {gib / seconds:.2f} GiB/s read, "
              f"projected {args.project_rows:,} rows: {args.project_rows / rows_per_s:.1f}s", flush=True)
        assert result.num_rows == args.num_train
        del train, result
    if not args.keep:
        if args.workdir:
            for f in files:
                f.unlink()
        else:
            shutil.rmtree(workdir)
    return {"num_train": args.num_train, "dim": args.dim, "checkpoints": args.checkpoints, "num_val": args.num_val,
            "num_tasks": args.num_tasks, "block_size": args.block_size, "device": str(device), "data_gib": gib,
            "project_rows": args.project_rows, "passes": passes}


def load_tokenizer(name: str):
    """(tokenizer, description): the embedded/hub tokenizer, else the byte tokenizer (reason printed)."""
    from rose_pl.hub import load_tokenizer as hub_tokenizer
    from rose_pl.testing import byte_tokenizer

    try:
        return hub_tokenizer(name), name
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"; it is printed and recorded
        why = f"{type(e).__name__}: {e}".replace("\n", " ")
        print(f"tokenizer {name!r} unavailable ({why}); using the byte tokenizer", flush=True)
        return byte_tokenizer(), f"byte tokenizer (fallback: {why})"


def bench_padding(args) -> dict:
    from rose_pl.data.encoding import Encoder
    from rose_pl.data.formats import read_instructions
    from rose_pl.data.samplers import LengthGroupedSampler, LengthSortedSampler, padding_fraction

    tokenizer, tokenizer_name = load_tokenizer(args.tokenizer)
    encoder = Encoder(tokenizer, args.max_seq_length, preference_format=None)  # Tulu template
    examples = read_instructions(args.pool)
    lengths = [len(encoder.encode_messages(e.messages)["input_ids"]) for e in examples]
    bs = args.pad_batch_size

    def chunks(order):
        order = list(order)
        return [order[i:i + bs] for i in range(0, len(order), bs)]

    gen = torch.Generator().manual_seed(args.seed)
    orders = {
        "random": torch.randperm(len(lengths), generator=gen).tolist(),
        "length_grouped": list(LengthGroupedSampler(lengths, batch_size=bs, seed=args.seed)),
        "length_sorted": list(LengthSortedSampler(lengths)),
    }
    fractions = {name: padding_fraction(lengths, chunks(order)) for name, order in orders.items()}
    print(f"padding of {args.pool} ({len(lengths)} rows, tokens min/median/max "
          f"{min(lengths)}/{int(np.median(lengths))}/{max(lengths)}, {tokenizer_name}), batch size {bs}:", flush=True)
    for name, f in fractions.items():
        print(f"  {name:<15} {100 * f:5.1f}% of token slots are padding", flush=True)
    return {"pool": str(args.pool), "rows": len(lengths), "tokenizer": tokenizer_name,
            "max_seq_length": args.max_seq_length, "batch_size": bs,
            "length_min": min(lengths), "length_median": float(np.median(lengths)), "length_max": max(lengths),
            "padding_fraction": fractions}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="scoring device: cpu or cuda")
    parser.add_argument("--num-train", type=int, default=None, help="training rows (default 270000 on cuda, 50000 on cpu)")
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--num-val", type=int, default=100, help="validation rows per checkpoint")
    parser.add_argument("--num-tasks", type=int, default=4, help="tasks the validation rows are grouped into")
    parser.add_argument("--block-size", type=int, default=None, help="rows per block (default influence's)")
    parser.add_argument("--project-rows", type=int, default=270000, help="pool size the time is projected to")
    parser.add_argument("--workdir", default=None, help="folder of the memmaps (default a fresh temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the memmaps (reused by a later run)")
    parser.add_argument("--skip-scoring", action="store_true")
    parser.add_argument("--pool", default=str(REPO / "data" / "pool.jsonl"))
    parser.add_argument("--tokenizer", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--pad-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file to write (e.g. benchmarks/results/scoring_cpu.json)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    if args.num_train is None:
        args.num_train = 270000 if args.device.startswith("cuda") else 50000
    if args.block_size is None:
        from rose_pl.selection.influence import DEFAULT_BLOCK_SIZE

        args.block_size = DEFAULT_BLOCK_SIZE
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else _cpu_name()
    report = {"benchmark": "bench_scoring",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device_name, "torch": torch.__version__, "settings": vars(args)}
    if not args.skip_scoring:
        report["scoring"] = bench_scoring(args)
    report["padding"] = bench_padding(args)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {out}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


if __name__ == "__main__":
    main()
