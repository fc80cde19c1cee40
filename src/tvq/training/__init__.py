"""Training: run configs and presets, batching, the loop, evaluation, checkpoints, and the samples
and plots of a run."""
