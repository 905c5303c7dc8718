"""Scoring models: perplexity with a sliding window and throughput, on CPU or GPU."""
