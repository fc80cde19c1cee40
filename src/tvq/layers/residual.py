"""LayerDrop on a residual branch (shared by the mha/mqa attention and MLP sublayers)."""

from __future__ import annotations

import torch
from torch import Tensor


def layer_drop(res: Tensor, p: float, training: bool) -> Tensor:
    """res (B, T, D) with each sequence's branch dropped with probability p and the kept ones scaled by
    1 / (1 - p), in training; unchanged otherwise."""
    if not training or p == 0:
        return res
    keep = torch.rand(res.shape[0], 1, 1, device=res.device) >= p  # (B, 1, 1)
    return res * keep.to(res.dtype) / (1 - p)
