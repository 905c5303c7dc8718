"""Plans: the YAML a user writes, validated into typed steps, and resolved against the real checkpoints."""
