"""Features: objectives, batched per-sample gradients, the gradient transform (Adam direction), the predict
LightningModules, projection, the feature store, and exact scoring against known task gradients."""
