"""The residual branch's dropout, LayerDrop and add (shared by the attention and MLP sublayers)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from tvq.ops.kernels import graph_capturing, kernels_enabled


def layer_drop(res: Tensor, p: float, training: bool) -> Tensor:
    """res (B, T, D) with each sequence's branch dropped with probability p and the kept ones scaled by
    1 / (1 - p), in training; unchanged otherwise."""
    if not training or p == 0:
        return res
    keep = torch.empty(res.shape[0], 1, 1, device=res.device).bernoulli_(1 - p)  # (B, 1, 1) float32 0 or 1
    return res * keep.to(res.dtype) / (1 - p)


def add_residual(x: Tensor, res: Tensor, dropout: float, layerdrop: float, training: bool) -> Tensor:
    """x + LayerDrop(Dropout(res)) (both only in training): x (B, T, D) the residual stream, res (B, T, D) the
    branch. On the Triton path (:func:`tvq.ops.kernels.kernels_enabled`) one kernel each way, its dropout mask and
    LayerDrop's rows drawn in the kernel from a seed (:mod:`tvq.ops.kernels.residual`: the same distributions as
    ``F.dropout`` and :func:`layer_drop`, another random stream); elsewhere op by op: inside ``torch.compile`` (whose
    graph the host-drawn seed would break; inductor fuses these ops itself) and, in training, while a CUDA graph is
    captured (every replay would reuse the captured seed, so one dropout mask; PyTorch's own dropout draws anew
    on each replay)."""
    random = training and (dropout > 0 or layerdrop > 0)
    if kernels_enabled(x) and not torch.compiler.is_compiling() and not (random and graph_capturing(x)):
        from tvq.ops.kernels.residual import residual_dropout

        if not training:
            return residual_dropout(x, res)
        return residual_dropout(x, res, dropout, layerdrop)
    return x + layer_drop(F.dropout(res, dropout, training), layerdrop, training)
