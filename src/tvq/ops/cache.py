"""The compressive cache: per code, a count and a mean value of the keys it stands for."""

from __future__ import annotations

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


def code_statistics(codes: Tensor, values: Tensor, weight: Tensor, n_code: int, dtype: torch.dtype):
    """Per-code counts (..., S) and value sums (..., S, D_v) of keys with codes (..., N).

    values (..., N, D_v); weight, broadcastable to codes, is 1 for keys to count and 0 for
    empty slots.
    """
    onehot = F.one_hot(codes, n_code).to(dtype) * weight.to(dtype)[..., None]  # (..., N, S)
    return onehot.sum(-2), onehot.transpose(-1, -2) @ values.to(dtype)


def cache_log_count(count: Tensor) -> Tensor:
    """log n_s, and -inf for codes with no cached key."""
    return torch.where(count > 0, count.clamp_min(1.0).log(), float("-inf"))
