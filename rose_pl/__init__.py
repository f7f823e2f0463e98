"""rose_pl: reward-oriented data selection (ROSE) for LLM instruction tuning, on PyTorch Lightning."""

__version__ = "0.1.0"
