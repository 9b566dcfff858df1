"""Evaluation: scoring a saved variant on the test split (metrics with intervals, predictions, confusion, latency),
the metrics themselves (project-local `evaluate` modules, a causal LM's next-token loss, perplexity and bits per
byte), significance tests, and the per-class summary."""
