"""The tensor functions recipes compute with: task-vector updates, low-rank factors, scaling, quantizers."""
