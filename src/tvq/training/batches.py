"""Which tokens each optimizer step trains on: a pure function of (seed, step)."""

from __future__ import annotations

import numpy as np
import torch

from tvq.data.corpus import Split
from tvq.data.tokenizer import DOC_START
from tvq.training.config import TrainConfig


def shifted_inputs(tokens: np.ndarray, label_starts: np.ndarray, length: int, doc_start: np.ndarray) -> np.ndarray:
    """Inputs for label windows tokens[s : s + length]: the window shifted right by one token,
    with DOC_START in place of the token before a document's first token -> (N, length) int64."""
    idx = label_starts[:, None] - 1 + np.arange(length)[None, :]  # (N, length)
    inputs = tokens[np.maximum(idx, 0)].astype(np.int64)
    inputs[:, 0] = np.where(doc_start, DOC_START, inputs[:, 0])
    return inputs


class SegmentSampler:
    """Global batches of update segments cut from random sequences that lie inside one document.

    Sequence number ``step // segments_per_sequence`` draws ``batch_size`` windows of
    ``sequence_len`` label tokens, uniformly over every position where such a window fits in a
    document, from a generator seeded by (seed, sequence number); step ``step`` trains on segment
    ``step % segments_per_sequence`` of each. A sequence never crosses a document boundary, so
    the attention state never carries one document into another. Because a batch depends only
    on (seed, step), resuming at any step, or splitting the batch over micro-batches or ranks,
    sees the same data.
    """

    def __init__(self, split: Split, cfg: TrainConfig):
        self.tokens, self.cfg = split.tokens, cfg
        L = cfg.sequence_len
        starts = split.doc_starts
        lengths = np.diff(np.append(starts, len(split.tokens)))  # (n_docs,)
        n_windows = np.maximum(lengths - L + 1, 0)  # label windows that fit in each document
        if n_windows.sum() == 0:
            raise ValueError(f"no training document has sequence_len = {L} tokens (longest: {lengths.max()}); "
                             "use a smaller sequence_len or more data")
        self.doc_starts = starts
        self.cum_windows = np.cumsum(n_windows)  # (n_docs,)

    def sequence_starts(self, seq: int) -> tuple[np.ndarray, np.ndarray]:
        """Label start offsets (B,) of sequence number ``seq``, and whether each starts its document."""
        draw = np.random.default_rng([self.cfg.seed, seq]).integers(0, self.cum_windows[-1], self.cfg.batch_size)
        doc = np.searchsorted(self.cum_windows, draw, side="right")  # (B,)
        offset = draw - np.append(0, self.cum_windows)[doc]
        return self.doc_starts[doc] + offset, offset == 0

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each (batch_size, update_len) long."""
        cfg = self.cfg
        seq, seg = divmod(step, cfg.segments_per_sequence)
        starts, at_doc_start = self.sequence_starts(seq)
        seg_starts = starts + seg * cfg.update_len
        labels = self.tokens[seg_starts[:, None] + np.arange(cfg.update_len)[None, :]].astype(np.int64)
        inputs = shifted_inputs(self.tokens, seg_starts, cfg.update_len, at_doc_start & (seg == 0))
        return torch.from_numpy(inputs), torch.from_numpy(labels)

    def is_sequence_start(self, step: int) -> bool:
        return step % self.cfg.segments_per_sequence == 0
