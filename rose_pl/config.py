"""Small typed argument groups shared by the LightningModules and the CLI.

jsonargparse reads the attribute docstrings below into `--help` and YAML keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rose_pl.errors import ConfigError


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
