"""Long-context evaluation: stream a split through the model with the state carried."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from tvq.data.corpus import Split
from tvq.models.transformer_vq import TransformerVQ
from tvq.training.batches import shifted_inputs


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
) -> dict:
    """Loss over a split: each document streamed in segments of ``segment_len`` with the state
    carried, from an empty state at the document's start (the paper's long-context evaluation).

    Every token is predicted, the first of a document from the DOC_START input. ``max_tokens``
    > 0 stops after that many predictions; ``reset_every`` > 0 (a multiple of ``segment_len``)
    also empties the state every that many tokens, to score models with the same context.
    Returns ``loss`` (nats per token), ``bpb`` (bits per UTF-8 byte of the raw text), ``tokens``;
    for non-byte tokenizers also ``ppl`` (per token) and, over a whole split, ``word_ppl``.
    """
    if reset_every % segment_len:
        raise ValueError(f"reset_every {reset_every} must be a multiple of segment_len {segment_len}")
    n_total = len(split.tokens)
    budget = min(max_tokens, n_total) if max_tokens else n_total
    if budget < 1:
        raise ValueError("the evaluation split is empty")
    was_training = model.training
    model.eval()
    total, done = 0.0, 0
    try:
        for d in range(split.n_docs):
            doc = split.document(d)
            n = min(len(doc), budget - done)
            state = None
            for start in range(0, n, segment_len):
                if reset_every and start % reset_every == 0:
                    state = None
                length = min(segment_len, n - start)
                inputs = shifted_inputs(doc, np.array([start]), length, np.array([start == 0]))
                labels = torch.from_numpy(doc[start: start + length].astype(np.int64)).to(device)
                out = model(torch.from_numpy(inputs).to(device), state=state)
                total += F.cross_entropy(out.logits[0].double(), labels, reduction="sum").item()
                state = out.state
            done += n
            if done >= budget:
                break
    finally:
        model.train(was_training)
    n_bytes = done if byte_level else split.n_bytes * done / n_total
    result = {"loss": total / done, "bpb": total / math.log(2) / n_bytes, "tokens": done}
    if not byte_level:
        result["ppl"] = math.exp(total / done)
        if done == n_total and split.n_words:
            result["word_ppl"] = math.exp(total / split.n_words)
    return result
