"""Which tokens each optimizer step trains on: a pure function of (seed, step)."""

from __future__ import annotations

import numpy as np
import torch

from tvq.training.config import TrainConfig


class SegmentSampler:
    """Global batches of update segments cut from random sequences of a token stream.

    Sequence number ``step // segments_per_sequence`` draws ``batch_size`` start offsets from a
    generator seeded by (seed, sequence number); step ``step`` trains on segment
    ``step % segments_per_sequence`` of each. Because a batch depends only on (seed, step),
    resuming at any step, or splitting the batch over micro-batches or ranks, sees the same data.
    """

    def __init__(self, tokens: np.ndarray, cfg: TrainConfig):
        self.tokens, self.cfg = tokens, cfg
        self.max_start = len(tokens) - cfg.sequence_len - 1
        if self.max_start < 0:
            raise ValueError(f"the training split has {len(tokens)} tokens, fewer than sequence_len + 1 = "
                             f"{cfg.sequence_len + 1}; use more data or a smaller sequence_len")

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each (batch_size, update_len) long; labels are inputs shifted by one."""
        cfg = self.cfg
        seq, seg = divmod(step, cfg.segments_per_sequence)
        starts = np.random.default_rng([cfg.seed, seq]).integers(0, self.max_start + 1, cfg.batch_size)
        starts = starts + seg * cfg.update_len
        idx = starts[:, None] + np.arange(cfg.update_len + 1)[None, :]  # (B, U + 1)
        window = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return window[:, :-1], window[:, 1:]

    def is_sequence_start(self, step: int) -> bool:
        return step % self.cfg.segments_per_sequence == 0
