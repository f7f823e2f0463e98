"""Evaluation: preference metrics, generation, the LLM judge, and evaluating a (fine-tuned) model on a test set."""
