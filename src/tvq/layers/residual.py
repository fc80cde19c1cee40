"""The residual branch's dropout, LayerDrop and add (shared by the attention and MLP sublayers), and the add joined
with the next sublayer's pre-norm (:func:`add_residual_norm`)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from tvq.layers.norm import RMSNorm
from tvq.ops.kernels import graph_capturing, kernels_enabled


def layer_drop(res: Tensor, p: float, training: bool) -> Tensor:
    """res (B, T, D) with each sequence's branch dropped with probability p and the kept ones scaled by
    1 / (1 - p), in training; unchanged otherwise."""
    if not training or p == 0:
        return res
    keep = torch.empty(res.shape[0], 1, 1, device=res.device).bernoulli_(1 - p)  # (B, 1, 1) float32 0 or 1
    return res * keep.to(res.dtype) / (1 - p)


def _kernel_ok(x: Tensor, random: bool) -> bool:
    """Whether the residual kernels run for x: the Triton path, not inside ``torch.compile`` (whose graph the
    host-drawn seed would break; inductor fuses these ops itself) and, when anything is random, not while a CUDA
    graph is captured (every replay would reuse the captured seed, so one dropout mask; PyTorch's own dropout draws
    anew on each replay)."""
    return kernels_enabled(x) and not torch.compiler.is_compiling() and not (random and graph_capturing(x))


def add_residual(x: Tensor, res: Tensor, dropout: float, layerdrop: float, training: bool) -> Tensor:
    """x + LayerDrop(Dropout(res)) (both only in training): x (B, T, D) the residual stream, res (B, T, D) the
    branch. On the Triton path (:func:`tvq.ops.kernels.kernels_enabled`) one kernel each way, its dropout mask and
    LayerDrop's rows drawn in the kernel from a seed (:mod:`tvq.ops.kernels.residual`: the same distributions as
    ``F.dropout`` and :func:`layer_drop`, another random stream); elsewhere op by op (:func:`_kernel_ok`)."""
    random = training and (dropout > 0 or layerdrop > 0)
    if _kernel_ok(x, random):
        from tvq.ops.kernels.residual import residual_dropout

        if not training:
            return residual_dropout(x, res)
        return residual_dropout(x, res, dropout, layerdrop)
    return x + layer_drop(F.dropout(res, dropout, training), layerdrop, training)


def add_residual_norm(x: Tensor, res: Tensor, dropout: float, layerdrop: float, training: bool, norm: RMSNorm,
                      out_dtype: torch.dtype | None, kernel: bool = True) -> tuple[Tensor, Tensor]:
    """(y, h): y = :func:`add_residual` (the residual stream after this sublayer) and h = ``norm(y, out_dtype=...,
    residual=True)`` (the next pre-norm sublayer's normalized input), with y the view that norm returns (both of
    y's gradients joined in the norm's backward). On the Triton path (where :func:`add_residual` takes its kernel,
    ``kernel`` is True and the row fits the norm's kernel) one kernel each way for both
    (:mod:`tvq.ops.kernels.residual_norm`: the dropout's draws another layout of the residual kernel's stream)."""
    random = training and (dropout > 0 or layerdrop > 0)
    if kernel and x.dim() == 3 and x.shape == res.shape and _kernel_ok(x, random):
        from tvq.ops.kernels.residual_norm import residual_norm_kernel
        from tvq.ops.kernels.rms_norm import MAX_D

        if x.shape[-1] <= MAX_D:
            p, ld = (dropout, layerdrop) if training else (0.0, 0.0)
            return residual_norm_kernel(x, res, norm.weight, norm.bias, norm.eps, p, ld, out_dtype=out_dtype)
    h, y = norm(add_residual(x, res, dropout, layerdrop, training), out_dtype=out_dtype, residual=True)
    return y, h
