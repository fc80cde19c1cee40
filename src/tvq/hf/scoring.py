"""tvq's own log-likelihoods of the requests lm-evaluation-harness makes, from a :class:`~tvq.TransformerVQ`.

lm-eval's ``hf`` model scores a continuation given a context (``loglikelihood``: multiple choice) and a
whole document (``loglikelihood_rolling``: perplexity). These compute the same numbers with tvq's API,
so that a harness run can be checked against them: the context is read from an empty state (an empty
context is the BOS token, ``DOC_START``, as lm-eval's prefix token), then the continuation's tokens are
scored one after the other. A document is scored in one pass whatever its length (lm-eval reads
``max_position_embeddings = MAX_LENGTH``), like ``tvq eval`` scores a document.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from tvq.data.tokenizer import DOC_START
from tvq.models.transformer_vq import TransformerVQ


@torch.no_grad()
def loglikelihood(model: TransformerVQ, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """(sum of log p(continuation | context), whether each continuation token is the argmax)."""
    if not continuation:
        raise ValueError("loglikelihood: the continuation is empty")
    context = list(context) or [DOC_START]
    ids = torch.tensor([context + list(continuation)[:-1]], device=model.embed.weight.device)
    logits = model.eval()(ids).logits[0, len(context) - 1:]  # (len(continuation), V)
    target = torch.tensor(continuation, device=logits.device)
    logp = F.log_softmax(logits.double(), -1)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())


def loglikelihood_rolling(model: TransformerVQ, tokens: list[int]) -> float:
    """log p(tokens) of a whole document, its first token predicted from DOC_START."""
    return loglikelihood(model, [DOC_START], tokens)[0]
