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
    n_invalid: int | Tensor,
    rel: Tensor,
    u: Tensor,
    v: Tensor,
    mem_len: int,
    agg_cache: bool,
    grad_thru_cache: bool,
    quantized: bool = True,
    cache: tuple[Tensor, Tensor, Tensor] | None = None,
    straight_through: str = "window",
    block_len: int | None = None,
    cache_bias: Tensor | None = None,
) -> Tensor:
    """Causal attention of T queries over P past keys plus themselves.

    q (B, H, T, D_k) are the queries of the last T entries of keys (B, H, P + T, D_k) and
    values (B, H, P + T, D_v); the first ``n_invalid`` key slots hold no token (a (B,) tensor: per row,
    hidden only from that row's queries past them, as a left-padding query still sees itself). For query i
    and key j at distance d = i - j >= 0:

        score = (q + u).k_j + (q + v).rel[d]    if d <= mem_len
        score = (q + u).k_j                     if d >  mem_len and agg_cache (else masked)

    rel (H, mem_len + 1, D_k) embeds distances; u, v (H, D_k). ``cache`` = (codebook (H, S, D_k),
    count (B, H, S), mean (B, H, S, D_v)) adds one entry per code standing for keys older than
    the P past keys: score (q + u).c_s + log count_s, value mean_s. ``cache_bias`` (H,), if given, is
    added to the scores of everything beyond the window: the cache entries and the keys at d > mem_len.

    Gradients, as in the linear-time path (the forward is the same for every rule). With
    ``quantized`` keys and ``straight_through="window"``, keys at d > mem_len are codewords and
    get no straight-through gradient; without ``grad_thru_cache`` their values get none either.
    With ``"block"`` (the official code's rule) the T queries are cut into blocks of ``block_len``
    from the first one; a query of a block starting at key index s passes the straight-through
    gradient to keys j >= s - mem_len, and without ``grad_thru_cache`` reaches only the keys
    and values of its own block (j >= s). Returns (B, H, T, D_v).
    """
    if straight_through == "block" and block_len is None:
        raise ValueError("quadratic_attention: straight_through='block' needs block_len")
    T, n_keys = q.shape[2], keys.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    qu = q + u[:, None]  # (B, H, T, D_k)
    qv = q + v[:, None]  # (B, H, T, D_k)

    i = torch.arange(T, device=q.device)[:, None] + (n_keys - T)  # query index in the key list
    j = torch.arange(n_keys, device=q.device)[None, :]
    dist = i - j  # (T, P + T)
    if isinstance(n_invalid, Tensor):
        ninv = n_invalid.view(-1, 1, 1, 1)
        valid = ((j >= ninv) | (i < ninv)) & (dist >= 0)  # (B, 1, T, P + T)
    else:
        valid = (j >= n_invalid) & (dist >= 0)
    near = valid & (dist <= mem_len)
    old = valid & (dist > mem_len) & agg_cache
    if straight_through == "block":  # the (T, 1) key index s of the first query of each query's block
        s = torch.arange(T, device=q.device)[:, None] // block_len * block_len + (n_keys - T)
        key_grad = j >= (s - mem_len if grad_thru_cache else s)  # (T, P + T)
        value_grad = None if grad_thru_cache else j >= s
    else:
        key_grad = dist <= mem_len
        value_grad = None if grad_thru_cache else ~old

    content = qu @ keys.transpose(-1, -2)  # (B, H, T, P + T)
    if quantized:  # keys without a straight-through gradient are codewords: constants
        content = torch.where(key_grad, content, qu @ keys.detach().transpose(-1, -2))
    rel_scores = qv @ rel.transpose(-1, -2)  # (B, H, T, M + 1)
    idx = dist.clamp(0, mem_len).expand(*q.shape[:2], -1, -1)
    positional = torch.gather(rel_scores, -1, idx)  # (B, H, T, P + T)
    if cache_bias is not None:  # keys beyond the window are the cache's, whether aggregated yet or not
        old_scores = content + cache_bias.to(content.dtype)[:, None, None]
    else:
        old_scores = content
    scores = torch.where(near, content + positional, torch.where(old, old_scores, float("-inf")))
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
    if value_grad is None:
        out = p_keys @ vals
    else:
        out = torch.where(value_grad, p_keys, 0.0) @ vals + torch.where(value_grad, 0.0, p_keys) @ vals.detach()
    if cache is not None:
        out = out + probs[..., n_keys:] @ mean.to(acc)
    return out.to(q.dtype)
