"""Dropout of a constant table followed by a linear map, as one Triton GEMM each way: the relative position
embeddings ``rel = Dropout(sinusoids) @ W_r^T`` (the kernel twin of ``F.linear(F.dropout(x, p), weight)``).

The attention sublayer projects its (M + 1, D) sinusoid table, dropped out in training, to the relative embeddings
every step. In PyTorch that is two launches forward (the dropout, writing the dropped table and its mask, then the
GEMM) and one backward (the weight's gradient, reading the saved dropped table). Here the GEMM draws the mask in its
prologue, tile by tile, with the residual kernel's counter-based stream (:mod:`tvq.ops.kernels.residual`: element
(r, k) of row r keeps lane k % 4 of ``philox(seed, r ceil(D / 4) + k // 4)``), and backward's GEMM for the weight's
gradient draws it again from the same seed: one launch each way, no mask and no dropped table in memory. Programs
that share rows draw the same values (the stream depends only on the seed and the element). The table gets no
gradient (a buffer); products in its dtype, sums in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tvq.ops.kernels import kernel_op, register_flops
from tvq.ops.kernels.common import cdiv, dot_options, tile
from tvq.ops.kernels.residual import draw_seed, dropout_scale, dropout_threshold

TILES = {"rows": 64, "cols": 64, "inner": 32}  # largest tiles (tests shrink them to exercise several)


@triton.jit
def _dropped(x_ptr, seed, r, k, R, D, thresh, keep_scale):
    """x[r, k] (BR, BK) of a contiguous (R, D) table times its dropout mask, rounded to x's dtype (as a dropout
    output in that dtype)."""
    x = tl.load(x_ptr + r[:, None] * D + k[None, :], mask=(r < R)[:, None] & (k < D)[None, :], other=0.0)
    cnt = r[:, None] * ((D + 3) // 4) + k[None, :] // 4  # (BR, BK) the element's Philox counter
    return (x.to(tl.float32) * dropout_scale(seed, cnt, k[None, :] % 4, thresh, keep_scale)).to(x.dtype)


@triton.jit(do_not_specialize=["seed"])
def _fwd_kernel(x_ptr, w_ptr, out_ptr, seed, R, N, D, thresh, keep_scale, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """out[m, n] (BM, BN) = sum_k dropped x[m, k] w[n, k]: x (R, D), w (N, D), out (R, N), all contiguous."""
    m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)  # (BM,)
    n = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)  # (BN,)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + tl.arange(0, BK)  # (BK,)
        x = _dropped(x_ptr, seed, m, k, R, D, thresh, keep_scale)  # (BM, BK)
        w = tl.load(w_ptr + n[None, :] * D + k[:, None], mask=(k < D)[:, None] & (n < N)[None, :], other=0.0)
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)  # (BM, BN)
    tl.store(out_ptr + m[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(m < R)[:, None] & (n < N)[None, :])


@triton.jit(do_not_specialize=["seed"])
def _grad_weight_kernel(g_ptr, x_ptr, gw_ptr, seed, R, N, D, thresh, keep_scale, BN: tl.constexpr, BD: tl.constexpr,
                        BR: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """gw[n, d] (BN, BD) = sum_r g[r, n] dropped x[r, d]: g (R, N), x (R, D), gw (N, D), all contiguous; the mask
    drawn again from the forward's seed."""
    n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)  # (BN,)
    d = tl.program_id(1).to(tl.int64) * BD + tl.arange(0, BD)  # (BD,)
    acc = tl.zeros((BN, BD), dtype=tl.float32)
    for r0 in range(0, R, BR):
        r = r0 + tl.arange(0, BR)  # (BR,)
        gt = tl.load(g_ptr + r[None, :] * N + n[:, None], mask=(n < N)[:, None] & (r < R)[None, :], other=0.0)
        x = _dropped(x_ptr, seed, r, d, R, D, thresh, keep_scale)  # (BR, BD)
        if UPCAST:
            gt, x = gt.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(gt, x, acc, input_precision=PRECISION)  # (BN, BD)
    tl.store(gw_ptr + n[:, None] * D + d[None, :], acc.to(gw_ptr.dtype.element_ty),
             mask=(n < N)[:, None] & (d < D)[None, :])


@kernel_op("tvq_kernels::dropout_linear")
def dropout_linear(x: Tensor, weight: Tensor, p: float, seed: int) -> Tensor:
    """(R, N) in x's dtype: Dropout(x; p, seed) @ weight^T for x (R, D) and weight (N, D) (0 < p < 1)."""
    R, D = x.shape
    N = weight.shape[0]
    out = x.new_empty(R, N)
    if not out.numel():
        return out
    thresh, keep_scale, _ = dropout_threshold(p, "p")
    BM, BN, BK = tile(R, TILES["rows"]), tile(N, TILES["cols"]), tile(D, TILES["inner"])
    _fwd_kernel[(cdiv(R, BM), cdiv(N, BN))](x.contiguous(), weight.contiguous(), out, seed, R, N, D, thresh,
                                             keep_scale, BM=BM, BN=BN, BK=BK, **dot_options(x.dtype))
    return out


@dropout_linear.register_fake
def _(x, weight, p, seed):
    return x.new_empty(x.shape[0], weight.shape[0])


@kernel_op("tvq_kernels::dropout_linear_grad_weight")
def dropout_linear_grad_weight(grad: Tensor, x: Tensor, p: float, seed: int, dtype: torch.dtype) -> Tensor:
    """(N, D) in ``dtype``: grad^T @ Dropout(x; p, seed), the weight's gradient of :func:`dropout_linear` (grad
    (R, N) and x (R, D) in one dtype)."""
    R, D = x.shape
    N = grad.shape[1]
    gw = x.new_empty(N, D, dtype=dtype)
    if not gw.numel():
        return gw
    if not R:
        return gw.zero_()
    thresh, keep_scale, _ = dropout_threshold(p, "p")
    BN, BD, BR = tile(N, TILES["rows"]), tile(D, TILES["cols"]), tile(R, TILES["inner"])
    _grad_weight_kernel[(cdiv(N, BN), cdiv(D, BD))](grad.contiguous(), x.contiguous(), gw, seed, R, N, D, thresh,
                                                    keep_scale, BN=BN, BD=BD, BR=BR, **dot_options(x.dtype))
    return gw


@dropout_linear_grad_weight.register_fake
def _(grad, x, p, seed, dtype):
    return x.new_empty(grad.shape[1], x.shape[1], dtype=dtype)


@register_flops("tvq_kernels::dropout_linear")
def _(x, weight, p, seed):
    """(R, D) @ (D, N), in x's dtype."""
    return str(x.dtype).removeprefix("torch."), 2 * x.numel() * weight.shape[0]


@register_flops("tvq_kernels::dropout_linear_grad_weight")
def _(grad, x, p, seed, dtype):
    """(N, R) @ (R, D), in x's dtype."""
    return str(x.dtype).removeprefix("torch."), 2 * x.numel() * grad.shape[1]


class _DropoutLinear(torch.autograd.Function):
    """out = Dropout(x) @ weight^T; the gradient of ``master`` (weight itself, or the tensor weight was cast from) by
    the backward kernel in master's dtype (mask drawn again), none for x or a cast weight."""

    @staticmethod
    def forward(ctx, x, weight, master, p, seed):
        ctx.save_for_backward(x)
        ctx.p, ctx.seed, ctx.w_dtype = p, seed, master.dtype
        return dropout_linear(x, weight, p, seed)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        g_w = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g_w = dropout_linear_grad_weight(grad.to(x.dtype), x, ctx.p, ctx.seed, ctx.w_dtype)
        g_weight, g_master = (g_w, None) if ctx.needs_input_grad[1] else (None, g_w)  # master is weight, or its source
        return None, g_weight, g_master, None, None


def dropout_linear_kernel(x: Tensor, weight: Tensor, p: float, seed: int | None = None,
                          master: Tensor | None = None) -> Tensor:
    """``F.linear(F.dropout(x, p), weight)`` in one launch each way, for a constant x (R, D) (no gradient: a table)
    and weight (N, D) in x's dtype; 0 < p < 1. The mask is the residual kernel's stream from ``seed`` (None: one
    drawn by :func:`tvq.ops.kernels.residual.draw_seed`), another stream than ``F.dropout``'s. Gradients reach the
    weight, or with ``master`` (N, D) (weight a cast of it, without gradient: :func:`tvq.ops.linear.cast_weights`)
    master, written in its dtype by the backward kernel."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or x.dtype != weight.dtype:
        raise ValueError(f"dropout_linear_kernel: x (R, D) and weight (N, D) of one dtype expected, got "
                         f"{tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}")
    if master is not None and (master.shape != weight.shape or weight.requires_grad):
        raise ValueError(f"dropout_linear_kernel: master {tuple(master.shape)} must be of weight's shape "
                         f"{tuple(weight.shape)}, and weight (its cast) without gradient")
    if x.requires_grad:
        raise ValueError("dropout_linear_kernel: x gets no gradient (a constant table); detach it")
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout_linear_kernel: p must be in (0, 1), got {p}")
    master = weight if master is None else master
    return _DropoutLinear.apply(x, weight, master, float(p), draw_seed() if seed is None else int(seed))
