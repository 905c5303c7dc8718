"""`surgery analyze`: per-layer importance and redundancy measured on a loaded model, and plans
suggested from them, each chosen by measured perplexity."""
