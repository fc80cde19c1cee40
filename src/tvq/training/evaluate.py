"""Long-context evaluation: stream a split through the model with the state carried."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from tvq.data.corpus import Split
from tvq.models.transformer_vq import TransformerVQ


@torch.no_grad()
def evaluate(
    model: TransformerVQ,
    split: Split,
    *,
    segment_len: int,
    max_tokens: int = 0,
    reset_every: int = 0,
    byte_level: bool = True,
    device: str | torch.device = "cpu",
    progress=None,
) -> dict:
    """Loss over a split, read as one stream in segments of ``segment_len`` with the state carried.

    ``max_tokens`` > 0 evaluates only the first that many predictions; ``reset_every`` > 0 (a
    multiple of ``segment_len``) starts from an empty state every that many tokens, to score
    every model with the same context. Returns ``loss`` (nats per
    token), ``bpb`` (bits per UTF-8 byte of the raw text), ``tokens``; for non-byte tokenizers
    also ``ppl`` (per token) and, over a whole split, ``word_ppl`` (per whitespace word).
    """
    was_training = model.training
    model.eval()
    n_pred = len(split.tokens) - 1
    if max_tokens:
        n_pred = min(n_pred, max_tokens)
    if n_pred < 1:
        raise ValueError("the evaluation split has fewer than 2 tokens")
    if reset_every % segment_len:
        raise ValueError(f"reset_every {reset_every} must be a multiple of segment_len {segment_len}")
    state, total = None, 0.0
    try:
        for start in range(0, n_pred, segment_len):
            if reset_every and start % reset_every == 0:
                state = None
            end = min(start + segment_len, n_pred)
            window = torch.from_numpy(split.tokens[start: end + 1].astype(np.int64))[None].to(device)
            out = model(window[:, :-1], state=state)
            total += F.cross_entropy(out.logits[0].double(), window[0, 1:], reduction="sum").item()
            state = out.state
            if progress is not None:
                progress(end - start)
    finally:
        model.train(was_training)
    whole = n_pred == len(split.tokens) - 1
    n_bytes = n_pred if byte_level else split.n_bytes * n_pred / max(len(split.tokens) - 1, 1)
    result = {"loss": total / n_pred, "bpb": total / math.log(2) / n_bytes, "tokens": n_pred}
    if not byte_level:
        result["ppl"] = math.exp(total / n_pred)
        if whole and split.n_words:
            result["word_ppl"] = math.exp(total / split.n_words)
    return result
