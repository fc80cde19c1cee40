"""The reference: docs/spec.md section 3 computed literally, with a dense (T, P + T) score matrix.

Two parts, each to be read against the spec: :func:`reference_attention` is the formula (the forward,
and without a gradient rule the formula's own gradients, those of dense attention), and
:func:`gradient_rule` says which (query, key) pairs pass the straight-through gradient to the key and a
gradient to the value. :func:`quadratic_attention` joins them, with the signature of
:func:`tvq.ops.blockwise_attention`, the linear-time path it is the naive twin of.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tvq.ops.cache import cache_log_count


def reference_attention(
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
    cache: tuple[Tensor, Tensor, Tensor] | None = None,
    cache_bias: Tensor | None = None,
    key_grad: Tensor | None = None,
    value_grad: Tensor | None = None,
) -> Tensor:
    """Causal attention of T queries over P past keys plus themselves -> (B, H, T, D_v).

    q (B, H, T, D_k) are the queries of the last T entries of keys (B, H, P + T, D_k) and values
    (B, H, P + T, D_v). The first ``n_invalid`` key slots hold no token (a (B,) tensor: per row, hidden
    only from that row's queries past them, so a left-padding query still sees itself). For query i and
    key j at distance d = i - j >= 0:

        score = (q + u).k_j + (q + v).rel[d]    if d <= mem_len
        score = (q + u).k_j + bias              if d >  mem_len and agg_cache (else masked)

    rel (H, mem_len + 1, D_k) embeds distances; u, v (H, D_k); bias is ``cache_bias`` (H,) or 0.
    ``cache`` = (codebook (H, S, D_k), count (B, H, S), mean (B, H, S, D_v)) adds one entry per code
    standing for keys older than the P past keys: score (q + u).c_s + log count_s + bias, value mean_s.

    ``key_grad`` / ``value_grad`` (T, P + T) bool: the pairs through which the key / the value gets a
    gradient; elsewhere it is a constant for that query (see :func:`gradient_rule`). None: every pair.
    """
    T, n_keys = q.shape[2], keys.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    qu = q + u[:, None]  # (B, H, T, D_k)
    qv = q + v[:, None]  # (B, H, T, D_k)

    i = torch.arange(T, device=q.device)[:, None] + (n_keys - T)  # query index in the key list
    j = torch.arange(n_keys, device=q.device)[None, :]
    dist = i - j  # (T, P + T)
    ninv = n_invalid.view(-1, 1, 1, 1) if isinstance(n_invalid, Tensor) else n_invalid  # (B, 1, 1, 1) or int
    visible = ((j >= ninv) | (i < ninv)) & (dist >= 0)  # (B, 1, T, P + T) or (T, P + T)
    near = visible & (dist <= mem_len)
    far = visible & (dist > mem_len) & agg_cache

    content = qu @ keys.transpose(-1, -2)  # (B, H, T, P + T)
    if key_grad is not None:
        content = torch.where(key_grad, content, qu @ keys.detach().transpose(-1, -2))
    positional = torch.gather(qv @ rel.transpose(-1, -2), -1, dist.clamp(0, mem_len).expand(*q.shape[:2], -1, -1))
    far_scores = content if cache_bias is None else content + cache_bias.to(content.dtype)[:, None, None]
    scores = torch.where(near, content + positional, torch.where(far, far_scores, float("-inf"))).to(acc)

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


def gradient_rule(T: int, n_keys: int, *, mem_len: int, block_len: int, straight_through: str,
                  grad_thru_cache: bool, device=None) -> tuple[Tensor, Tensor | None]:
    """Which (query, key) pairs pass gradients, for queries i (key-list index n_keys - T + i) and keys j:
    (key_grad, value_grad), (T, n_keys) bool each, value_grad None for every pair (docs/spec.md section 4).

    ``"window"``: key j gets the straight-through gradient from queries within ``mem_len`` of it; older
    keys stand for their codewords (the cache), constants. Without ``grad_thru_cache`` their values are
    constants too.
    ``"block"`` (the official code's rule): the queries are cut into blocks of ``block_len`` from the first;
    a query of the block starting at key index s passes the straight-through gradient to keys
    j >= s - mem_len, and without ``grad_thru_cache`` reaches only the keys and values of its own block
    (j >= s).
    """
    i = torch.arange(T, device=device)[:, None] + (n_keys - T)
    j = torch.arange(n_keys, device=device)[None, :]
    if straight_through == "block":
        s = torch.arange(T, device=device)[:, None] // block_len * block_len + (n_keys - T)  # (T, 1)
        key_grad = j >= (s - mem_len if grad_thru_cache else s)  # (T, n_keys)
        return key_grad, None if grad_thru_cache else j >= s
    if straight_through != "window":
        raise ValueError(f"straight_through must be 'window' or 'block', got {straight_through!r}")
    near = i - j <= mem_len  # (T, n_keys)
    return near, None if grad_thru_cache else near


def scaled_biases(u: Tensor, v: Tensor, scale: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The query biases as the attention adds them: ``(u * scale).to(dtype)`` and ``(v * scale).to(dtype)``."""
    if scale != 1.0:
        u, v = u * scale, v * scale
    return u.to(dtype), v.to(dtype)


def quadratic_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    codes: Tensor,
    *,
    n_invalid: int | Tensor,
    rel: Tensor,
    u: Tensor,
    v: Tensor,
    mem_len: int,
    block_len: int,
    agg_cache: bool,
    grad_thru_cache: bool,
    cache: tuple[Tensor, Tensor, Tensor],
    straight_through: str = "window",
    cache_bias: Tensor | None = None,
    uv_scale: float = 1.0,
) -> Tensor:
    """:func:`reference_attention` with quantized keys and the gradients of :func:`gradient_rule`: what
    :func:`tvq.ops.blockwise_attention` computes, with the same arguments. ``codes`` is not read (the keys
    are already codewords); ``cache`` is read with ``agg_cache`` only; u and v are used as
    ``(u * uv_scale).to(q.dtype)``."""
    u, v = scaled_biases(u, v, uv_scale, q.dtype)
    key_grad, value_grad = gradient_rule(q.shape[2], keys.shape[2], mem_len=mem_len, block_len=block_len,
                                         straight_through=straight_through, grad_thru_cache=grad_thru_cache,
                                         device=q.device)
    return reference_attention(q, keys, values, n_invalid=n_invalid, rel=rel, u=u, v=v, mem_len=mem_len,
                               agg_cache=agg_cache, cache=cache if agg_cache else None, cache_bias=cache_bias,
                               key_grad=key_grad, value_grad=value_grad)
