"""Training: run configs and presets, batching, the loop, evaluation, checkpoints."""
