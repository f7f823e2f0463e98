"""How much does the random projection change ROSE/LESS scores on real data? Exact vs CountSketch, one checkpoint.

Setting (defaults): the embedded SmolLM2-135M-Instruct with LoRA r=8, alpha 32 on q_proj, v_proj (460,800
parameters); pool = the SFT files of the ROSE paper's 5-shot validation data (SE 50 + SHP 90 + HH 10 = 150 rows,
max 512 tokens); validation = the SE 2-shot preference pairs (10 tasks x 2 pairs).

1. Warmup: a few AdamW steps (lr 1e-4) on a handful of pool rows, so that the adapter (peft starts B at 0) and
   the AdamW moments are those of a real (if short) warmup checkpoint.
2. Per-sample gradients, computed once (batched `PerSampleGradients`, eval mode):
   - ROSE validation side: DPO gradients (`DPOObjective(beta=0.1)`, reference = adapter disabled);
   - LESS validation side: SFT gradients of prompt + chosen (`example.as_instruction()`);
   - train side: per-sample SFT gradients of the pool rows turned into the Adam direction with the warmup's
     optimizer state (`AdamTransformSink`). The same pass streams them through `ExactScoreSink` too.
3. From the same vectors:
   - exact scores in float64: per task t, <mean over t's pairs of v / |v|, a_z / |a_z|>;
   - projected scores: CountSketch (`NormalizingSink(CountSketchProjector(dim, seed))`) of both sides, then
     `rose_pl.selection.influence.influence_scores` (one checkpoint, weight 1), at each `--projections` entry.
4. Compared: Pearson of projected vs exact per-task scores, Spearman of the final scores (max over tasks),
   overlap of the top 5% / 10% selections, argmax-task agreement, RMS score error vs the spread (std over the
   pool) of the exact per-task scores, RMS cosine error of single (pool row, validation row) pairs vs the JL
   expectation 1/sqrt(dim); and ExactScoreSink's float32 scores vs the float64 ones (max abs difference).

Run `python benchmarks/projection_noise.py --help`; benchmarks/README.md has the recorded numbers.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from rose_pl.config import LoRAArgs
from rose_pl.data.collate import PreferenceCollator, SFTCollator
from rose_pl.data.encoding import Encoder
from rose_pl.data.formats import read_instructions, read_preferences
from rose_pl.features.exact import ExactScoreSink
from rose_pl.features.objectives import DPOObjective, SFTObjective
from rose_pl.training.losses import sft_loss
from rose_pl.features.per_sample_grads import BlockSink, PerSampleGradients
from rose_pl.features.projection import CountSketchProjector, NormalizingSink
from rose_pl.features.transforms import AdamTransformSink
from rose_pl.files import atomic_write_json
from rose_pl.hub import load_causal_lm, load_tokenizer
from rose_pl.selection.influence import influence_scores, task_groups
from rose_pl.training.model import add_lora

DATA = Path("/work/shared/data/rose_validation")
POOL_FILES = ["se/se_5_shot_sft.json", "shp/shp_5_shot_sft.json", "hh/hh_5_shot_sft.json"]
VALIDATION_FILE = "se/se_2_shot_preference.json"


class Tee:
    """GradientSink that hands every block to several sinks; finish() returns their results in order."""

    def __init__(self, *sinks):
        self.sinks = sinks

    def begin(self, num_samples, device):
        for s in self.sinks:
            s.begin(num_samples, device)

    def add(self, name, grad):
        for s in self.sinks:
            s.add(name, grad)

    def finish(self):
        return tuple(s.finish() for s in self.sinks)


def log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


# ---- data ----------------------------------------------------------------------------------------------
def load_pool(tokenizer, max_len: int, limit: int | None, data: Path):
    enc = Encoder(tokenizer, max_len, preference_format=None)
    full = Encoder(tokenizer, 1 << 20, preference_format=None)  # only to count what truncation cut
    rows = []
    for name in POOL_FILES:
        for ex in read_instructions(data / name, duplicate_ids="rename"):
            rows.append({"id": ex.id, "dataset": ex.dataset, "messages": ex.messages,
                         **enc.encode_messages(ex.messages),
                         "full_length": len(full.encode_messages(ex.messages)["input_ids"])})
    if limit:  # smoke tests: keep every source represented
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, limit).round().astype(int)]
    for i, r in enumerate(rows):
        r["index"] = i
    return rows


def load_validation(tokenizer, max_len: int, max_prompt: int, shots: int, limit_tasks: int | None, data: Path):
    pairs = read_preferences(data / VALIDATION_FILE, shots_per_task=shots)
    if limit_tasks:
        keep = sorted({p.task for p in pairs})[:limit_tasks]
        pairs = [p for p in pairs if p.task in keep]
    rose = Encoder(tokenizer, max_len, preference_format="rose", max_prompt_length=max_prompt)
    sft = Encoder(tokenizer, max_len, preference_format=None)
    dpo_rows, less_rows = [], []
    for i, ex in enumerate(pairs):
        dpo_rows.append({**rose.encode_preference(ex), "index": i})
        less_rows.append({**sft.encode_messages(ex.as_instruction().messages), "index": i})
    return pairs, dpo_rows, less_rows


def batches(rows: list[dict], batch_size: int, key: str):
    """Batches of rows sorted by length (little padding); yields (positions in `rows`, rows)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][key]))
    for start in range(0, len(order), batch_size):
        pos = order[start:start + batch_size]
        yield pos, [rows[i] for i in pos]


# ---- gradients -----------------------------------------------------------------------------------------
def flat(blocks: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([blocks[n].reshape(blocks[n].shape[0], -1) for n in names], 1)


def warmup(model, rows, args, t0) -> tuple[torch.optim.AdamW, list[dict]]:
    """`--warmup-steps` AdamW steps of `--warmup-batch` pool rows each (distinct rows, seeded choice)."""
    gen = torch.Generator().manual_seed(args.seed)
    chosen = torch.randperm(len(rows), generator=gen)[: args.warmup_steps * args.warmup_batch].tolist()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    collate = SFTCollator(pad_token_id=args.pad_id)
    model.train()
    steps = []
    for step in range(args.warmup_steps):
        picked = chosen[step * args.warmup_batch:(step + 1) * args.warmup_batch]
        batch = collate([rows[i] for i in picked])
        batch.pop("index")
        loss = sft_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append({"step": step + 1, "loss": loss.item(), "rows": [rows[i]["id"] for i in picked],
                      "tokens": int(batch["attention_mask"].sum())})
        log(f"warmup step {step + 1}/{args.warmup_steps}: loss {loss.item():.4f} "
            f"({steps[-1]['tokens']} tokens)", t0)
    model.eval()
    return opt, steps


def per_sample(psg, objective, rows, collate, batch_size, key, sink_factory, names, what, t0):
    """Run PerSampleGradients over `rows` in length-sorted batches; returns the sink results in row order."""
    out = [None] * len(rows)
    done, tokens = 0, 0
    for pos, chunk in batches(rows, batch_size, key):
        batch = collate(chunk)
        batch.pop("index")
        tb = time.perf_counter()
        result = psg.compute(objective, batch, sink_factory())
        tokens += int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))
        for j, p in enumerate(pos):
            out[p] = tuple(r[j] for r in result) if isinstance(result, tuple) else result[j]
        done += len(pos)
        log(f"{what}: {done}/{len(rows)} ({batch[key].shape[1]} tokens max, {time.perf_counter() - tb:.1f}s, "
            f"losses {', '.join(f'{x:.3f}' for x in psg.last_losses.tolist())})", t0)
    return out, tokens


class RowBlocks:
    """BlockSink whose finish() gives one row per sample: (S, numel) flattened in name order."""

    def __init__(self, names):
        self.inner, self.names = BlockSink(names), names

    def begin(self, n, device):
        self.inner.begin(n, device)

    def add(self, name, grad):
        self.inner.add(name, grad)

    def finish(self):
        return flat(self.inner.finish(), self.names)


# ---- scoring -------------------------------------------------------------------------------------------
def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def task_means64(vectors: torch.Tensor, inverse: np.ndarray, num_tasks: int) -> torch.Tensor:
    """(T, D) float64 mean of each task's L2-normalized vectors."""
    v = unit_rows(vectors.double())
    member = torch.zeros(num_tasks, v.shape[0], dtype=torch.float64)
    member[torch.from_numpy(inverse), torch.arange(v.shape[0])] = 1.0
    return (member / member.sum(1, keepdim=True)) @ v


def project(projector, vectors: torch.Tensor, shapes: dict) -> torch.Tensor:
    """NormalizingSink(projector) over the per-parameter blocks of `vectors` (N, D): (N, dim) unit rows."""
    sink = NormalizingSink(projector)
    sink.begin(vectors.shape[0], "cpu")
    start = 0
    for name, shape in shapes.items():
        n = shape.numel()
        sink.add(name, vectors[:, start:start + n].reshape(vectors.shape[0], *shape))
        start += n
    return sink.finish()


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x), dtype=np.float64)
    r[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tie = x == value
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(ranks(a), ranks(b))


def top_overlap(a: np.ndarray, b: np.ndarray, fraction: float) -> dict:
    k = max(1, math.ceil(fraction * len(a)))
    ta, tb = set(np.argsort(-a, kind="stable")[:k].tolist()), set(np.argsort(-b, kind="stable")[:k].tolist())
    return {"k": k, "common": len(ta & tb), "overlap": len(ta & tb) / k}


def compare(exact: np.ndarray, approx: np.ndarray) -> dict:
    """Per-task and final-score agreement of `approx` (N, T) with `exact` (N, T)."""
    per_task_r = [pearson(exact[:, t], approx[:, t]) for t in range(exact.shape[1])]
    err = approx - exact
    offset = err.mean(0)  # per task: the part of the error shared by every pool row (it moves the max over tasks)
    within = err - offset
    fe, fa = exact.max(1), approx.max(1)
    return {
        "pearson_per_task_mean": float(np.mean(per_task_r)), "pearson_per_task_min": float(np.min(per_task_r)),
        "pearson_per_task_max": float(np.max(per_task_r)), "pearson_per_task": per_task_r,
        "pearson_all_entries": pearson(exact.ravel(), approx.ravel()),
        "spearman_final": spearman(fe, fa), "pearson_final": pearson(fe, fa),
        "top5": top_overlap(fe, fa, 0.05), "top10": top_overlap(fe, fa, 0.10),
        "argmax_task_agreement": float((exact.argmax(1) == approx.argmax(1)).mean()),
        "rms_score_error": float(np.sqrt((err ** 2).mean())),
        "max_abs_score_error": float(np.abs(err).max()),
        "error_task_offset_rms": float(np.sqrt((offset ** 2).mean())),
        "error_within_task_rms": float(np.sqrt((within ** 2).mean())),
    }


SUMMARY_KEYS = ["pearson_per_task_mean", "pearson_per_task_min", "spearman_final", "top5", "top10",
                "argmax_task_agreement", "rms_score_error", "error_task_offset_rms", "error_within_task_rms"]


def summarize(comparisons: list[dict]) -> dict:
    """Mean, min and max over projection seeds of the main agreement numbers."""
    out = {"seeds": len(comparisons)}
    for key in SUMMARY_KEYS:
        values = [c[key]["common"] if key in ("top5", "top10") else c[key] for c in comparisons]
        out[key] = {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}
        if key in ("top5", "top10"):
            out[key]["k"] = comparisons[0][key]["k"]
    return out


def exact_stats(per_task: np.ndarray) -> dict:
    std = per_task.std(0)
    return {"std_over_pool_per_task_mean": float(std.mean()), "std_over_pool_per_task_min": float(std.min()),
            "std_over_pool_per_task_max": float(std.max()), "std_over_pool_per_task": std.tolist(),
            "mean_abs_score": float(np.abs(per_task).mean()), "max_abs_score": float(np.abs(per_task).max()),
            "final_std": float(per_task.max(1).std()),
            "std_of_per_task_spread_across_tasks": float(per_task.std(1).mean())}


# ---- main ----------------------------------------------------------------------------------------------
def run(args) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    args.pad_id = tokenizer.pad_token_id
    pool = load_pool(tokenizer, args.max_seq_length, args.limit_pool, args.data)
    pairs, dpo_rows, less_rows = load_validation(tokenizer, args.max_seq_length, args.max_prompt_length,
                                                 args.shots_per_task, args.limit_tasks, args.data)
    lengths = np.array([len(r["input_ids"]) for r in pool])
    truncated = int(sum(r["full_length"] > args.max_seq_length for r in pool))
    log(f"pool: {len(pool)} rows, tokens min/median/mean/max {lengths.min()}/{int(np.median(lengths))}/"
        f"{lengths.mean():.0f}/{lengths.max()}, {truncated} cut to {args.max_seq_length}; validation: {len(pairs)} "
        f"pairs in {len({p.task for p in pairs})} tasks", t0)
    val_prompts = {p.prompt for p in pairs}
    in_val = [i for i, r in enumerate(pool) if r["messages"][0]["content"] in val_prompts]

    base = load_causal_lm(args.model, dtype="float32", attn_implementation="eager")
    lora = LoRAArgs(r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    target_modules=args.target_modules)
    model = add_lora(base, lora)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    names = list(shapes)
    num_params = sum(s.numel() for s in shapes.values())
    log(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, LoRA r={lora.r} "
        f"alpha={lora.alpha} on {lora.target_modules}: {num_params:,} trainable in {len(shapes)} tensors", t0)

    cache = Path(args.gradients_cache) if args.gradients_cache else None
    if cache is not None and cache.is_file():
        saved = torch.load(cache)
        if saved["settings"] != _gradient_settings(args):
            raise SystemExit(f"{cache} was computed with other settings: {saved['settings']}")
        log(f"per-sample gradients read from {cache} (no model pass)", t0)
        report = _analyse(args, t0, pool, pairs, dpo_rows, less_rows, lengths, truncated, in_val, lora, shapes,
                          **saved["data"])
        report["gradients_from_cache"] = str(cache)
        return report
    data = _gradients(args, t0, model, pool, dpo_rows, less_rows, pairs, shapes)
    if cache is not None:
        torch.save({"settings": _gradient_settings(args), "data": data}, cache)
        log(f"per-sample gradients saved to {cache}", t0)
    return _analyse(args, t0, pool, pairs, dpo_rows, less_rows, lengths, truncated, in_val, lora, shapes, **data)


def _gradient_settings(args) -> dict:
    keys = ["model", "data", "max_seq_length", "max_prompt_length", "shots_per_task", "lora_rank", "lora_alpha",
            "lora_dropout", "target_modules", "warmup_steps", "warmup_batch", "lr", "beta", "limit_pool",
            "limit_tasks", "seed"]
    return {k: str(getattr(args, k)) for k in keys}


def _gradients(args, t0, model, pool, dpo_rows, less_rows, pairs, shapes) -> dict:
    """Warmup, then every per-sample gradient (and ExactScoreSink's columns) the analysis needs."""
    names = list(shapes)
    t_warm = time.perf_counter()
    opt, warm_steps = warmup(model, pool, args, t0)
    t_warm = time.perf_counter() - t_warm
    by_param = dict(model.named_parameters())
    state = {n: (opt.state[by_param[n]]["exp_avg"].detach().clone(), opt.state[by_param[n]]["exp_avg_sq"].detach().clone())
             for n in names}
    betas, eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    b_norm = math.sqrt(sum(float(p.detach().pow(2).sum()) for n, p in by_param.items() if n in shapes and "lora_B" in n))
    del opt

    psg = PerSampleGradients(model, compute_dtype=torch.float32)
    t_grad = time.perf_counter()
    dpo, dpo_tokens = per_sample(psg, DPOObjective(beta=args.beta), dpo_rows, PreferenceCollator(args.pad_id),
                                 args.val_batch_size, "chosen_input_ids", lambda: RowBlocks(names), names,
                                 "ROSE val (DPO)", t0)
    less, less_tokens = per_sample(psg, SFTObjective(), less_rows, SFTCollator(args.pad_id), args.val_batch_size,
                                   "input_ids", lambda: RowBlocks(names), names, "LESS val (SFT)", t0)
    dpo, less = torch.stack(dpo), torch.stack(less)
    t_val = time.perf_counter() - t_grad

    tasks, inverse = task_groups([p.task for p in pairs])
    means = {"rose": task_means64(dpo, inverse, len(tasks)), "less": task_means64(less, inverse, len(tasks))}
    # ExactScoreSink gets both targets' means at once (groups [T, T]), in float32, as ExactScoreWriter holds them.
    offsets, start = {}, 0
    for n in names:
        offsets[n] = (start, start + shapes[n].numel())
        start += shapes[n].numel()
    sink_means = {n: torch.cat([means["rose"][:, a:b], means["less"][:, a:b]]).float() for n, (a, b) in offsets.items()}

    def train_sink():
        return AdamTransformSink(Tee(RowBlocks(names), ExactScoreSink(sink_means, [len(tasks), len(tasks)])),
                                 state, beta1=betas[0], beta2=betas[1], eps=eps)

    t_pool = time.perf_counter()
    out, pool_tokens = per_sample(psg, SFTObjective(), pool, SFTCollator(args.pad_id), args.batch_size, "input_ids",
                                  train_sink, names, "pool (SFT -> Adam direction)", t0)
    t_pool = time.perf_counter() - t_pool
    adam = torch.stack([o[0] for o in out])
    sink_cols = torch.stack([o[1] for o in out]).double()
    log(f"per-sample gradients done: validation {t_val:.0f}s, pool {t_pool:.0f}s", t0)
    return {"dpo": dpo, "less": less, "adam": adam, "sink_cols": sink_cols, "warm_steps": warm_steps,
            "betas": list(betas), "eps": eps, "b_norm": b_norm,
            "timing": {"warmup": t_warm, "validation_gradients": t_val, "pool_gradients": t_pool,
                       "tokens": {"dpo": dpo_tokens, "less": less_tokens, "pool": pool_tokens}}}


def _analyse(args, t0, pool, pairs, dpo_rows, less_rows, lengths, truncated, in_val, lora, shapes, dpo, less, adam,
             sink_cols, warm_steps, betas, eps, b_norm, timing) -> dict:
    num_params = sum(s.numel() for s in shapes.values())
    tasks, inverse = task_groups([p.task for p in pairs])
    means = {"rose": task_means64(dpo, inverse, len(tasks)), "less": task_means64(less, inverse, len(tasks))}

    # ---- exact, float64 ----
    t_score = time.perf_counter()
    a_unit = unit_rows(adam.double())
    exact = {side: (a_unit @ m.T).numpy() for side, m in means.items()}
    val_unit = {"rose": unit_rows(dpo.double()), "less": unit_rows(less.double())}
    cos_exact = {side: (a_unit @ v.T).numpy() for side, v in val_unit.items()}
    T = len(tasks)
    sink_scores = {"rose": (sink_cols[:, :T] / sink_cols[:, T:T + 1].sqrt()).numpy(),
                   "less": (sink_cols[:, T + 1:2 * T + 1] / sink_cols[:, 2 * T + 1:2 * T + 2].sqrt()).numpy()}
    sink_check = {side: {"max_abs_diff": float(np.abs(sink_scores[side] - exact[side]).max()),
                         "max_abs_score": float(np.abs(exact[side]).max())} for side in exact}
    # How much the vectors of one side share a direction (mean cosine over distinct pairs): a shared component
    # makes the sketch error of <P mean_t, P a_z> common to every row z (a per-task offset, see compare()).
    def mean_pair_cosine(unit):
        g = unit @ unit.T
        return float((g.sum() - g.diagonal().sum()) / (g.shape[0] * (g.shape[0] - 1)))

    shared = {"pool_adam_directions": mean_pair_cosine(a_unit), "rose_val_dpo": mean_pair_cosine(val_unit["rose"]),
              "less_val_sft": mean_pair_cosine(val_unit["less"]),
              "pool_adam_mean_direction_norm": float(a_unit.mean(0).norm())}
    norm2_rel = float(((sink_cols[:, T] - adam.double().pow(2).sum(1)) / adam.double().pow(2).sum(1)).abs().max())

    # ---- projected ----
    projected, cos_err = {}, {}
    spread = {}
    for dim in sorted({d for d, _ in args.projections}):
        if args.spread_seeds:
            spread[dim] = {"rose": [], "less": []}
            proj_list = [(dim, 1000 + k) for k in range(args.spread_seeds)]
            for _, seed in proj_list:
                proj = CountSketchProjector(dim=dim, seed=seed)
                proj.setup(shapes, "cpu")
                p_train = project(proj, adam, shapes)
                for side, val in (("rose", dpo), ("less", less)):
                    res = influence_scores([p_train], [project(proj, val, shapes)], [p.task for p in pairs], [1.0],
                                           device="cpu")
                    spread[dim][side].append(compare(exact[side], res.per_task.astype(np.float64)))
            log(f"countsketch-{dim}: {args.spread_seeds} more seeds (1000..) scored", t0)
    for dim, seed in args.projections:
        key = f"countsketch-{dim}-seed{seed}"
        tp = time.perf_counter()
        proj = CountSketchProjector(dim=dim, seed=seed)
        proj.setup(shapes, "cpu")
        p_train = project(proj, adam, shapes)
        projected[key], cos_err[key] = {}, {}
        for side, val in (("rose", dpo), ("less", less)):
            p_val = project(proj, val, shapes)
            res = influence_scores([p_train], [p_val], [p.task for p in pairs], [1.0], device="cpu")
            assert res.tasks == tasks
            projected[key][side] = res.per_task.astype(np.float64)
            err = (p_train.double() @ p_val.double().T).numpy() - cos_exact[side]
            cos_err[key][side] = {"rms": float(np.sqrt((err ** 2).mean())), "max_abs": float(np.abs(err).max())}
        log(f"{key}: projected and scored in {time.perf_counter() - tp:.1f}s", t0)
    t_score = time.perf_counter() - t_score

    # ---- report ----
    results = {}
    for side in ("rose", "less"):
        side_out = {"exact": exact_stats(exact[side]),
                    "exact_sink_check": sink_check[side],
                    "cosine_exact_single_pairs": {"mean_abs": float(np.abs(cos_exact[side]).mean()),
                                                  "std": float(cos_exact[side].std()),
                                                  "max_abs": float(np.abs(cos_exact[side]).max())},
                    "projected": {}}
        for key in projected:
            dim = int(key.split("-")[1])
            c = compare(exact[side], projected[key][side])
            c["cosine_error_single_pairs"] = cos_err[key][side]
            c["jl_expected_cosine_error"] = 1 / math.sqrt(dim)
            # a task score is the mean of `shots` cosines whose sketch errors are nearly independent
            c["jl_expected_task_score_error"] = 1 / math.sqrt(dim * args.shots_per_task)
            c["noise_to_spread"] = c["rms_score_error"] / side_out["exact"]["std_over_pool_per_task_mean"]
            c["jl_expected_noise_to_spread"] = (c["jl_expected_task_score_error"]
                                                / side_out["exact"]["std_over_pool_per_task_mean"])
            side_out["projected"][key] = c
        for dim in spread:
            side_out[f"over_{args.spread_seeds}_seeds_{dim}"] = summarize(spread[dim][side])
        keys = [k for k in projected if k.startswith("countsketch-8192-")]
        if len(keys) >= 2:  # seed spread at the same dim
            a, b = projected[keys[0]][side], projected[keys[1]][side]
            side_out["seed_spread_8192"] = {"between": keys[:2], **{k: v for k, v in compare(a, b).items()
                                                                    if k != "pearson_per_task"}}
        results[side] = side_out

    order = {side: np.argsort(-exact[side].max(1), kind="stable") for side in exact}
    rank_of = {side: {int(i): r + 1 for r, i in enumerate(order[side])} for side in exact}
    report = {
        "benchmark": "projection_noise",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{_cpu_name()}, torch threads {torch.get_num_threads()}",
        "versions": _versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"name": args.model, "lora": lora.to_dict(), "trainable_params": num_params,
                  "lora_tensors": len(shapes), "attn_implementation": "eager", "dtype": "float32"},
        "pool": {"files": POOL_FILES, "rows": len(pool), "by_dataset": _count([r["dataset"] for r in pool]),
                 "tokens_min": int(lengths.min()), "tokens_median": float(np.median(lengths)),
                 "tokens_mean": float(lengths.mean()), "tokens_max": int(lengths.max()),
                 "tokens_total": int(lengths.sum()), "truncated_to_max_seq_length": truncated,
                 "rows_sharing_a_validation_prompt": [pool[i]["id"] for i in in_val],
                 "exact_final_rank_of_those_rows": {side: [rank_of[side][i] for i in in_val] for side in exact}},
        "validation": {"file": VALIDATION_FILE, "pairs": len(pairs), "tasks": tasks,
                       "chosen_tokens_mean": float(np.mean([len(r["chosen_input_ids"]) for r in dpo_rows])),
                       "less_tokens_mean": float(np.mean([len(r["input_ids"]) for r in less_rows]))},
        "warmup": {"steps": warm_steps, "optimizer": "torch.optim.AdamW", "lr": args.lr, "betas": list(betas),
                   "eps": eps, "weight_decay": 0.0, "lora_B_norm_after": b_norm,
                   "note": "train mode (LoRA dropout on) for the warmup; eval mode for every gradient below"},
        "timing_s": {**timing, "scoring_and_projection": t_score,
                     "model_passes": timing["warmup"] + timing["validation_gradients"] + timing["pool_gradients"],
                     "total_of_this_process": time.perf_counter() - t0},
        "mean_pairwise_cosine": shared,
        "exact_sink_norm2_max_rel_diff": norm2_rel,
        "results": results,
        "rows": {"ids": [r["id"] for r in pool],
                 "exact_per_task": {s: exact[s].tolist() for s in exact},
                 "projected_per_task": {k: {s: projected[k][s].tolist() for s in projected[k]} for k in projected},
                 "projected_final_rank_of_rows_sharing_a_validation_prompt": {
                     k: {s: [int((projected[k][s].max(1) > projected[k][s].max(1)[i]).sum()) + 1 for i in in_val]
                         for s in projected[k]} for k in projected}},
    }
    return report


def _count(xs):
    out = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def print_summary(report: dict) -> None:
    print()
    for side in ("rose", "less"):
        r = report["results"][side]
        e = r["exact"]
        print(f"{side.upper()}: exact per-task score std over pool {e['std_over_pool_per_task_mean']:.4g} "
              f"(mean |score| {e['mean_abs_score']:.4g}); ExactScoreSink vs float64 max |diff| "
              f"{r['exact_sink_check']['max_abs_diff']:.2e}")
        print(f"  {'projection':<24} {'r task':>7} {'r min':>6} {'rho fin':>7} {'top5%':>6} {'top10%':>7} "
              f"{'argmax':>6} {'rms err':>8} {'err/std':>7} {'cos rms':>8} {'1/sqrt d':>8}")
        for key, c in r["projected"].items():
            print(f"  {key:<24} {c['pearson_per_task_mean']:>7.3f} {c['pearson_per_task_min']:>6.3f} "
                  f"{c['spearman_final']:>7.3f} {c['top5']['common']:>3}/{c['top5']['k']:<2} "
                  f"{c['top10']['common']:>4}/{c['top10']['k']:<2} {c['argmax_task_agreement']:>6.2f} "
                  f"{c['rms_score_error']:>8.2e} {c['noise_to_spread']:>7.2f} "
                  f"{c['cosine_error_single_pairs']['rms']:>8.2e} {c['jl_expected_cosine_error']:>8.2e}")
        for key, v in r.items():
            if key.startswith("over_"):
                print(f"  {key}: r task {v['pearson_per_task_mean']['mean']:.3f} "
                      f"[{v['pearson_per_task_mean']['min']:.3f}, {v['pearson_per_task_mean']['max']:.3f}], rho final "
                      f"{v['spearman_final']['mean']:.3f} [{v['spearman_final']['min']:.3f}, "
                      f"{v['spearman_final']['max']:.3f}], top5% {v['top5']['mean']:.1f}/{v['top5']['k']} "
                      f"[{v['top5']['min']:.0f}, {v['top5']['max']:.0f}], top10% {v['top10']['mean']:.1f}/"
                      f"{v['top10']['k']} [{v['top10']['min']:.0f}, {v['top10']['max']:.0f}], argmax "
                      f"{v['argmax_task_agreement']['mean']:.2f}, err offset/within "
                      f"{v['error_task_offset_rms']['mean']:.2e}/{v['error_within_task_rms']['mean']:.2e}")
        if "seed_spread_8192" in r:
            s = r["seed_spread_8192"]
            print(f"  seed 0 vs seed 1 at 8192: r task {s['pearson_per_task_mean']:.3f}, rho final "
                  f"{s['spearman_final']:.3f}, top5% {s['top5']['common']}/{s['top5']['k']}, "
                  f"top10% {s['top10']['common']}/{s['top10']['k']}")
    print(f"timing: {report['timing_s']}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the ROSE validation data (se/, shp/, hh/)")
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256, help="ROSE pair format's prompt cut")
    parser.add_argument("--shots-per-task", type=int, default=2, help="of the SE validation file (2-shot: 2)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.1, help="during the warmup only (eval after)")
    parser.add_argument("--target-modules", default="q_proj,v_proj")
    parser.add_argument("--warmup-steps", type=int, default=8)
    parser.add_argument("--warmup-batch", type=int, default=2, help="pool rows per warmup step (all distinct)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    parser.add_argument("--batch-size", type=int, default=4, help="pool rows per per-sample-gradient batch")
    parser.add_argument("--val-batch-size", type=int, default=4, help="validation pairs (rows) per batch")
    parser.add_argument("--projections", default="8192:0,8192:1,32768:0", help="comma list of dim:seed")
    parser.add_argument("--spread-seeds", type=int, default=10,
                        help="also score each dim with this many more seeds (1000, 1001, ...) and report mean/min/max")
    parser.add_argument("--gradients-cache", default=None,
                        help="torch file: per-sample gradients are read from it if it exists, else saved to it "
                             "(re-analysis without the model passes; about 0.4 GB at the defaults)")
    parser.add_argument("--limit-pool", type=int, default=None, help="smoke test: this many pool rows")
    parser.add_argument("--limit-tasks", type=int, default=None, help="smoke test: this many validation tasks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file (e.g. benchmarks/results/projection_noise_cpu.json)")
    args = parser.parse_args(argv)
    args.target_modules = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    try:
        args.projections = [tuple(int(x) for x in p.split(":")) for p in args.projections.split(",") if p.strip()]
    except ValueError:
        parser.error(f"--projections {args.projections!r}: expected dim:seed,dim:seed")
    if any(len(p) != 2 for p in args.projections):
        parser.error(f"--projections: expected dim:seed pairs, got {args.projections}")
    return args


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("once", category=FutureWarning)
    torch.set_num_threads(args.threads)
    report = run(args)
    print_summary(report)
    if args.out:
        print(f"wrote {atomic_write_json(args.out, report, default=str, sort_keys=False)}")


if __name__ == "__main__":
    main()
