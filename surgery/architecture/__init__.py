"""What transformers builds for a config, and whether an edited model is exactly what the plan says."""
