"""Training: the LoRA causal-LM LightningModule (warmup and final fine-tune) and its per-epoch checkpoints."""
