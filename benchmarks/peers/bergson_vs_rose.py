"""rose_pl vs EleutherAI's Bergson (PyPI `bergson`, MIT) on the same model, adapter, optimizer state and token ids.

One invocation:

    python benchmarks/peers/bergson_vs_rose.py --preset tiny            # random tiny Llama, a couple of minutes
    python benchmarks/peers/bergson_vs_rose.py --preset smollm2         # embedded SmolLM2-135M on data/pool.jsonl
    python benchmarks/peers/bergson_vs_rose.py --preset smollm2 --device cuda --dtype bfloat16

1. Bergson's virtualenv: reused if `$BERGSON_VENV` (default /work/bergson-venv) imports bergson, else created:
   `python -m venv $BERGSON_VENV`, `pip install $BERGSON_TORCH` (default: this venv's torch build, e.g.
   torch==2.13.0+cpu, so both sides run the same torch), `pip install -c <torch pin> bergson==$BERGSON_VERSION`;
   when the PyPI torchvision that comes with it cannot load against that torch, torchvision and torchaudio are
   uninstalled (Bergson never imports them; transformers only does when they are installed).
2. Fixture (`<work>/fixture`, reused while its settings are unchanged): the base model, one LoRA adapter and one
   AdamW state from a short real warmup, saved once in rose_pl's warmup layout (manifest.json,
   epoch-1/{adapter, optimizer.pt, info.json}) and, for Bergson, the same AdamW state as a torch optimizer
   `state_dict` (`bergson_optimizer/optimizer.pt`, integer keys in peft-state-dict order plus each entry's
   `param_name`, which Bergson prefers). The rows are tokenized once; both tools read the same
   `input_ids`/`labels` (pool.jsonl, query.jsonl: Bergson skips tokenization when `input_ids` is a column).
3. Batches: Bergson's own token-budget allocation (`bergson.data.allocate_batches`, max_len x rows <=
   --token-batch-size) of the pool; rose_pl runs exactly those batches.
4. Cases, each in a fresh process, `--rounds` passes each (best and median reported):
   rose floor      batched forward + backward of the per-sample SFT losses (no per-sample work)
   rose exact      PerSampleGradients + AdamDirection (rose_pl's AdamTransformSink) + ExactScoreSink vs the
                   query mean (LESS, one task)
   rose projected  PerSampleGradients + AdamDirection + NormalizingSink(CountSketch(--dim))
   bergson floor   Bergson's own fwd_bwd (collector.fwd_bwd_factory) on its batches, no hooks
   bergson score   `bergson score` (no projection) against a query index built with `--aggregation mean
                   --unit_normalize`, pool normalized with `--optimizer_state` and `--unit_normalize`
   bergson build   `bergson build` with the same normalizer at a matching projection (per-module p x p with
                   p = round(sqrt(dim / modules)), or --bergson-projection-target global for exactly --dim)
   reference       float64, one row at a time, plain autograd: each tool's score formula computed independently
5. Agreement (Spearman, Pearson, top-5% overlap, max |diff|) of the pool's scores: each side vs its own float64
   formula, the two tools as each defines its score, and rose_pl's gradients under Bergson's normalizer vs
   Bergson (the aligned comparison: same formula, so only the gradients and token ids can differ).

The formulas (pool row z, query rows q of one task, LoRA parameters only, token-mean SFT loss on both sides):
   g_z                per-sample gradient of the mean token loss (Bergson: --loss_reduction mean; its default
                      `sum` would weight long rows up)
   q_bar              mean_q g_q / |g_q|   (raw validation gradients, unit-normalized, then averaged)
   rose_pl (LESS)     a_z = m' / sqrt(v' + eps), m' = b1 m + (1 - b1) g_z, v' = b2 v + (1 - b2) g_z^2
                      score = <a_z, q_bar> / |a_z|
   Bergson            b_z = g_z / (sqrt(v) + 1e-8)  (raw exp_avg_sq; exp_avg, betas, step unused)
                      score = <b_z, q_bar> / |b_z|

Results: JSON at --output (default <work>/result.json). Keep runs pinned on a shared machine, e.g.
`taskset -c 1 env OMP_NUM_THREADS=1 python ...`; every child inherits the environment.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DRIVER = HERE / "bergson_driver.py"
MIB = 1 << 20
DEFAULT_VENV = "/work/bergson-venv"
DEFAULT_BERGSON_VERSION = "2.5.1"
BERGSON_PRECISION = {"float32": "fp32", "bfloat16": "bf16"}
BERGSON_ADAM_EPS = 1e-8  # bergson.gradients.AdamNormalizer.weight_denominator's default, not configurable

PRESETS = {
    # A random Llama (byte tokenizer, 260 tokens) on random token rows: seconds per pass on one CPU core.
    "tiny": dict(model="tiny", model_overrides=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                                    num_attention_heads=4, num_key_value_heads=2,
                                                    max_position_embeddings=4096),
                 rows=96, query_rows=8, min_len=48, max_len=192, lora_r=8, lora_alpha=32,
                 target_modules=["q_proj", "v_proj"], token_batch_size=2048, dim=4096, rounds=2,
                 warmup_steps=8, warmup_rows=2, lr=1e-4),
    # The embedded SmolLM2-135M-Instruct on real rows of data/pool.jsonl (Tulu template, as rose_pl's default).
    "smollm2": dict(model="embedded:smollm2-135m-instruct", data=str(REPO / "data" / "pool.jsonl"),
                    rows=128, query_rows=8, max_seq_length=512, chat_template="tulu", lora_r=8, lora_alpha=32,
                    target_modules=["q_proj", "v_proj"], token_batch_size=2048, dim=8192, rounds=2,
                    warmup_steps=8, warmup_rows=2, lr=1e-4),
}
ADAM = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


# ---- small helpers --------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[bergson_vs_rose {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Sampled peak process RSS of a block, and the CUDA peak allocation on CUDA (same as the Bergson driver)."""

    def __init__(self, device, interval_s: float = 0.002):
        self.device, self.interval_s = device, interval_s

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
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
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)


def run(cmd: list, env: dict | None = None, what: str = "") -> float:
    """Run a command, streaming its output; returns its wall seconds; raises with its tail on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise RuntimeError(f"{what or cmd[0]} failed (exit {proc.returncode}) after {seconds:.1f}s:\n{tail}")
    return seconds


def spearman(a, b) -> float:
    """Pearson correlation of the ranks (ties get their average rank)."""
    import numpy as np

    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        if (counts > 1).any():
            sums = np.bincount(inverse, weights=r)
            r = (sums / counts)[inverse]
        return r

    return pearson(ranks(a), ranks(b))


def pearson(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def compare(a, b, top_fraction: float = 0.05) -> dict:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    k = max(1, int(round(top_fraction * len(a))))
    top_a, top_b = set(np.argsort(-a)[:k].tolist()), set(np.argsort(-b)[:k].tolist())
    return {"rows": int(len(a)), "spearman": spearman(a, b), "pearson": pearson(a, b),
            f"top{int(top_fraction * 100)}pct_overlap": f"{len(top_a & top_b)}/{k}",
            "max_abs_diff": float(np.abs(a - b).max()), "max_abs_score": float(np.abs(b).max()),
            "std_a": float(a.std()), "std_b": float(b.std())}


def machine(device: str) -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version()}
    if device == "cuda":
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
    return out


# ---- Bergson's virtualenv -------------------------------------------------------------------------------
def bergson_env(args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(Path(args.work_dir) / "hf_datasets_cache"))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # Bergson picks CUDA whenever it sees a GPU
    return env


def ensure_bergson_venv(args) -> dict:
    """Reuse the venv at args.bergson_venv when it imports bergson, else create it; returns install facts."""
    venv = Path(args.bergson_venv)
    python = venv / "bin" / "python"
    probe_out = Path(args.work_dir) / "bergson_probe.json"
    env = bergson_env(args)

    def probe() -> dict | None:
        try:
            run([python, DRIVER, "probe", probe_out], env=env, what="bergson probe")
            return json.loads(probe_out.read_text())
        except RuntimeError as e:
            log(f"probe failed: {str(e).splitlines()[-1]}")
            return None

    if python.exists():
        found = probe()
        if found is not None:
            return {"venv": str(venv), "created": False, "versions": found}
    import torch

    # BERGSON_TORCH: pip arguments for torch, e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
    torch_spec = os.environ.get("BERGSON_TORCH", f"torch=={torch.__version__}")
    version = os.environ.get("BERGSON_VERSION", DEFAULT_BERGSON_VERSION)
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    steps = []
    log(f"creating Bergson's venv at {venv} ({torch_spec}, bergson=={version})")
    steps.append({"cmd": f"{sys.executable} -m venv {venv}", "s": run([sys.executable, "-m", "venv", venv])})
    steps.append({"cmd": f"pip install {torch_spec}",
                  "s": run([*pip, *shlex.split(torch_spec)], what="pip install torch")})
    pin = venv / "torch-pin.txt"
    installed = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                               text=True, check=True).stdout.strip()
    pin.write_text(f"torch=={installed}\n")
    steps.append({"cmd": f"pip install -c {pin} bergson=={version}",
                  "s": run([*pip, "-c", pin, f"bergson=={version}"], what="pip install bergson")})
    found = probe()
    if found is None:
        # The PyPI torchvision is built against PyPI's (CUDA) torch of its version; against another torch build
        # it fails to load and transformers then cannot import its models. Bergson itself never imports it.
        steps.append({"cmd": "pip uninstall -y torchvision torchaudio",
                      "s": run([python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio"])})
        found = probe()
    if found is None:
        raise RuntimeError(f"{venv}: bergson does not import after installing; see the probe's output above")
    return {"venv": str(venv), "created": True, "steps": steps, "versions": found}


# ---- fixture: model, adapter, optimizer state, token ids ------------------------------------------------
def fixture_settings(args, preset: dict) -> dict:
    keys = ("model", "model_overrides", "data", "rows", "query_rows", "min_len", "max_len", "max_seq_length",
            "chat_template", "lora_r", "lora_alpha", "target_modules", "warmup_steps", "warmup_rows", "lr")
    out = {k: preset[k] for k in keys if k in preset}
    out.update(rows=args.rows, query_rows=args.query_rows, lora_r=args.lora_r, seed=args.seed,
               attn=args.attn_implementation, version=3)
    return out


def build_fixture(args, preset: dict) -> dict:
    """Writes <work>/fixture once per settings; returns its description (paths, sizes)."""
    import torch

    from rose_pl.config import LoRAArgs
    from rose_pl.data.collate import SFTCollator
    from rose_pl.hub import load_causal_lm, load_tokenizer, resolve_model_path
    from rose_pl.training.checkpoints import adam_hyperparameters, named_adam_state
    from rose_pl.training.losses import sft_loss
    from rose_pl.training.model import add_lora

    settings = fixture_settings(args, preset)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(args.work_dir) / "fixture"
    meta_file = root / "fixture.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("digest") == digest:
            log(f"reusing fixture {root}")
            return meta
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)

    # model
    if preset["model"] == "tiny":
        from rose_pl.testing import save_tiny_model

        model_dir = save_tiny_model(root / "model", seed=args.seed, **preset["model_overrides"]).resolve()
    else:
        model_dir = Path(resolve_model_path(preset["model"])).resolve()
    tokenizer = load_tokenizer(str(model_dir))

    # rows, tokenized once
    n, q = args.rows, args.query_rows
    if preset["model"] == "tiny":
        vocab = 260
        rows = []
        for _ in range(n + q):
            length = int(torch.randint(preset["min_len"], preset["max_len"] + 1, (1,), generator=gen))
            ids = torch.randint(4, vocab, (length,), generator=gen).tolist()
            labels = [-100] * (length // 4) + ids[length // 4:]
            rows.append({"input_ids": ids, "labels": labels})
    else:
        from rose_pl.data.encoding import Encoder
        from rose_pl.data.formats import read_instructions

        examples = read_instructions(preset["data"])
        if len(examples) < n + q:
            raise SystemExit(f"{preset['data']} has {len(examples)} rows; --rows {n} + --query-rows {q} needed")
        encoder = Encoder(tokenizer, preset["max_seq_length"], chat_template=preset["chat_template"],
                          preference_format=None)
        rows = [dict(encoder.encode_messages(ex.messages), id=ex.id) for ex in examples[: n + q]]
    pool, query = rows[:n], rows[n:]
    for name, part in (("pool.jsonl", pool), ("query.jsonl", query)):
        with open(root / name, "w") as f:
            for r in part:
                f.write(json.dumps({"input_ids": r["input_ids"], "labels": r["labels"]}) + "\n")

    # adapter + AdamW state from a short real warmup (LoRA dropout 0: the adapter behaves the same in train and
    # eval mode, whatever mode each tool leaves the model in)
    lora = LoRAArgs(r=args.lora_r, alpha=preset["lora_alpha"] * args.lora_r // preset["lora_r"], dropout=0.0,
                    target_modules=list(preset["target_modules"]))
    base = load_causal_lm(str(model_dir), "float32", args.attn_implementation)
    model = add_lora(base, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=preset["lr"], betas=ADAM["betas"], eps=ADAM["eps"],
                            weight_decay=ADAM["weight_decay"])
    collate = SFTCollator(pad_token_id=tokenizer.pad_token_id)
    model.train()
    losses = []
    for _ in range(preset["warmup_steps"]):
        pick = torch.randperm(n, generator=gen)[: preset["warmup_rows"]].tolist()
        batch = collate([dict(pool[i], index=i) for i in pick])
        batch.pop("index")
        loss = sft_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()

    ckpt_root = root / "warmup"
    epoch_dir = ckpt_root / "epoch-1"
    epoch_dir.mkdir(parents=True)
    model.save_pretrained(epoch_dir / "adapter")
    adapter_cfg_file = epoch_dir / "adapter" / "adapter_config.json"
    adapter_cfg = json.loads(adapter_cfg_file.read_text())
    if adapter_cfg.get("base_model_name_or_path") != str(model_dir):  # Bergson finds the base model here
        adapter_cfg["base_model_name_or_path"] = str(model_dir)
        adapter_cfg_file.write_text(json.dumps(adapter_cfg, indent=2))
    hyper = adam_hyperparameters(opt)
    torch.save({"format": 1, "state": named_adam_state(model, opt), "hyper": hyper}, epoch_dir / "optimizer.pt")
    (epoch_dir / "info.json").write_text(json.dumps({"epoch": 1, "lr": preset["lr"], "steps": len(losses),
                                                     "global_step": len(losses)}))
    (ckpt_root / "manifest.json").write_text(json.dumps({
        "format": 1, "base_model": str(model_dir), "lora": lora.to_dict(),
        "checkpoints": [{"epoch": 1, "dir": "epoch-1", "lr": preset["lr"], "steps": len(losses),
                         "global_step": len(losses)}],
        "data": {"rows": n, "note": "bergson_vs_rose fixture"}}, indent=1))

    # the same state for Bergson: a torch optimizer state_dict (integer keys in the order of the trainable
    # parameters = peft's state-dict order) with each entry's peft-serialized name ("...lora_A.weight", no
    # adapter name), which bergson.utils.load_from_optimizer prefers over the position
    from peft import get_peft_model_state_dict

    state_dict = opt.state_dict()
    names = [n_ for n_, p in model.named_parameters() if p.requires_grad]
    serialized = list(get_peft_model_state_dict(model).keys())
    adapter_name = next(iter(model.peft_config))
    for i, name in enumerate(names):
        peft_name = name.replace(f".{adapter_name}.", ".")
        if serialized[i] != peft_name:
            raise RuntimeError(f"parameter order differs from peft's state dict at {i}: {name} vs {serialized[i]}")
        state_dict["state"][i]["param_name"] = peft_name
    (root / "bergson_optimizer").mkdir()
    torch.save(state_dict, root / "bergson_optimizer" / "optimizer.pt")

    lengths = [len(r["input_ids"]) for r in pool]
    meta = {
        "digest": digest, "settings": settings, "root": str(root), "model_dir": str(model_dir),
        "checkpoint": str(epoch_dir), "adapter": str(epoch_dir / "adapter"),
        "bergson_optimizer": str(root / "bergson_optimizer"), "pool": str(root / "pool.jsonl"),
        "query": str(root / "query.jsonl"), "rows": n, "query_rows": q, "pool_tokens": sum(lengths),
        "pool_loss_tokens": sum(sum(1 for t in r["labels"][1:] if t != -100) for r in pool),
        "pool_length_min_median_max": [min(lengths), sorted(lengths)[len(lengths) // 2], max(lengths)],
        "pad_token_id": tokenizer.pad_token_id, "lora": lora.to_dict(), "adam": hyper,
        "lora_parameters": sum(p.numel() for p in params), "lora_tensors": len(params),
        "warmup_losses": losses, "seconds": time.perf_counter() - t0,
    }
    meta_file.write_text(json.dumps(meta, indent=1))
    log(f"fixture built in {meta['seconds']:.1f}s: {n} pool rows ({meta['pool_tokens']} tokens), {q} query rows, "
        f"{meta['lora_parameters']:,} LoRA parameters; warmup losses {losses[0]:.3f} -> {losses[-1]:.3f}")
    return meta


# ---- rose_pl side (child process) -----------------------------------------------------------------------
class BergsonNormalizerSink:
    """Benchmark-only sink: Bergson's Adam normalizer g / (sqrt(exp_avg_sq) + 1e-8) on rose_pl's per-sample
    gradients, for the aligned comparison (same formula on both sides)."""

    def __init__(self, inner, exp_avg_sq: dict, eps: float = BERGSON_ADAM_EPS):
        self.inner, self.eps = inner, eps
        self.denominators = {n: v.sqrt() + eps for n, v in exp_avg_sq.items()}

    def begin(self, num_samples, device):
        self.inner.begin(num_samples, device)

    def add(self, name, grad):
        self.inner.add(name, grad / self.denominators[name].to(grad.device))

    def finish(self):
        return self.inner.finish()


def rose_child(spec: dict) -> dict:
    """One rose_pl case: load the checkpoint the way rose_pl's gradient stage does, run the pool's batches."""
    import numpy as np
    import torch

    from peft import PeftModel

    from rose_pl.data.collate import SFTCollator
    from rose_pl.features.exact import ExactScoreSink
    from rose_pl.features.objectives import SFTObjective
    from rose_pl.features.per_sample_grads import BlockSink, PerSampleGradients
    from rose_pl.features.projection import NormalizingSink, build_projector
    from rose_pl.features.transforms import AdamTransformSink
    from rose_pl.hub import load_causal_lm

    device = torch.device(spec["device"])
    t_load = time.perf_counter()
    # As rose_pl's gradient stage loads a warmup checkpoint: the base model, the epoch's adapter (trainable),
    # eval mode; the epoch's name-keyed AdamW state with its own betas and eps.
    base = load_causal_lm(spec["model_dir"], spec["dtype"], spec["attn"])
    model = PeftModel.from_pretrained(base, str(Path(spec["checkpoint"]) / "adapter"), is_trainable=True)
    model.eval().to(device)
    saved = torch.load(Path(spec["checkpoint"]) / "optimizer.pt", map_location="cpu", weights_only=True)
    beta1, beta2 = saved["hyper"]["betas"]
    adam_eps = saved["hyper"]["eps"]
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    names = list(shapes)
    adam_state = {n: (saved["state"][n]["exp_avg"].to(device, torch.float32),
                      saved["state"][n]["exp_avg_sq"].to(device, torch.float32)) for n in names}

    def adam(inner):
        return AdamTransformSink(inner, adam_state, beta1=beta1, beta2=beta2, eps=adam_eps)

    load_s = time.perf_counter() - t_load
    params = [p for p in model.parameters() if p.requires_grad]
    objective = SFTObjective()
    psg = PerSampleGradients(model, compute_dtype=torch.float32)
    collate = SFTCollator(pad_token_id=spec["pad_token_id"])

    def read(path):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    pool, query = read(spec["pool"]), read(spec["query"])

    def batch_of(rows, indices):
        batch = collate([dict(rows[i], index=i) for i in indices])
        index = batch.pop("index")
        return {k: v.to(device) for k, v in batch.items()}, index

    def over(rows, batches, sink_factory):
        """Run every batch; returns (index, output) per batch."""
        outs = []
        for indices in batches:
            batch, index = batch_of(rows, indices)
            outs.append((index, psg.compute(objective, batch, sink_factory())))
        return outs

    case = spec["case"]
    extra, prepare_s = {}, 0.0
    if case == "floor":
        def one_pass():
            for indices in spec["batches"]:
                batch, _ = batch_of(pool, indices)
                torch.autograd.grad(objective(model, batch).losses.sum(), params)
    elif case in ("exact", "projected"):
        # query side (the LESS validation side: raw gradients, unit-normalized, averaged), untimed
        t0 = time.perf_counter()
        if case == "exact":
            sums = {n: torch.zeros(shapes[n].numel(), device=device) for n in names}
            for _, blocks in over(query, spec["query_batches"], lambda: BlockSink(names)):
                norm = torch.sqrt(sum(blocks[n].reshape(len(blocks[n]), -1).double().pow(2).sum(1) for n in names))
                for n in names:
                    sums[n] += (blocks[n].reshape(len(blocks[n]), -1) / norm[:, None].float()).sum(0)
            means = {n: (s / len(query))[None, :] for n, s in sums.items()}

            def make_sink():
                return adam(ExactScoreSink(means, [1]))
        else:
            projector = build_projector("countsketch", dim=spec["dim"], seed=spec["seed"])
            projector.setup(shapes, device)
            feats = [f for _, f in over(query, spec["query_batches"], lambda: NormalizingSink(projector))]
            qmean = torch.cat(feats).mean(0)

            def make_sink():
                return adam(NormalizingSink(projector))
        prepare_s = time.perf_counter() - t0
        scores = torch.zeros(len(pool), dtype=torch.float64)

        def one_pass():
            for indices in spec["batches"]:
                batch, index = batch_of(pool, indices)
                out = psg.compute(objective, batch, make_sink())
                if case == "exact":
                    scores[index] = (out[:, 0] / out[:, 1].sqrt()).double().cpu()
                else:
                    scores[index] = (out @ qmean).double().cpu()
    else:
        raise SystemExit(f"unknown rose case {case!r}")

    rounds = []
    for _ in range(spec["rounds"]):
        with PeakRSS(device) as mem:
            t0 = time.perf_counter()
            one_pass()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
        rounds.append({"pass_s": seconds, "peak_rss_mib": mem.peak / MIB, "start_rss_mib": mem.start / MIB,
                       "cuda_peak_mib": None if mem.cuda_peak is None else mem.cuda_peak / MIB})
        log(f"rose {case}: pass {seconds:.2f}s")
    out_dir = Path(spec["out_dir"])
    if case in ("exact", "projected"):
        np.save(out_dir / f"rose_{case}_scores.npy", scores.numpy())
        extra["scores"] = str(out_dir / f"rose_{case}_scores.npy")
    if case == "exact":
        # aligned, untimed: the same per-sample gradients under Bergson's normalizer instead of AdamDirection
        exp_avg_sq = {n: adam_state[n][1] for n in names}
        aligned = torch.zeros(len(pool), dtype=torch.float64)
        for indices in spec["batches"]:
            batch, index = batch_of(pool, indices)
            out = psg.compute(objective, batch, BergsonNormalizerSink(ExactScoreSink(means, [1]), exp_avg_sq))
            aligned[index] = (out[:, 0] / out[:, 1].sqrt()).double().cpu()
        np.save(out_dir / "rose_aligned_scores.npy", aligned.numpy())
        extra["aligned_scores"] = str(out_dir / "rose_aligned_scores.npy")
        extra["adam"] = saved["hyper"]
    return {"rounds": rounds, "load_s": load_s, "prepare_query_s": prepare_s, **extra,
            "model_training_mode": bool(model.training), "torch_threads": torch.get_num_threads(),
            "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def reference_child(spec: dict) -> dict:
    """float64, one row at a time, plain autograd (no rose_pl gradient code): both tools' score formulas."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from peft import PeftModel

    from rose_pl.hub import load_causal_lm

    device = torch.device(spec["device"])
    torch.set_default_dtype(torch.float64)
    base = load_causal_lm(spec["model_dir"], "float64", "eager")
    model = PeftModel.from_pretrained(base, spec["adapter"], is_trainable=True).eval().to(device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    wrong = sorted({str(p.dtype) for p in model.parameters()} - {"torch.float64"})
    if wrong:
        raise RuntimeError(f"reference model is not all float64: {wrong}")
    saved = torch.load(Path(spec["checkpoint"]) / "optimizer.pt", weights_only=True)
    beta1, beta2 = saved["hyper"]["betas"]
    eps = saved["hyper"]["eps"]
    m = torch.cat([saved["state"][n]["exp_avg"].double().reshape(-1) for n, _ in named]).to(device)
    v = torch.cat([saved["state"][n]["exp_avg_sq"].double().reshape(-1) for n, _ in named]).to(device)

    def grad(row) -> torch.Tensor:
        ids = torch.tensor([row["input_ids"]], device=device)
        labels = torch.tensor(row["labels"][1:], device=device)
        logits = model(input_ids=ids).logits[0, :-1]
        keep = labels != -100
        loss = F.cross_entropy(logits[keep], labels[keep], reduction="mean")
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [p for _, p in named])])

    def read(path, limit=None):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return rows[:limit] if limit else rows

    t0 = time.perf_counter()
    qbar = torch.zeros_like(m)
    query = read(spec["query"])
    for row in query:
        g = grad(row)
        qbar += g / g.norm()
    qbar /= len(query)
    pool = read(spec["pool"], spec.get("limit"))
    less, berg = np.zeros(len(pool)), np.zeros(len(pool))
    bergson_den = v.sqrt() + BERGSON_ADAM_EPS
    for i, row in enumerate(pool):
        g = grad(row)
        a = (beta1 * m + (1 - beta1) * g) / torch.sqrt(beta2 * v + (1 - beta2) * g * g + eps)
        b = g / bergson_den
        less[i] = float(a @ qbar / a.norm())
        berg[i] = float(b @ qbar / b.norm())
    out_dir = Path(spec["out_dir"])
    np.save(out_dir / "ref_less_scores.npy", less)
    np.save(out_dir / "ref_bergson_scores.npy", berg)
    return {"rows": len(pool), "seconds": time.perf_counter() - t0, "less": str(out_dir / "ref_less_scores.npy"),
            "bergson": str(out_dir / "ref_bergson_scores.npy"), "betas": [beta1, beta2], "eps": eps}


# ---- orchestration --------------------------------------------------------------------------------------
def child_env(args) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_rose(args, kind: str, spec: dict, out_dir: Path) -> dict:
    spec_file, out_file = out_dir / f"rose_{kind}.spec.json", out_dir / f"rose_{kind}.json"
    spec_file.write_text(json.dumps(spec, default=str))
    log(f"rose {kind} ...")
    wall = run([sys.executable, __file__, "_child", kind, spec_file, out_file], env=child_env(args),
               what=f"rose {kind}")
    result = json.loads(out_file.read_text())
    result["process_wall_s"] = wall
    return result


def run_bergson(args, name: str, mode: str, spec: dict, out_dir: Path) -> dict:
    spec_file, out_file = out_dir / f"bergson_{name}.spec.json", out_dir / f"bergson_{name}.json"
    spec_file.write_text(json.dumps(spec, default=str))
    log(f"bergson {name} ...")
    python = Path(args.bergson_venv) / "bin" / "python"
    wall = run([python, DRIVER, mode, spec_file, out_file], env=bergson_env(args), what=f"bergson {name}")
    result = json.loads(out_file.read_text())
    result["process_wall_s"] = wall
    return result


def summarize(result: dict, rows: int, tokens: int, floor_s: float | None) -> dict:
    import statistics

    passes = [r["pass_s"] for r in result["rounds"]]
    best = min(passes)
    out = {"rows_per_s": rows / best, "tokens_per_s": tokens / best, "best_pass_s": best,
           "median_pass_s": statistics.median(passes), "rounds_pass_s": passes,
           "peak_rss_mib": max(r["peak_rss_mib"] for r in result["rounds"]),
           "rss_at_pass_start_mib": min(r["start_rss_mib"] for r in result["rounds"]),
           "process_max_rss_mib": result.get("process_max_rss_mib")}
    cuda = [r["cuda_peak_mib"] for r in result["rounds"] if r.get("cuda_peak_mib") is not None]
    if cuda:
        out["cuda_peak_mib"] = max(cuda)
    if floor_s:
        out["throughput_vs_own_floor"] = floor_s / best
    if "command_s" in result["rounds"][0]:
        out["best_command_s"] = min(r["command_s"] for r in result["rounds"])
    return out


def bergson_common(args, fx: dict, command: str) -> list:
    """Options every Bergson command here shares: the adapter (Bergson reads the base model from its
    adapter_config.json), the tokenizer folder (Bergson loads it even for pre-tokenized rows, for the model's
    maximum length), dtype, token budget, token-mean loss, attention kernel."""
    # `score` has two `precision` fields (index_cfg, score_cfg), so its flag is qualified
    flag = "--index_cfg.precision" if command == "score" else "--precision"
    return ["--model", fx["adapter"], "--tokenizer", fx["model_dir"], flag, BERGSON_PRECISION[args.dtype],
            "--token_batch_size", args.token_batch_size, "--loss_reduction", "mean",
            "--model_kwargs", f"attn_implementation={args.attn_implementation}"]


def main_run(args) -> None:
    import numpy as np
    import torch

    preset = PRESETS[args.preset]
    for key in ("rows", "query_rows", "lora_r", "token_batch_size", "dim", "rounds"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work / "run"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir()
    t_start = time.perf_counter()
    result = {"preset": args.preset, "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
              "machine": machine(args.device), "rose_versions": {"torch": torch.__version__}}
    import peft
    import transformers

    result["rose_versions"].update(transformers=transformers.__version__, peft=peft.__version__)

    result["bergson_install"] = ensure_bergson_venv(args)
    log(f"bergson venv: {result['bergson_install']['versions']}")
    fx = build_fixture(args, preset)
    result["fixture"] = {k: v for k, v in fx.items() if k not in ("settings",)}
    rows, tokens = fx["rows"], fx["pool_tokens"]

    # Bergson's batches, used by both sides
    batches = run_bergson(args, "batches", "batches", {"datasets": {"pool": fx["pool"], "query": fx["query"]},
                                                       "token_batch_size": args.token_batch_size}, out_dir)["batches"]
    with open(fx["pool"]) as f:
        lengths = [len(json.loads(line)["input_ids"]) for line in f if line.strip()]
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches["pool"])
    result["batches"] = {"pool_batches": len(batches["pool"]), "pool_padded_tokens": padded,
                         "padding_fraction": 1 - tokens / padded, "query_batches": len(batches["query"]),
                         "rows_per_batch_min_max": [min(map(len, batches["pool"])), max(map(len, batches["pool"]))]}

    rose_spec = {"checkpoint": fx["checkpoint"], "model_dir": fx["model_dir"], "pool": fx["pool"],
                 "query": fx["query"], "batches": batches["pool"], "query_batches": batches["query"],
                 "pad_token_id": fx["pad_token_id"], "device": args.device, "dtype": args.dtype,
                 "attn": args.attn_implementation, "rounds": args.rounds, "dim": args.dim, "seed": args.seed,
                 "out_dir": str(out_dir)}
    modules = fx["lora_tensors"]  # Bergson hooks one module per LoRA matrix (each lora_A and lora_B Linear)
    if args.bergson_projection_target == "per_module":
        p = max(1, round((args.dim / modules) ** 0.5))
        bergson_dim = p * p * modules
    else:
        p, bergson_dim = args.dim, args.dim
    runs = out_dir / "bergson_runs"
    cases = {}
    raw = {}

    if "floor" in args.cases:
        raw["rose_floor"] = run_rose(args, "floor", dict(rose_spec, case="floor"), out_dir)
        raw["bergson_floor"] = run_bergson(args, "floor", "floor", {
            "run_path": str(runs / "floor"), "model": fx["adapter"], "tokenizer": fx["model_dir"],
            "precision": BERGSON_PRECISION[args.dtype], "token_batch_size": args.token_batch_size,
            "model_kwargs": f"attn_implementation={args.attn_implementation}", "dataset": fx["pool"],
            "rounds": args.rounds}, out_dir)
    if "exact" in args.cases:
        raw["rose_exact"] = run_rose(args, "exact", dict(rose_spec, case="exact"), out_dir)
        # the query (LESS validation side): raw gradients, each unit-normalized, averaged into one row
        raw["bergson_query_exact"] = run_bergson(args, "query_exact", "cli", {"rounds": 1, "argv": [
            "build", runs / "query_exact", *bergson_common(args, fx, "build"), "--dataset", fx["query"],
            "--projection_dim", 0, "--unit_normalize", "true", "--aggregation", "mean"]}, out_dir)
        # the pool: Adam-normalized gradients, each scored by its inner product with the query row over its norm
        raw["bergson_score"] = run_bergson(args, "score", "cli", {"rounds": args.rounds, "argv": [
            "score", runs / "score", *bergson_common(args, fx, "score"), "--dataset", fx["pool"],
            "--projection_dim", 0, "--query_path", runs / "query_exact",
            "--optimizer_state", fx["bergson_optimizer"], "--unit_normalize", "true"]}, out_dir)
    if "projected" in args.cases:
        raw["rose_projected"] = run_rose(args, "projected", dict(rose_spec, case="projected"), out_dir)
        proj = ["--projection_dim", p, "--projection_target", args.bergson_projection_target,
                "--projection_seed", args.seed]
        raw["bergson_query_projected"] = run_bergson(args, "query_projected", "cli", {"rounds": 1, "argv": [
            "build", runs / "query_projected", *bergson_common(args, fx, "build"), "--dataset", fx["query"],
            *proj, "--unit_normalize", "true", "--aggregation", "mean"]}, out_dir)
        raw["bergson_build_projected"] = run_bergson(args, "build_projected", "cli", {"rounds": args.rounds, "argv": [
            "build", runs / "build_projected", *bergson_common(args, fx, "build"), "--dataset", fx["pool"], *proj,
            "--optimizer_state", fx["bergson_optimizer"], "--unit_normalize", "true"]}, out_dir)
    if "reference" in args.cases:
        log("reference (float64) ...")
        raw["reference"] = run_rose(args, "reference", {
            "model_dir": fx["model_dir"], "adapter": fx["adapter"], "checkpoint": fx["checkpoint"],
            "pool": fx["pool"], "query": fx["query"], "limit": args.reference_rows, "out_dir": str(out_dir),
            "device": args.device},
            out_dir)

    # timings
    floors = {side: raw[f"{side}_floor"]["rounds"] for side in ("rose", "bergson") if f"{side}_floor" in raw}
    floor_s = {side: min(r["pass_s"] for r in rs) for side, rs in floors.items()}
    for name, side in (("rose_floor", "rose"), ("rose_exact", "rose"), ("rose_projected", "rose"),
                       ("bergson_floor", "bergson"), ("bergson_score", "bergson"),
                       ("bergson_build_projected", "bergson")):
        if name in raw:
            cases[name] = summarize(raw[name], rows, tokens, floor_s.get(side))
            cases[name]["process_wall_s"] = raw[name]["process_wall_s"]
    if "rose_projected" in cases:
        cases["rose_projected"]["dims"] = args.dim
    if "bergson_build_projected" in cases:
        cases["bergson_build_projected"].update(dims=bergson_dim, projection_target=args.bergson_projection_target,
                                                projection_dim_arg=p)
    for name in ("bergson_score", "bergson_build_projected", "bergson_floor"):
        if name in raw:
            cases[name]["normalizers_loaded"] = raw[name].get("normalizers_loaded")
            cases[name]["model_training_mode"] = raw[name].get("model_training_mode")
    for name in ("bergson_query_exact", "bergson_query_projected"):
        if name in raw:
            cases[name] = {"command_s": raw[name]["rounds"][0]["command_s"], "pass_s": raw[name]["rounds"][0]["pass_s"]}
    if "rose_exact" in cases and "bergson_score" in cases:
        cases["exact_rose_over_bergson"] = cases["bergson_score"]["best_pass_s"] / cases["rose_exact"]["best_pass_s"]
    if "rose_projected" in cases and "bergson_build_projected" in cases:
        cases["projected_rose_over_bergson"] = (cases["bergson_build_projected"]["best_pass_s"]
                                                / cases["rose_projected"]["best_pass_s"])
    if floor_s.keys() == {"rose", "bergson"}:
        cases["floor_rose_over_bergson"] = floor_s["bergson"] / floor_s["rose"]
    result["cases"] = cases

    # agreement
    scores = {}
    if "rose_exact" in raw:
        scores["rose_exact"] = np.load(raw["rose_exact"]["scores"])
        scores["rose_aligned_to_bergson"] = np.load(raw["rose_exact"]["aligned_scores"])
    if "bergson_score" in raw:
        scores["bergson_score"] = np.load(raw["bergson_score"]["export"]["scores"])[:, 0]
    if "rose_projected" in raw:
        scores["rose_projected"] = np.load(raw["rose_projected"]["scores"])
    if "bergson_build_projected" in raw:
        g = np.load(raw["bergson_build_projected"]["export"]["gradients"]).astype(np.float64)
        qv = np.load(raw["bergson_query_projected"]["export"]["gradients"]).astype(np.float64)[0]
        scores["bergson_projected"] = g @ qv
    if "reference" in raw:
        scores["ref_less_float64"] = np.load(raw["reference"]["less"])
        scores["ref_bergson_float64"] = np.load(raw["reference"]["bergson"])
    pairs = [("rose_exact", "ref_less_float64"), ("bergson_score", "ref_bergson_float64"),
             ("rose_aligned_to_bergson", "ref_bergson_float64"), ("rose_projected", "ref_less_float64"),
             ("bergson_projected", "ref_bergson_float64"), ("rose_aligned_to_bergson", "bergson_score"),
             ("rose_exact", "bergson_score"), ("ref_less_float64", "ref_bergson_float64"),
             ("rose_projected", "rose_exact"), ("bergson_projected", "bergson_score"),
             ("rose_projected", "bergson_projected")]
    agreement = {}
    for a, b in pairs:
        if a in scores and b in scores:
            k = min(len(scores[a]), len(scores[b]))
            agreement[f"{a} vs {b}"] = compare(scores[a][:k], scores[b][:k])
    result["agreement"] = agreement
    result["reference"] = raw.get("reference")
    result["raw"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("versions", "info")} for k, v in raw.items()}
    result["bergson_versions"] = result["bergson_install"]["versions"]
    result["wall_s"] = time.perf_counter() - t_start
    output = Path(args.output) if args.output else work / "result.json"
    output.write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {output} ({result['wall_s']:.0f}s)")
    for name, c in cases.items():
        if isinstance(c, dict) and "rows_per_s" in c:
            log(f"  {name:26s} {c['rows_per_s']:8.2f} rows/s {c['tokens_per_s']:9.0f} tok/s  peak RSS "
                f"{c['peak_rss_mib']:7.0f} MiB  vs own floor {c.get('throughput_vs_own_floor', float('nan')):.2f}")
    for name, a in agreement.items():
        log(f"  {name:50s} spearman {a['spearman']:.4f}  max|diff| {a['max_abs_diff']:.2e}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, spec_file, out_file = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
        spec = json.loads(spec_file.read_text())
        out = reference_child(spec) if kind == "reference" else rose_child(spec)
        out_file.write_text(json.dumps(out, indent=1))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--attn-implementation", default="sdpa", help="for both tools (rose_pl's default is eager)")
    ap.add_argument("--rows", type=int, help="pool rows scored (preset default)")
    ap.add_argument("--query-rows", type=int, help="query (validation) rows, one task (preset default)")
    ap.add_argument("--lora-r", type=int, help="LoRA rank (alpha = 4 r)")
    ap.add_argument("--token-batch-size", type=int,
                    help="token budget per batch, max_len x rows (Bergson's --token_batch_size); both tools use "
                         "Bergson's allocation of the rows")
    ap.add_argument("--dim", type=int, help="rose_pl CountSketch dimension; Bergson's projection is matched to it")
    ap.add_argument("--bergson-projection-target", choices=["per_module", "global"], default="per_module")
    ap.add_argument("--rounds", type=int, help="timed passes per case (best and median reported)")
    ap.add_argument("--cases", nargs="+", default=["floor", "exact", "projected", "reference"],
                    choices=["floor", "exact", "projected", "reference"])
    ap.add_argument("--reference-rows", type=int, default=None, help="limit the float64 reference to the first N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bergson-venv", default=os.environ.get("BERGSON_VENV", DEFAULT_VENV))
    ap.add_argument("--work-dir", default=None, help="default /tmp/bergson_vs_rose/<preset>")
    ap.add_argument("--output", default=None, help="result JSON (default <work-dir>/result.json)")
    args = ap.parse_args()
    args.work_dir = args.work_dir or f"/tmp/bergson_vs_rose/{args.preset}"
    main_run(args)


if __name__ == "__main__":
    main()
