"""The compressive cache: per code, a count and a mean value of the keys it stands for."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F


def merge_cache(count: Tensor, mean: Tensor, add_count: Tensor, add_sum: Tensor) -> tuple[Tensor, Tensor]:
    """Fold ``add_count`` keys whose values sum to ``add_sum`` into (count, mean).

    count (..., S), mean (..., S, D_v), add_count (..., S), add_sum (..., S, D_v), broadcastable.
    The mean is updated as mean + (sum - n * mean) / (count + n), which stays accurate in float32
    when count is large; a code with no keys keeps a mean that is never read (its score is -inf).
    """
    new_count = count + add_count
    new_mean = mean + (add_sum - add_count[..., None] * mean) / new_count.clamp_min(1.0)[..., None]
    return new_count, new_mean


def code_statistics(codes: Tensor, values: Tensor, valid: Tensor, n_code: int, dtype: torch.dtype):
    """Per-code counts (..., S) and value sums (..., S, D_v) of keys with codes (..., N).

    values (..., N, D_v); valid (bool, broadcastable to codes) is False for empty slots.
    One scatter-add (O(N D_v)) instead of a one-hot matmul (O(N S D_v)); empty slots go to a
    spare bucket that is dropped.
    """
    lead, S = codes.shape[:-1], n_code
    groups = math.prod(lead)
    offset = torch.arange(groups, device=codes.device).view(*lead, 1) * S
    idx = torch.where(valid, codes + offset, groups * S).flatten()  # (G N,), spare bucket G S
    counts = torch.zeros(groups * S + 1, dtype=dtype, device=codes.device)
    counts.index_add_(0, idx, torch.ones(idx.shape, dtype=dtype, device=codes.device))
    sums = torch.zeros(groups * S + 1, values.shape[-1], dtype=dtype, device=codes.device)
    sums.index_add_(0, idx, values.to(dtype).flatten(0, -2))  # in place: no copy of the zeros
    return counts[:-1].view(*lead, S), sums[:-1].view(*lead, S, values.shape[-1])


def exclusive_prefix_sum(x: Tensor, dim: int, initial: Tensor | None = None) -> Tensor:
    """out[n] = initial + sum_{m < n} x[m] along ``dim``, without a loop and without copying ``x``.

    ``initial`` (broadcastable to one slice of ``x``, default 0) is where the sum starts. Within
    groups of g ~ sqrt(n) entries a strictly lower triangular matmul (BLAS speed, unlike
    ``cumsum`` along a leading dimension on CPU), across groups a cumsum of the group totals: about
    four passes over ``x`` for any n.
    """
    dim %= x.dim()
    n = x.shape[dim]
    g = 1 << max(0, round(math.log2(max(n, 1)) / 2))  # n = 64 -> 8, n = 256 -> 16
    n_groups = -(-n // g)
    flat = x.reshape(math.prod(x.shape[:dim]), n, -1)  # (P, n, R): a view of contiguous x
    if n_groups * g != n:
        flat = F.pad(flat, (0, 0, 0, n_groups * g - n))
    flat = flat.view(flat.shape[0], n_groups, g, -1)  # (P, G, g, R)
    tri = torch.ones(g, g, dtype=x.dtype, device=x.device).tril(-1)  # strictly lower: exclusive
    out = tri @ flat  # (P, G, g, R)
    carry = None  # (P, G, R): what comes before each group
    if n_groups > 1:
        carry = F.pad(flat.sum(2).cumsum(1)[:, :-1], (0, 0, 1, 0))
    if initial is not None:
        start = initial.expand(*x.shape[:dim], *x.shape[dim + 1:]).reshape(flat.shape[0], 1, -1)  # (P, 1, R)
        carry = start if carry is None else carry + start
    if carry is not None:
        out += carry[:, :, None]  # in place: the matmul does not need its output for backward
    return out.view(out.shape[0], n_groups * g, -1)[:, :n].reshape(x.shape)


def cache_log_count(count: Tensor) -> Tensor:
    """log n_s, and -inf for codes with no cached key."""
    return torch.where(count > 0, count.clamp_min(1.0).log(), float("-inf"))
