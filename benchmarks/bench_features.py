"""Throughput and peak memory of gradient-feature extraction: LESS-style loop vs rose_pl's batched path.

One process, one randomly initialized Llama-shaped model with LoRA on q/k/v/o, random full-length token
ids (no padding). Rows of the table:

  loop          LESS-style: batch size 1, loss.backward(), flatten the LoRA grads into one vector,
                Adam direction with a fixed random optimizer state, buffer `--project-interval` vectors,
                project them together, L2-normalize.
  loop-fwdbwd   the same loop without flatten/Adam/projection (how much of the loop is autograd).
  floor         plain batched forward + backward at `--batch-size`, no per-sample work.
  psg-only      PerSampleGradients with a sink that discards the blocks (hooks + per-sample einsums).
  psg+adam      ... plus AdamTransformSink (still no projection).
  rose          rose_pl's train-feature path: PerSampleGradients + AdamTransformSink + projector + L2 norm.
  exact         rose_pl's exact train path: PerSampleGradients + AdamTransformSink + ExactScoreSink against
                `--exact-tasks` random task means (unprojected, float32 or `--exact-means-dtype bfloat16`).
  dpo           rose_pl's DPO-feature path (DPOObjective, reference adapter_disabled; dpo-noref: none),
                PerSampleGradients + projector + L2 norm, batched (one sample = one chosen/rejected pair).
  dpo-loop      its batch-size-1 equivalent (backward per pair, flatten, project, normalize); dpo-noref-loop.
  proj-only     projector alone on random per-sample gradient blocks of the LoRA shapes.

Run `python benchmarks/bench_features.py --help`; benchmarks/README.md has the recorded numbers.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import resource
import statistics
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from rose_pl.files import atomic_write_json
from rose_pl.config import LoRAArgs
from rose_pl.errors import ConfigError
from rose_pl.training.model import add_lora
from rose_pl.data.encoding import IGNORE_INDEX
from rose_pl.features.exact import ExactScoreSink
from rose_pl.features.objectives import DPOObjective, SFTObjective
from rose_pl.features.per_sample_grads import BlockSink, PerSampleGradients
from rose_pl.features.transforms import AdamTransformSink, adam_direction
from rose_pl.features.projection import GaussianProjector, NormalizingSink, Projector, build_projector

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Llama shapes of the reference numbers; `run` holds each preset's default settings.
PRESETS = {
    # The test suite's model (rose_pl.testing.tiny_llama): per-call overhead dominates, as it does for
    # small models on any device.
    "micro": {
        "model": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=260),
        "run": dict(seq_len=64, lora_rank=4, batch_size=8, dtype="float32", device="cpu", warmup_iters=2, iters=20),
    },
    "tiny": {
        "model": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=1024, vocab_size=8192),
        "run": dict(seq_len=128, lora_rank=16, batch_size=8, dtype="float32", device="cpu", warmup_iters=1, iters=3),
    },
    "1b": {
        "model": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=32000),
        "run": dict(seq_len=512, lora_rank=128, batch_size=16, dtype="bfloat16", device="cuda", warmup_iters=2,
                    iters=8),
    },
    "7b": {
        "model": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000),
        "run": dict(seq_len=512, lora_rank=128, batch_size=16, dtype="bfloat16", device="cuda", warmup_iters=1,
                    iters=4),
    },
}
# A fixed random optimizer state stands in for a warmup checkpoint's; these are AdamW's usual values.
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
MIB = 1 << 20


# ---- measurement ---------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a block: torch.cuda.max_memory_allocated on CUDA, sampled process RSS on CPU."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device, self.interval_s = device, interval_s
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


@dataclass
class Case:
    """One timed configuration: `iters` calls of `step`, each handling `samples_per_step` samples."""

    path: str
    projector: str | None
    batch_size: int
    step: Callable[[], object]
    samples_per_step: int
    iters: int
    warmup: Callable[[], object] | None = None
    extra: dict = field(default_factory=dict)
    enter: Callable[[], object] | None = None
    """Untimed set-up before the warm-up and before each timed round (e.g. allocate the exact task means), so
    that what it allocates is resident only while this case runs, not during the other cases' rounds."""
    exit: Callable[[], object] | None = None
    """Untimed tear-down after the warm-up and after each timed round (free what `enter` allocated)."""


def _entered(case: Case, fn: Callable[[], object]) -> object:
    """fn() between the case's untimed enter and exit."""
    if case.enter is not None:
        case.enter()
    try:
        return fn()
    finally:
        if case.exit is not None:
            case.exit()


def _time_once(case: Case, device: torch.device) -> tuple[float, int, int]:
    """(seconds, peak bytes, peak bytes above the start) of one timed round of `case`."""
    start = torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss_bytes()
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        for _ in range(case.iters):
            case.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return seconds, mem.peak, mem.peak - start


def run_cases(cases: list[Case], rounds: int, device: torch.device) -> list[dict]:
    """Warm every case, then time them round-robin `rounds` times; report the best and the median round.

    Round-robin plus best-of-rounds keeps a burst of load from another process (a shared CPU) from
    landing on one path only. A case that runs out of GPU memory is reported as such and dropped.
    """
    failed: dict[int, str] = {}

    def attempt(i, fn):
        try:
            return fn()
        except torch.OutOfMemoryError as e:
            failed[i] = f"out of memory: {str(e).splitlines()[0]}"
            print(f"  {cases[i].path}[{cases[i].projector or '-'}]: {failed[i]}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    for i, case in enumerate(cases):
        attempt(i, lambda case=case: _entered(case, case.warmup or case.step))
    timings: list[list[tuple[float, int, int]]] = [[] for _ in cases]
    for r in range(rounds):
        for i, case in enumerate(cases):
            if i not in failed:
                t = attempt(i, lambda: _entered(case, lambda: _time_once(case, device)))
                if t is not None:
                    timings[i].append(t)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{c.path}[{c.projector or '-'}] {c.iters * c.samples_per_step / t[-1][0]:.2f}"
            for i, (c, t) in enumerate(zip(cases, timings)) if i not in failed), flush=True)
    out = []
    for i, (case, ts) in enumerate(zip(cases, timings)):
        row = {"path": case.path, "projector": case.projector, "batch_size": case.batch_size, **case.extra}
        if i in failed:
            out.append({**row, "error": failed[i]})
            continue
        samples = case.iters * case.samples_per_step
        rates = [samples / t for t, _, _ in ts]
        best = max(rates)
        out.append({**row, "samples_per_s": best, "median_samples_per_s": statistics.median(rates),
                    "ms_per_sample": 1000 / best, "samples_per_round": samples, "rounds_samples_per_s": rates,
                    "peak_mem_mib": max(p for _, p, _ in ts) / MIB,
                    "peak_over_start_mib": max(d for _, _, d in ts) / MIB})
    return out


# ---- model and data ------------------------------------------------------------------------------------
def build_model(preset: str, rank: int, dtype: torch.dtype, device: torch.device, attn: str, seed: int):
    """A random-init Llama of the preset's shape with LoRA (alpha = 4r, as LESS's 128/512) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**PRESETS[preset]["model"], max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device(device):
        base = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn)
    model = add_lora(base, LoRAArgs(r=rank, alpha=4 * rank, dropout=0.0, target_modules=TARGET_MODULES))
    with torch.no_grad():  # peft starts B at 0, which zeroes every gradient of A: not a realistic workload
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model.eval()


def lora_shapes(preset: str, rank: int) -> dict[str, torch.Size]:
    """LoRA parameter shapes of a preset, named as peft names them, without building the model."""
    m = PRESETS[preset]["model"]
    hidden, head = m["hidden_size"], m["hidden_size"] // m["num_attention_heads"]
    io = {"q_proj": (hidden, m["num_attention_heads"] * head), "k_proj": (hidden, m["num_key_value_heads"] * head),
          "v_proj": (hidden, m["num_key_value_heads"] * head), "o_proj": (m["num_attention_heads"] * head, hidden)}
    shapes = {}
    for layer in range(m["num_hidden_layers"]):
        for mod, (fan_in, fan_out) in io.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            shapes[f"{prefix}.lora_A.default.weight"] = torch.Size((rank, fan_in))
            shapes[f"{prefix}.lora_B.default.weight"] = torch.Size((fan_out, rank))
    return shapes


def random_rows(n: int, seq_len: int, vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Full-length random rows; the first quarter plays the prompt (labels -100)."""
    ids = torch.randint(4, vocab, (n, seq_len), generator=gen)
    labels = ids.clone()
    labels[:, : seq_len // 4] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def preference_rows(n: int, seq_len: int, vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    batch = {}
    for side in ("chosen", "rejected"):
        batch.update({f"{side}_{k}": v for k, v in random_rows(n, seq_len, vocab, gen).items()})
    return batch


def rows(batch: dict, start: int, stop: int, device: torch.device) -> dict:
    return {k: v[start:stop].to(device) for k, v in batch.items()}


def random_adam_state(shapes: dict[str, torch.Size], device: torch.device, gen: torch.Generator) -> dict:
    state = {}
    for name, shape in shapes.items():
        exp_avg = torch.randn(shape, generator=gen) * 1e-4
        exp_avg_sq = (torch.randn(shape, generator=gen) * 1e-4) ** 2
        state[name] = (exp_avg.to(device), exp_avg_sq.to(device))
    return state


def random_task_means(shapes: dict[str, torch.Size], tasks: int, dtype: torch.dtype, device: torch.device,
                      seed: int) -> dict[str, torch.Tensor]:
    """{name: (tasks, numel)} random task means, each task's whole vector of unit norm (like a mean of unit
    vectors, whose norm is at most 1). Drawn on the device: at 7b shapes 30 tasks are 4e9 numbers."""
    gen = torch.Generator(device=device).manual_seed(seed)
    means = {n: torch.randn((tasks, s.numel()), generator=gen, device=device, dtype=torch.float32)
             for n, s in shapes.items()}
    norm = torch.zeros(tasks, device=device)
    for m in means.values():
        norm += m.pow(2).sum(1)
    scale = norm.rsqrt_()[:, None]
    return {n: m.mul_(scale).to(dtype) for n, m in means.items()}


def task_means_bytes(input_dim: int, tasks: int, dtype: torch.dtype) -> int:
    """Memory of the exact path's task means: tasks x trainable parameters x element size."""
    return tasks * input_dim * torch.empty((), dtype=dtype).element_size()


def _exact_scores(columns: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """Per-task scores inner / sqrt(norm2) from ExactScoreSink's columns (each group, then its norm2)."""
    out, start = [], 0
    for width in groups:
        out.append(columns[:, start:start + width] / columns[:, start + width:start + width + 1].sqrt())
        start += width + 1
    return torch.cat(out, 1)


def check_exact(args, psg, sft_obj, batch: dict, shapes: dict, adam_state: dict, device: torch.device) -> dict:
    """ExactScoreSink's scores against float64 inner products of the same Adam directions (collected whole)."""
    k, tasks = batch["input_ids"].shape[0], sum(args.exact_tasks)
    means = random_task_means(shapes, tasks, getattr(torch, args.exact_means_dtype), device, args.seed + 1)
    got = psg.compute(sft_obj, batch, AdamTransformSink(
        ExactScoreSink(means, args.exact_tasks), adam_state, *ADAM_BETAS, ADAM_EPS)).double()
    blocks = psg.compute(sft_obj, batch, AdamTransformSink(BlockSink(list(shapes)), adam_state, *ADAM_BETAS, ADAM_EPS))
    inner = sum(blocks[n].reshape(k, -1).double() @ means[n].double().T for n in shapes)
    norm2 = sum(blocks[n].reshape(k, -1).double().pow(2).sum(1) for n in shapes)
    want, start = [], 0
    for width in args.exact_tasks:
        want += [inner[:, start:start + width], norm2[:, None]]
        start += width
    want = torch.cat(want, 1)
    got_scores, want_scores = _exact_scores(got, args.exact_tasks), _exact_scores(want, args.exact_tasks)
    out = {"rows": k, "tasks": tasks, "max_abs_diff_score": float((got_scores - want_scores).abs().max()),
           "max_abs_score": float(want_scores.abs().max()),
           "max_rel_diff_norm2": float(((got[:, -1] - want[:, -1]) / want[:, -1]).abs().max())}
    print(f"agreement exact sink vs float64 ({k} rows, {tasks} tasks): max |score diff| "
          f"{out['max_abs_diff_score']:.2e} (max |score| {out['max_abs_score']:.2e})", flush=True)
    return out


# ---- projectors ----------------------------------------------------------------------------------------
def make_projector(kind: str, args, input_dim: int) -> tuple[Projector | None, str]:
    """(projector, "") or (None, why it is skipped)."""
    try:
        if kind == "gaussian":
            matrix_bytes = input_dim * args.dim * 4
            cache = int(args.gaussian_cache_gb * (1 << 30))
            if matrix_bytes > cache and not args.allow_uncached_gaussian:
                return None, (f"its {input_dim:,} x {args.dim} matrix ({matrix_bytes / (1 << 30):.1f} GiB) exceeds "
                              f"--gaussian-cache-gb={args.gaussian_cache_gb}, so it would be redrawn on the CPU "
                              "for every batch; pass --allow-uncached-gaussian to time that anyway")
            return GaussianProjector(dim=args.dim, seed=args.seed, cache_bytes=cache), ""
        if kind == "trak":
            return build_projector("trak", dim=args.dim, seed=args.seed, backend="cuda"), ""
        if kind == "trak-basic":
            return build_projector("trak", dim=args.dim, seed=args.seed, backend="basic"), ""
        return build_projector(kind, dim=args.dim, seed=args.seed), ""
    except ConfigError as e:
        return None, str(e).replace("\n", " ")
    except ImportError as e:
        return None, f"import failed: {e}"


class _Discard:
    """GradientSink that drops every block: times per-sample gradients without projection."""

    def begin(self, num_samples, device):
        pass

    def add(self, name, grad):
        pass

    def finish(self):
        return None


# ---- the LESS-style loop -------------------------------------------------------------------------------
class LessLoop:
    """Batch size 1 backward, flatten, optional Adam direction, project `interval` vectors at a time."""

    def __init__(self, model, objective, projector: Projector | None, adam_state: dict | None, interval: int):
        self.model, self.objective, self.interval = model, objective, interval
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.sink = NormalizingSink(projector) if projector is not None else None
        self.adam = None
        if adam_state is not None:  # LESS keeps m and v as flat vectors in named_parameters order
            self.adam = tuple(torch.cat([adam_state[n][i].reshape(-1) for n in self.params]) for i in (0, 1))
        self.slices, start = {}, 0
        for n, p in self.params.items():
            self.slices[n] = (start, start + p.numel(), p.shape)
            start += p.numel()

    def _project(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(vectors)
        self.sink.begin(len(vectors), stacked.device)
        for name, (a, b, shape) in self.slices.items():
            self.sink.add(name, stacked[:, a:b].reshape(len(vectors), *shape))
        return self.sink.finish()

    def __call__(self, singles: list[dict]) -> torch.Tensor | None:
        buffer, out = [], []
        for batch in singles:
            loss = self.objective(self.model, batch).losses.sum()
            loss.backward()
            if self.sink is None:  # loop-fwdbwd: autograd only
                for p in self.params.values():
                    p.grad = None
                continue
            grad = torch.cat([p.grad.reshape(-1) for p in self.params.values()]).float()
            for p in self.params.values():
                p.grad = None
            if self.adam is not None:
                grad = adam_direction(grad, *self.adam, ADAM_BETAS[0], ADAM_BETAS[1], ADAM_EPS)
            buffer.append(grad)
            if len(buffer) == self.interval:
                out.append(self._project(buffer))
                buffer = []
        if buffer:
            out.append(self._project(buffer))
        return torch.cat(out) if out else None


# ---- the run -------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def time_model_paths(args, device: torch.device) -> dict:
    """Build the model and time every path that runs it; returns results and model facts."""
    dtype = getattr(torch, args.dtype)
    compute_dtype = None if args.compute_dtype == "activation" else getattr(torch, args.compute_dtype)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = PRESETS[args.preset]["model"]["vocab_size"]
    t_build = time.perf_counter()
    model = build_model(args.preset, args.lora_rank, dtype, device, args.attn_implementation, args.seed)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    input_dim = sum(s.numel() for s in shapes.values())
    adapter_dtype = str(next(p.dtype for p in model.parameters() if p.requires_grad))
    print(f"model {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{input_dim:,} LoRA params ({adapter_dtype}), built in {time.perf_counter() - t_build:.1f}s", flush=True)
    adam_state = random_adam_state(shapes, device, gen)
    interval, bs = args.project_interval, args.batch_size
    sft = random_rows(max(bs, interval), args.seq_len, vocab, gen)
    pairs = preference_rows(max(args.dpo_batch_size, interval), args.seq_len, vocab, gen)
    sft_batch, pref_batch = rows(sft, 0, bs, device), rows(pairs, 0, args.dpo_batch_size, device)
    sft_singles = [rows(sft, i, i + 1, device) for i in range(interval)]
    pref_singles = [rows(pairs, i, i + 1, device) for i in range(interval)]
    loop_iters = args.loop_iters or max(1, math.ceil(args.iters * bs / interval))
    w, n = args.warmup_iters, args.iters

    projectors, skipped = {}, {}
    for kind in args.projectors:
        p, why = make_projector(kind, args, input_dim)
        if p is None:
            skipped[kind] = why
            print(f"skipping projector {kind}: {why}", flush=True)
        else:
            p.setup(shapes, device)
            projectors[kind] = p
    sft_obj = SFTObjective()
    psg = PerSampleGradients(model, compute_dtype=compute_dtype)

    # Agreement: the loop and the batched path must produce the same features (same matrix, same seed).
    agreement = {}
    if projectors and not args.skip_check:
        kind = next(iter(projectors))
        k = min(bs, interval)
        loop_feats = LessLoop(model, sft_obj, projectors[kind], adam_state, interval)(sft_singles[:k])
        sink = AdamTransformSink(NormalizingSink(projectors[kind]), adam_state, *ADAM_BETAS, ADAM_EPS)
        batched = psg.compute(sft_obj, rows(sft, 0, k, device), sink)
        cos = F.cosine_similarity(loop_feats.float(), batched.float(), dim=1)
        agreement = {"projector": kind, "rows": k, "min_cosine": float(cos.min()),
                     "max_abs_diff": float((loop_feats - batched).abs().max())}
        print(f"agreement loop vs batched ({kind}, {k} rows): min cosine {agreement['min_cosine']:.6f}, "
              f"max |diff| {agreement['max_abs_diff']:.2e}", flush=True)

    if args.exact_tasks and not args.skip_check:
        try:
            agreement["exact"] = check_exact(args, psg, sft_obj, rows(sft, 0, min(bs, 4), device), shapes, adam_state,
                                             device)
        except torch.OutOfMemoryError as e:  # the timed case reports its own out-of-memory; do not stop the run
            agreement["exact"] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            print(f"agreement exact: {agreement['exact']['error']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def loop_case(path, kind, loop, singles, iters, **extra):
        # warm-up: two samples take every code path once (backward, flatten, Adam, a partial projection)
        return Case(path, kind, 1, lambda: loop(singles), interval, iters, lambda: loop(singles[:2]), extra)

    def batched_case(path, kind, batch_size, step, **extra):
        warm = (lambda: [step() for _ in range(w)]) if w > 1 else (step if w == 1 else (lambda: None))
        return Case(path, kind, batch_size, step, batch_size, n, warm, extra)

    params = [p for p in model.parameters() if p.requires_grad]
    cases = []
    for kind, p in projectors.items():
        loop = LessLoop(model, sft_obj, p, adam_state, interval)
        cases.append(loop_case("loop", kind, loop, sft_singles, loop_iters, project_interval=interval))
    if args.breakdown:
        cases.append(loop_case("loop-fwdbwd", None, LessLoop(model, sft_obj, None, None, interval), sft_singles,
                               loop_iters))
    cases.append(batched_case("floor", None, bs,
                              lambda: torch.autograd.grad(sft_obj(model, sft_batch).losses.sum(), params)))
    if args.breakdown:
        cases.append(batched_case("psg-only", None, bs, lambda: psg.compute(sft_obj, sft_batch, _Discard())))
        adam_only = AdamTransformSink(_Discard(), adam_state, *ADAM_BETAS, ADAM_EPS)
        cases.append(batched_case("psg+adam", None, bs, lambda: psg.compute(sft_obj, sft_batch, adam_only)))
    for kind, p in projectors.items():
        sink = AdamTransformSink(NormalizingSink(p), adam_state, *ADAM_BETAS, ADAM_EPS)
        cases.append(batched_case("rose", kind, bs, lambda sink=sink: psg.compute(sft_obj, sft_batch, sink)))
    exact_info = {}
    if args.exact_tasks:
        # Exact train path: the Adam directions stream into ExactScoreSink, which keeps per row the inner product
        # with every task mean and the squared norm; no projection, no feature store. The means are allocated
        # (untimed) only around this case's warm-up and rounds, so the other rows' peak memory excludes them.
        groups, means_dtype = args.exact_tasks, getattr(torch, args.exact_means_dtype)
        tasks = sum(groups)
        held: dict[str, object] = {}

        def exact_enter():
            means = random_task_means(shapes, tasks, means_dtype, device, args.seed + 1)
            held["sink"] = AdamTransformSink(ExactScoreSink(means, groups), adam_state, *ADAM_BETAS, ADAM_EPS)

        def exact_exit():
            held.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()

        exact_info = {"tasks": tasks, "groups": groups, "means_dtype": args.exact_means_dtype,
                      "means_mib": task_means_bytes(input_dim, tasks, means_dtype) / MIB}
        case = batched_case("exact", None, bs, lambda: psg.compute(sft_obj, sft_batch, held["sink"]), **exact_info)
        case.enter, case.exit = exact_enter, exact_exit
        cases.append(case)
        print(f"exact: {tasks} task means in groups {groups}, {args.exact_means_dtype}, "
              f"{exact_info['means_mib']:.1f} MiB", flush=True)

    dpo_kind = args.dpo_projector if args.dpo_projector in projectors else next(iter(projectors), None)
    if dpo_kind is not None and not args.skip_dpo:
        dpo_loop_iters = args.loop_iters or max(1, math.ceil(n * args.dpo_batch_size / interval))
        for reference in ("adapter_disabled", "none"):
            obj = DPOObjective(beta=0.1, reference=reference)
            tag = "dpo" if reference == "adapter_disabled" else "dpo-noref"
            sink = NormalizingSink(projectors[dpo_kind])
            cases.append(batched_case(tag, dpo_kind, args.dpo_batch_size,
                                      lambda obj=obj, sink=sink: psg.compute(obj, pref_batch, sink),
                                      reference=reference))
            loop = LessLoop(model, obj, projectors[dpo_kind], None, interval)
            cases.append(loop_case(f"{tag}-loop", dpo_kind, loop, pref_singles, dpo_loop_iters,
                                   reference=reference, project_interval=interval))
    print(f"timing {len(cases)} cases, {args.rounds} rounds (samples/s per round):", flush=True)
    results = run_cases(cases, args.rounds, device)
    return {"results": results, "agreement": agreement, "shapes": shapes, "lora_params": input_dim,
            "adapter_dtype": adapter_dtype, "loop_iters": loop_iters, "skipped_projectors": skipped,
            "exact": exact_info}


def time_projectors(args, device: torch.device, model_shapes: dict) -> list[dict]:
    """Projector alone on random per-sample gradient blocks of each preset's LoRA shapes."""
    out = []
    for preset in args.projector_shapes or [args.preset]:
        # another preset's shapes use that preset's own rank (r=128 for 1b/7b: the 27M and 134M dims)
        shapes = model_shapes if preset == args.preset else lora_shapes(preset, PRESETS[preset]["run"]["lora_rank"])
        dim = sum(s.numel() for s in shapes.values())
        blocks = {name: torch.randn((args.batch_size, *s), device=device) for name, s in shapes.items()}
        for kind in args.projectors:
            p, why = make_projector(kind, args, dim)
            if p is None:
                print(f"proj-only {preset} ({dim:,} dims): skipping {kind}: {why}", flush=True)
                out.append({"shapes": preset, "input_dim": dim, "projector": kind, "skipped": why})
                continue
            p.setup(shapes, device)
            print(f"proj-only {preset} ({dim:,} dims), {kind}:", flush=True)
            case = Case("proj-only", kind, args.batch_size, lambda p=p, b=blocks: p.project(b), args.batch_size,
                        args.iters)
            out.append({"shapes": preset, "input_dim": dim, **run_cases([case], args.rounds, device)[0]})
            del p, case
        del blocks
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def run(args) -> dict:
    device = torch.device(args.device)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model_part = time_model_paths(args, device)  # the model is freed when this returns
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    proj_only = time_projectors(args, device, model_part["shapes"])
    return {
        "benchmark": "bench_features",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "versions": {"torch": torch.__version__, **_versions()},
        "settings": {**vars(args), "model": PRESETS[args.preset]["model"], "lora_params": model_part["lora_params"],
                     "adapter_dtype": model_part["adapter_dtype"], "loop_iters": model_part["loop_iters"]},
        "skipped_projectors": model_part["skipped_projectors"],
        "exact": model_part["exact"],
        "agreement": model_part["agreement"],
        "results": model_part["results"],
        "projector_only": proj_only,
        "ratios": ratios([r for r in model_part["results"] if "error" not in r]),
        "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _versions() -> dict:
    import peft
    import transformers

    return {"transformers": transformers.__version__, "peft": peft.__version__}


def ratios(results: list[dict]) -> dict:
    """rose/loop per projector, rose/floor, exact/rose, exact/floor, exact/loop, dpo/dpo-loop per reference."""
    by = {(r["path"], r["projector"]): r["samples_per_s"] for r in results}
    out = {}
    floor = by.get(("floor", None))
    for (path, proj), sps in by.items():
        if path == "rose":
            if ("loop", proj) in by:
                out[f"rose/loop[{proj}]"] = sps / by[("loop", proj)]
            if floor:
                out[f"rose/floor[{proj}]"] = sps / floor
        if path == "exact":
            if floor:
                out["exact/floor"] = sps / floor
            for (p2, proj2), other in by.items():
                if p2 in ("rose", "loop"):
                    out[f"exact/{p2}[{proj2}]"] = sps / other
        if path in ("dpo", "dpo-noref") and (f"{path}-loop", proj) in by:
            out[f"{path}/{path}-loop[{proj}]"] = sps / by[(f"{path}-loop", proj)]
    if ("loop-fwdbwd", None) in by and floor:
        out["floor/loop-fwdbwd"] = floor / by[("loop-fwdbwd", None)]
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape (default tiny)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (tiny 128, 1b/7b 512)")
    parser.add_argument("--lora-rank", type=int, help="LoRA rank r (tiny 16, 1b/7b 128); alpha = 4r")
    parser.add_argument("--batch-size", type=int, help="rows per batch of the batched paths (tiny 8, 1b/7b 16)")
    parser.add_argument("--dpo-batch-size", type=int, help="pairs per DPO batch (default batch-size // 2: same rows)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="base weights (CPU float32)")
    parser.add_argument("--compute-dtype", default="activation", choices=["activation", "float32", "bfloat16"],
                        help="dtype of the per-sample einsums; activation = the input's dtype, as rose_pl's "
                             "GradientFeatureModule default")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--projectors", default="countsketch,gaussian,trak",
                        help="comma list of countsketch, gaussian, trak (fast_jl CUDA), trak-basic, identity")
    parser.add_argument("--dpo-projector", default="countsketch", help="projector of the DPO rows")
    parser.add_argument("--projector-shapes", default=None,
                        help="comma list of presets whose LoRA shapes proj-only uses, each at its preset's default rank "
                             "(default: the model's own shapes)")
    parser.add_argument("--dim", type=int, default=8192, help="projected dimension")
    parser.add_argument("--exact-tasks", default="30",
                        help="task means of the exact row: a number, or a comma list of per-target task counts "
                             "(e.g. 10,18,2 = SE, SHP, HH of the paper: the same 30 columns in 3 groups); "
                             "0 skips the exact row (default 30)")
    parser.add_argument("--exact-means-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype the exact row's task means are held in (ExactScoreWriter's means_dtype)")
    parser.add_argument("--project-interval", type=int, default=16, help="loop: vectors projected together (LESS 16)")
    parser.add_argument("--gaussian-cache-gb", type=float, default=4.0,
                        help="gaussian runs only if its whole matrix fits this (kept on the device)")
    parser.add_argument("--allow-uncached-gaussian", action="store_true",
                        help="time gaussian even when its matrix must be redrawn per batch (very slow)")
    parser.add_argument("--device", help="cpu or cuda (tiny cpu, 1b/7b cuda)")
    parser.add_argument("--warmup-iters", type=int, help="untimed batches before each batched measurement")
    parser.add_argument("--iters", type=int, help="timed batches per batched measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds, round-robin over all paths; the best round is reported")
    parser.add_argument("--loop-iters", type=int, default=None,
                        help="timed loop chunks of project-interval samples (default: as many samples as iters)")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                        help="skip loop-fwdbwd, psg-only and psg+adam")
    parser.add_argument("--skip-dpo", action="store_true")
    parser.add_argument("--skip-check", action="store_true", help="skip the loop-vs-batched agreement check")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's choice)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matmuls on CUDA (the fp32 "
                        "LoRA adapters peft keeps next to a bf16 base, and float32 per-sample einsums)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file to write (e.g. benchmarks/results/tiny_cpu.json)")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset]["run"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dpo_batch_size = args.dpo_batch_size or max(1, args.batch_size // 2)
    args.projectors = [p.strip() for p in args.projectors.split(",") if p.strip()]
    try:
        groups = [int(t) for t in str(args.exact_tasks).split(",") if t.strip()]
    except ValueError:
        parser.error(f"--exact-tasks {args.exact_tasks!r}: give a number or a comma list of numbers")
    if any(g < 0 for g in groups) or (len(groups) > 1 and 0 in groups):
        parser.error(f"--exact-tasks {args.exact_tasks!r}: task counts must be positive (0 alone skips the row)")
    args.exact_tasks = [g for g in groups if g > 0]
    args.projector_shapes = [p.strip() for p in args.projector_shapes.split(",")] if args.projector_shapes else None
    problems = [f"unknown preset {p!r} in --projector-shapes" for p in args.projector_shapes or [] if p not in PRESETS]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}: CUDA is not available (use --device cpu --dtype float32)")
    if problems:
        parser.error("; ".join(problems))
    return args


def print_table(report: dict) -> None:
    s = report["settings"]
    print(f"\n{report['device']} | torch {report['versions']['torch']} | preset {s['preset']} seq {s['seq_len']} "
          f"r {s['lora_rank']} ({s['lora_params']:,} LoRA params) {s['dtype']} dim {s['dim']}")
    print(f"{'path':<16} {'projector':<12} {'bs':>3} {'samples/s':>10} {'median':>10} {'ms/sample':>10} "
          f"{'peak MiB':>9} {'+MiB':>7}")
    for r in report["results"] + report["projector_only"]:
        if "skipped" in r or "error" in r:
            print(f"{r['path'] if 'shapes' not in r else 'proj-only ' + r['shapes']:<16} {r['projector'] or '-':<12} "
                  f"{r.get('skipped') or r['error']}"[:200])
            continue
        path = r["path"] if "shapes" not in r else f"proj-only {r['shapes']}"
        print(f"{path:<16} {r['projector'] or '-':<12} {r['batch_size']:>3} {r['samples_per_s']:>10.2f} "
              f"{r['median_samples_per_s']:>10.2f} {r['ms_per_sample']:>10.2f} {r['peak_mem_mib']:>9.0f} "
              f"{r['peak_over_start_mib']:>7.0f}")
    print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in report["ratios"].items()))


def main(argv=None):
    args = parse_args(argv)
    # transformers deprecates the `gradient_checkpointing` attribute that PerSampleGradients probes; once is enough.
    warnings.filterwarnings("once", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    print_table(report)
    if args.out:
        print(f"wrote {atomic_write_json(args.out, report, default=str, sort_keys=False)}")


if __name__ == "__main__":
    main()
