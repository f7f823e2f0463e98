"""An example Lightning project of its own (model, data, loss) that uses rose_pl's gradients, scoring and selection."""
