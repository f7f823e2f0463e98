"""The one-command pipeline: the stage graph of a run, its bookkeeping, the comparison and the summary."""
