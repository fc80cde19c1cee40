"""The reference: SPEC section 3 computed literally, with a dense (T, P + T) score matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from tvq.ops.cache import cache_log_count


def quadratic_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    *,
    n_invalid: int,
    rel: Tensor,
    u: Tensor,
    v: Tensor,
    mem_len: int,
    agg_cache: bool,
    grad_thru_cache: bool,
    quantized: bool = True,
    cache: tuple[Tensor, Tensor, Tensor] | None = None,
    cache_bias: Tensor | None = None,
) -> Tensor:
    """Causal attention of T queries over P past keys plus themselves.

    q (B, H, T, D_k) are the queries of the last T entries of keys (B, H, P + T, D_k) and
    values (B, H, P + T, D_v); the first ``n_invalid`` key slots hold no token. For query i
    and key j at distance d = i - j >= 0:

        score = (q + u).k_j + (q + v).rel[d]    if d <= mem_len
        score = (q + u).k_j                     if d >  mem_len and agg_cache (else masked)

    rel (H, mem_len + 1, D_k) embeds distances; u, v (H, D_k). ``cache`` = (codebook (H, S, D_k),
    count (B, H, S), mean (B, H, S, D_v)) adds one entry per code standing for keys older than
    the P past keys: score (q + u).c_s + log count_s, value mean_s. ``cache_bias`` (H,), if given, is
    added to the scores of everything beyond the window: the cache entries and the keys at d > mem_len.

    Gradients, as in the linear-time path: with ``quantized`` keys, keys at d > mem_len are
    codewords and get no straight-through gradient; without ``grad_thru_cache`` their values
    get none either. Returns (B, H, T, D_v).
    """
    T, n_keys = q.shape[2], keys.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    qu = q + u[:, None]  # (B, H, T, D_k)
    qv = q + v[:, None]  # (B, H, T, D_k)

    i = torch.arange(T, device=q.device)[:, None] + (n_keys - T)  # query index in the key list
    j = torch.arange(n_keys, device=q.device)[None, :]
    dist = i - j  # (T, P + T)
    valid = (j >= n_invalid) & (dist >= 0)
    near = valid & (dist <= mem_len)
    old = valid & (dist > mem_len) & agg_cache

    content = qu @ keys.transpose(-1, -2)  # (B, H, T, P + T)
    content_old = qu @ keys.detach().transpose(-1, -2) if quantized else content
    rel_scores = qv @ rel.transpose(-1, -2)  # (B, H, T, M + 1)
    idx = dist.clamp(0, mem_len).expand(*q.shape[:2], -1, -1)
    positional = torch.gather(rel_scores, -1, idx)  # (B, H, T, P + T)
    if cache_bias is not None:  # keys beyond the window are the cache's, whether aggregated yet or not
        content_old = content_old + cache_bias.to(content_old.dtype)[:, None, None]
    scores = torch.where(near, content + positional, torch.where(old, content_old, float("-inf")))
    scores = scores.to(acc)

    if cache is not None:
        codebook, count, mean = cache
        cache_scores = (qu @ codebook.to(q.dtype).transpose(-1, -2)).to(acc)  # (B, H, T, S)
        cache_scores = cache_scores + cache_log_count(count.to(acc))[:, :, None, :]
        if cache_bias is not None:
            cache_scores = cache_scores + cache_bias.to(acc)[:, None, None]
        scores = torch.cat([scores, cache_scores], -1)

    probs = torch.softmax(scores, -1)  # (B, H, T, P + T [+ S])
    p_keys = probs[..., :n_keys]
    vals = values.to(acc)
    if grad_thru_cache:
        out = p_keys @ vals
    else:
        out = torch.where(old, 0.0, p_keys) @ vals + torch.where(old, p_keys, 0.0) @ vals.detach()
    if cache is not None:
        out = out + probs[..., n_keys:] @ mean.to(acc)
    return out.to(q.dtype)
