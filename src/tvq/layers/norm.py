"""RMS-style layer norm, as used throughout Transformer-VQ."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps), then an optional learnable gain and bias.

    The GAU input norm has gain and bias; the query/key norms have neither.
    Statistics are computed in at least float32.
    """

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.eps, self.weight, self.bias)


def rms_norm(x: Tensor, eps: float, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """:class:`RMSNorm` as a function (the decoder calls it on plain tensors). On CUDA, PyTorch's fused kernels
    (one forward, one backward: statistics in float32, output in x's dtype); elsewhere the same formula op by op."""
    if x.device.type == "cuda":
        h = torch.ops.aten._fused_rms_norm(x, list(x.shape[-1:]), None, eps)[0]
    else:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)).to(x.dtype)
    return h if weight is None else h * weight + bias
