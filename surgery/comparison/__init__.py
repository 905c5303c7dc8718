"""`surgery diff`: what changed between two checkpoints, tensor by tensor and layer by layer."""
