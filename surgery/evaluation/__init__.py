"""Scoring models: the texts (built-in corpora, files), sliding-window perplexity and throughput on
CPU or GPU, the loaders of every model kind surgery writes, per-layer importance, lm-eval tasks."""
