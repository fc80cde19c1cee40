"""RMS-style layer norm, as used throughout Transformer-VQ."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tvq.ops.kernels import kernels_enabled


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

    def forward(self, x: Tensor, *, scale: float = 1.0, out_dtype: torch.dtype | None = None,
                residual: bool = False, split: int | None = None) -> Tensor | tuple[Tensor, ...]:
        return rms_norm(x, self.eps, self.weight, self.bias, scale=scale, out_dtype=out_dtype, residual=residual,
                        split=split)


def rms_norm(x: Tensor, eps: float, weight: Tensor | None = None, bias: Tensor | None = None, *, scale: float = 1.0,
             out_dtype: torch.dtype | None = None, residual: bool = False,
             split: int | None = None) -> Tensor | tuple[Tensor, ...]:
    """:class:`RMSNorm` as a function (the decoder calls it on plain tensors), times ``scale``, in ``out_dtype``
    (default: x's, promoted with the weight's). ``out_dtype`` lets a layer under autocast write its normalized input
    in the compute dtype once (the projections would cast it, each on its own), ``scale`` folds the multiply that
    follows the query and key norms. ``residual``: return (out, x), x for a pre-norm sublayer's residual add
    (x + f(out)): on the Triton path the norm's backward kernel adds that x's gradient to its own. ``split`` n:
    the result as its two parts along dim -2 (``out.split([n, G - n], -2)``, then x if ``residual``): a token's
    query and key heads normalized together; on the Triton path their gradients are never joined in memory.

    On the Triton path (:func:`tvq.ops.kernels.kernels_enabled`) one fused kernel each way
    (:mod:`tvq.ops.kernels.rms_norm`); elsewhere on CUDA PyTorch's fused norm kernels, then the affine; on a CPU the
    same formula op by op. Statistics in at least float32.
    """
    if out_dtype is None:
        out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    if kernels_enabled(x) and x.dim():
        from tvq.ops.kernels.rms_norm import MAX_D, rms_norm_kernel

        if x.shape[-1] <= MAX_D:  # longer rows would not fit on chip
            return rms_norm_kernel(x, eps, weight, bias, scale=scale, out_dtype=out_dtype, residual=residual,
                                   split=split)
    if x.device.type == "cuda":
        h = torch.ops.aten._fused_rms_norm(x, list(x.shape[-1:]), None, eps)[0]
    else:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)).to(x.dtype)
    h = h if weight is None else h * weight + bias
    h = (h if scale == 1.0 else h * scale).to(out_dtype)
    outs = h.split([split, h.shape[-2] - split], -2) if split else (h,)
    return (*outs, x) if residual else outs if split else h
