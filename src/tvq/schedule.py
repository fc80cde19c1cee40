"""The learning-rate schedule of training and of the recall benchmark."""

from __future__ import annotations

import math


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """The learning rate of optimizer step ``step`` (from 0) of ``steps``: a linear warmup over
    ``warmup`` steps to ``lr``, then a cosine decay to ``min_ratio * lr`` at ``steps``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
