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
    counts = counts.index_add(0, idx, torch.ones(idx.shape, dtype=dtype, device=codes.device))
    sums = torch.zeros(groups * S + 1, values.shape[-1], dtype=dtype, device=codes.device)
    sums = sums.index_add(0, idx, values.to(dtype).flatten(0, -2))
    return counts[:-1].view(*lead, S), sums[:-1].view(*lead, S, values.shape[-1])


def exclusive_prefix_sum(x: Tensor, dim: int, group: int = 32) -> Tensor:
    """out[n] = sum_{m < n} x[m] along ``dim``, without a loop.

    Within groups of ``group`` entries a triangular matmul (BLAS-fast, unlike ``cumsum`` along a
    leading dimension on CPU); across groups a cumsum of the group totals.
    """
    x = x.movedim(dim, 0)
    n, rest = x.shape[0], x.shape[1:]
    g = min(group, n)
    n_groups = -(-n // g)
    flat = F.pad(x.reshape(n, -1), (0, 0, 0, n_groups * g - n)).view(n_groups, g, -1)  # (G, g, N)
    tri = torch.ones(g, g, dtype=x.dtype, device=x.device).tril(-1)  # strictly lower: exclusive
    inner = tri @ flat  # (G, g, N)
    carry = F.pad(flat.sum(1).cumsum(0)[:-1], (0, 0, 1, 0))  # (G, N): totals of earlier groups
    out = (inner + carry[:, None]).view(n_groups * g, -1)[:n]
    return out.view(n, *rest).movedim(0, dim)


def cache_log_count(count: Tensor) -> Tensor:
    """log n_s, and -inf for codes with no cached key."""
    return torch.where(count > 0, count.clamp_min(1.0).log(), float("-inf"))
