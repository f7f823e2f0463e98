"""Where the time of one feature batch goes: autograd, per-sample einsums, Adam transform, projection.

Times the stages of rose_pl's train-feature path by wrapping (in this script only) the per-sample
gradient hook and the sinks, then lists the top operators of the LESS-style loop and of the batched
path under torch.profiler. Same model/data settings as bench_features.py (`--preset`, `--seq-len`, ...).
CPU timings are exact; on CUDA every wrapped stage synchronizes, which slows the path being measured.

    python benchmarks/profile_features.py --threads 1 --out benchmarks/results/profile_tiny_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_features as bf  # noqa: E402

from rose_pl.files import atomic_write_json
from rose_pl.features.objectives import DPOObjective, SFTObjective  # noqa: E402
from rose_pl.features.per_sample_grads import PerSampleGradients  # noqa: E402
from rose_pl.features.transforms import AdamTransformSink  # noqa: E402
from rose_pl.features.projection import NormalizingSink  # noqa: E402


class Clock:
    """Accumulates wall time of named stages (synchronizing CUDA around each)."""

    def __init__(self, device: torch.device):
        self.device, self.totals = device, {}

    def wrap(self, name, fn):
        def timed(*a, **k):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0
        return timed


def breakdown(model, batch, projector, adam_state, compute_dtype, device, iters) -> dict:
    """Seconds per sample of: whole path, per-sample hook (einsum + reduction), Adam, projection + norm."""
    clock = Clock(device)
    psg = PerSampleGradients(model, compute_dtype=compute_dtype)
    psg._accumulate = clock.wrap("per_sample_einsum", psg._accumulate)  # instance attribute shadows the method
    inner = NormalizingSink(projector)
    inner.add = clock.wrap("projection_add", inner.add)
    inner.finish = clock.wrap("projection_finish_norm", inner.finish)
    sink = AdamTransformSink(inner, adam_state, *bf.ADAM_BETAS, bf.ADAM_EPS)
    sink.add = clock.wrap("adam_and_projection_add", sink.add)
    obj = SFTObjective()
    psg.compute(obj, batch, sink)  # warm-up
    clock.totals = {}
    t0 = time.perf_counter()
    for _ in range(iters):
        psg.compute(obj, batch, sink)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - t0
    t = clock.totals
    samples = iters * batch["input_ids"].shape[0]
    parts = {
        "per_sample_einsum": t.get("per_sample_einsum", 0.0),
        "adam": t.get("adam_and_projection_add", 0.0) - t.get("projection_add", 0.0),
        "projection": t.get("projection_add", 0.0) + t.get("projection_finish_norm", 0.0),
    }
    parts["autograd_fwd_bwd_rest"] = total - sum(parts.values())
    return {"ms_per_sample_total": 1000 * total / samples,
            "ms_per_sample": {k: 1000 * v / samples for k, v in parts.items()},
            "share": {k: v / total for k, v in parts.items()}}


def top_ops(fn, device, rows: int) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    with profile(activities=activities) as prof:
        fn()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(bf.PRESETS), default="tiny")
    for flag in ("--seq-len", "--lora-rank", "--batch-size", "--iters"):
        parser.add_argument(flag, type=int)
    parser.add_argument("--dtype")
    parser.add_argument("--device")
    parser.add_argument("--projector", default="countsketch")
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--project-interval", type=int, default=16)
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--top", type=int, default=12, help="operators listed per profile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    for key, value in bf.PRESETS[args.preset]["run"].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.gaussian_cache_gb, args.allow_uncached_gaussian = 4.0, False
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = bf.build_model(args.preset, args.lora_rank, dtype, device, args.attn_implementation, args.seed)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(args.seed)
    adam_state = bf.random_adam_state(shapes, device, gen)
    vocab = bf.PRESETS[args.preset]["model"]["vocab_size"]
    data = bf.random_rows(max(args.batch_size, args.project_interval), args.seq_len, vocab, gen)
    batch = bf.rows(data, 0, args.batch_size, device)
    singles = [bf.rows(data, i, i + 1, device) for i in range(args.project_interval)]
    dpo_bs = max(1, args.batch_size // 2)
    pairs = bf.preference_rows(max(dpo_bs, args.project_interval), args.seq_len, vocab, gen)
    pref_batch = bf.rows(pairs, 0, dpo_bs, device)
    pref_singles = [bf.rows(pairs, i, i + 1, device) for i in range(args.project_interval)]
    projector, why = bf.make_projector(args.projector, args, sum(s.numel() for s in shapes.values()))
    if projector is None:
        parser.error(f"projector {args.projector} unavailable: {why}")
    projector.setup(shapes, device)

    report = {"device": bf.device_name(device), "settings": vars(args)}
    report["rose_breakdown"] = breakdown(model, batch, projector, adam_state, None, device, args.iters)
    print("rose train-feature path, per sample:")
    b = report["rose_breakdown"]
    print(f"  total {b['ms_per_sample_total']:.2f} ms")
    for k, v in b["ms_per_sample"].items():
        print(f"  {k:<24} {v:8.2f} ms  {100 * b['share'][k]:5.1f}%")

    loop = bf.LessLoop(model, SFTObjective(), projector, adam_state, args.project_interval)
    psg = PerSampleGradients(model)
    sink = AdamTransformSink(NormalizingSink(projector), adam_state, *bf.ADAM_BETAS, bf.ADAM_EPS)
    dpo = DPOObjective(reference="adapter_disabled")
    dpo_loop = bf.LessLoop(model, dpo, projector, None, args.project_interval)
    dpo_sink = NormalizingSink(projector)
    n_dpo = -(-args.project_interval // dpo_bs)  # as many pairs as the loop's chunk
    tables = {
        f"LESS-style loop, {args.project_interval} samples at batch size 1": top_ops(lambda: loop(singles), device,
                                                                                    args.top),
        f"rose path, {args.project_interval // args.batch_size} batch(es) of {args.batch_size}": top_ops(
            lambda: [psg.compute(SFTObjective(), batch, sink) for _ in range(args.project_interval // args.batch_size)],
            device, args.top),
        f"DPO loop (adapter_disabled reference), {args.project_interval} pairs at batch size 1": top_ops(
            lambda: dpo_loop(pref_singles), device, args.top),
        f"DPO batched (adapter_disabled reference), {n_dpo} batch(es) of {dpo_bs} pairs": top_ops(
            lambda: [psg.compute(dpo, pref_batch, dpo_sink) for _ in range(n_dpo)], device, args.top),
    }
    for title, table in tables.items():
        print(f"\n== {title} ==\n{table}")
    report["top_ops"] = tables
    if args.out:
        print(f"wrote {atomic_write_json(args.out, report, default=str, sort_keys=False)}")


if __name__ == "__main__":
    main()
