"""Dense causal attention for the ``attention="full"`` baseline, in O(T * chunk) memory.

The same function as :func:`tvq.ops.quadratic_attention` with unquantized keys, computed for
``chunk`` queries at a time; in training each chunk is recomputed during the backward pass
(activation checkpointing), so no (T, T) tensor is ever held. Time stays O(T^2): this is the
quadratic baseline the linear path is measured against.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from tvq.ops.blockwise import skew


def _chunk(q: Tensor, keys: Tensor, values: Tensor, rel_flip: Tensor, u: Tensor, v: Tensor,
           first: int, mem_len: int, start: Tensor | None) -> Tensor:
    """Queries at key-list indices first..first+C-1 over keys[: first + C]; with ``start`` (B,), keys
    before start[b] are hidden from row b's queries at or after it (left padding)."""
    C, n = q.shape[2], first + q.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    keys, values = keys[:, :, :n], values[:, :, :n]
    scores = (q + u[:, None]) @ keys.transpose(-1, -2)  # (B, H, C, n)
    # positional bias for the last mem_len + 1 keys of each query: same skew as the blockwise path
    W = min(n, mem_len + C)
    positional = skew((q + v[:, None]) @ rel_flip.transpose(-1, -2), mem_len + C)[..., -W:]  # (B, H, C, W)
    a = torch.arange(C, device=q.device)[:, None]
    w = torch.arange(mem_len + C - W, mem_len + C, device=q.device)[None, :]
    near = (w >= a) & (w <= a + mem_len)  # distance in [0, mem_len]
    scores = torch.cat([scores[..., : n - W], scores[..., n - W:] + torch.where(near, positional, 0.0)], -1)
    i = torch.arange(first, n, device=q.device)[:, None]
    j = torch.arange(n, device=q.device)[None, :]
    hidden = j > i  # (C, n)
    if start is not None:
        first_real = start.view(-1, 1, 1, 1)
        hidden = hidden | ((j < first_real) & (i >= first_real))  # (B, 1, C, n)
    scores = scores.masked_fill(hidden, float("-inf")).to(acc)
    return (torch.softmax(scores, -1) @ values.to(acc)).to(q.dtype)


def dense_attention(q: Tensor, keys: Tensor, values: Tensor, *, rel: Tensor, u: Tensor, v: Tensor,
                    mem_len: int, chunk: int, start: Tensor | None = None) -> Tensor:
    """q (B, H, T, D_k) are the last T of keys (B, H, P + T, D_k), values (B, H, P + T, D_v);
    rel (H, mem_len + 1, D_k); u, v (H, D_k); start (B,) long: each row's first real key (left
    padding before it), or None. Returns (B, H, T, D_v)."""
    T, P = q.shape[2], keys.shape[2] - q.shape[2]
    rel_flip = rel.flip(1)  # (H, M + 1, D_k): index j <-> distance M - j
    outs = []
    for lo in range(0, T, chunk):
        args = (q[:, :, lo: lo + chunk], keys, values, rel_flip, u, v, P + lo, mem_len, start)
        if torch.is_grad_enabled():
            outs.append(checkpoint(_chunk, *args, use_reentrant=False))
        else:
            outs.append(_chunk(*args))
    return torch.cat(outs, 2)
