"""RMSNorm as fused Triton kernels (forward and backward): the kernel twin of :func:`tvq.layers.norm.rms_norm`,
with the output's dtype and a scale folded in.

``out = (x / sqrt(mean(x^2, -1) + eps) * weight + bias) * scale`` over rows of D = x.shape[-1] (weight and bias
(D,) both or neither), written once in ``out_dtype``. Why the two extras: under autocast the residual stream x is
float32 but the projections that read the norm's output run in bfloat16, so writing the normalized input directly
in the compute dtype saves autocast's cast (a float32 write and read and a bfloat16 write); ``scale`` folds the
D_k^-1/4 multiply that follows the query and key norms (which have no weight or bias). Inside the kernels every
number is float32 (x, weight, bias and the incoming gradient are cast on load), cast once on store.

* forward: a program owns a tile of BR rows, the whole row on chip (BD = next_power_of_2(D) columns, masked), so
  the row statistics need no second pass over HBM: BR = :data:`TILES` ["elements"] / BD rows (at least one:
  D 4096 is one row of 16 KiB float32 per program, D 64 is 64 rows). Weight and bias are read once per program,
  with ``scale`` folded into them (or, without them, into the row's 1 / rms).
* backward, ONE launch for dx: each program recomputes the statistics of its rows from x (nothing but x and the
  weight is saved: no output, no 1 / rms), with h = x / rms, g = grad scale, dh = g weight:
  ``dx = (dh - h mean(dh h)) / rms`` in x's dtype. The programs are persistent (2 per SM on a GPU, row tiles
  pid, pid + n_prog, ...), each summing ``g h`` and ``g`` over its rows in float32 registers, and write those
  partial sums once per program to a (2, n_prog, D) float32 buffer, which the launch itself reduces to the weight
  and bias gradients (cast to the parameters' dtypes) by a two-level tree of last programs
  (:func:`tvq.ops.kernels.common.tree_sum`): the last of each group of ~sqrt(n_prog) programs adds up its group's
  rows, the last of those the groups' (a few round trips to L2 each; one program reading all ~264 rows, 1.6 MB at D
  1536 on a 132-SM GPU, would take ~100). No second launch (a ``.sum`` would be one), no atomics on the gradients
  (deterministic: fixed order). Flags (constexpr) skip dx or the partial sums when that
  input does not need a gradient.

Inputs may be any (..., D) view whose rows are equally spaced with unit column stride (a slice of a fused
projection's output is read in place), or for x a (..., G, D) view of groups of G such rows with the groups equally
spaced (a token's query and key heads inside the projection's output); anything else is copied to contiguous first.
Outputs are contiguous.

Bytes per element (rough, from the shapes, not measured: no GPU was at hand), float32 x, bfloat16 compute, with
weight and bias (the GAU input norm): today (PyTorch's fused rms_norm in x's dtype, then ``* weight``,
``+ bias`` and autocast's cast) forward reads and writes ~4 + 4, 4 + 4, 4 + 4, 4 + 2 = 30 B, backward (the
cast's, the add's and mul's backward with their reductions, the fused norm's backward) ~35 B; here forward reads
x and writes out: 4 + 2 = 6 B, backward reads x and the bfloat16 gradient and writes dx: 4 + 2 + 4 = 10 B.
For the query/key norms (no affine) the fold of ``scale`` saves one read and write of the normalized tensor.

Rows up to :data:`MAX_D` (16384) elements; beyond that a row's float32 tiles in backward (x, grad, h, dh, and the
two (BD,) sums) no longer fit in one program's registers and spill: use the PyTorch path there.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from tvq.ops.kernels import kernel_op, register_launches
from tvq.ops.kernels.common import cdiv, next_power_of_2, tree_args, tree_sum

# elements of a program's row tile (rows = elements / BD, at least one) and the backward's persistent programs
# (0: 2 per SM on a GPU, 4 in the interpreter); tests shrink them
TILES = {"elements": 4096, "programs": 0}
MAX_D = 16384  # longest row the kernels take (the whole row is held on chip)


@triton.jit
def _x_rows(r, sx, G, sxg):
    """Offsets of x's rows r: G rows sxg apart in each group, groups sx apart (G = 1: rows sx apart)."""
    return (r // G) * sx + (r % G) * sxg


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, D, sx, G, sxg, eps, scale,
                AFFINE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """out rows (BR, D) = (x / rms(x) * weight + bias) * scale, float32 inside, cast on store."""
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BR + tl.arange(0, BR)  # (BR,) rows
    d = tl.arange(0, BD)  # (BD,) columns
    d_ok = d < D
    ok = (r < N)[:, None] & d_ok[None, :]
    x = tl.load(x_ptr + _x_rows(r, sx, G, sxg)[:, None] + d[None, :], mask=ok, other=0.0).to(tl.float32)  # (BR, BD)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)  # (BR,)
    if AFFINE:
        w = tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32) * scale
        b = tl.load(b_ptr + d, mask=d_ok, other=0.0).to(tl.float32) * scale
        y = x * rstd[:, None] * w[None, :] + b[None, :]
    else:
        y = x * (rstd * scale)[:, None]
    tl.store(out_ptr + r[:, None] * D + d[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_kernel(x_ptr, w_ptr, g_ptr, g2_ptr, add_ptr, dx_ptr, part_ptr, tree_ptr, dwb_ptr, ticket_ptr, N, D, sx, G, sxg,
                sg, sgg, GB, GG, sgb, s2, s2g, G1, sa, eps, scale, n_tiles, TG, AFFINE: tl.constexpr,
                X_GRAD: tl.constexpr, PARAM_GRAD: tl.constexpr, HAS_ADD: tl.constexpr, SPLIT: tl.constexpr,
                BR: tl.constexpr, BD: tl.constexpr, BG: tl.constexpr):
    """dx of row tiles pid, pid + n_prog, ... (statistics recomputed from x; with HAS_ADD plus the rows of
    ``add``, x's gradient from elsewhere); with PARAM_GRAD this program's float32 sums over its rows of g h
    (weight) and g (bias), g = grad scale, to part[0, pid] and part[1, pid], which the launch's last programs add up
    into dwb (2, D) (:func:`tvq.ops.kernels.common.tree_sum`, groups of TG programs). The gradient's row r is at
    (r // (GB GG)) sg + ((r // GG) % GB) sgb + (r % GG) sgg (:func:`_grad_rows`); with SPLIT, addressed as x's
    rows (groups of G), a group's first G1 rows come from g (groups sg apart, rows sgg) and the rest from g2
    (s2, s2g): the gradients of an output returned in two parts, never joined in memory."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    d = tl.arange(0, BD)  # (BD,)
    d_ok = d < D
    if AFFINE:
        w = tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32) * scale  # dh = grad * (weight scale)
    else:
        w = tl.zeros((BD,), dtype=tl.float32) + scale
    dw = tl.zeros((BD,), dtype=tl.float32)
    db = tl.zeros((BD,), dtype=tl.float32)
    for t in range(pid, n_tiles, n_prog):
        r = (t * BR + tl.arange(0, BR)).to(tl.int64)  # (BR,)
        ok = (r < N)[:, None] & d_ok[None, :]
        x = tl.load(x_ptr + _x_rows(r, sx, G, sxg)[:, None] + d[None, :], mask=ok, other=0.0).to(tl.float32)
        if SPLIT:
            grp, j = r // G, r % G
            first = (j < G1)[:, None]
            g = tl.load(g_ptr + (grp * sg + j * sgg)[:, None] + d[None, :], mask=ok & first, other=0.0)
            g2 = tl.load(g2_ptr + (grp * s2 + (j - G1) * s2g)[:, None] + d[None, :], mask=ok & ~first, other=0.0)
            g = g.to(tl.float32) + g2.to(tl.float32)
        else:
            g_rows = (r // (GB * GG)) * sg + ((r // GG) % GB) * sgb + (r % GG) * sgg  # (BR,)
            g = tl.load(g_ptr + g_rows[:, None] + d[None, :], mask=ok, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)  # (BR,)
        h = x * rstd[:, None]
        if PARAM_GRAD:
            dw += tl.sum(g * h, axis=0)
            db += tl.sum(g, axis=0)
        if X_GRAD:
            dh = g * w[None, :]
            c = tl.sum(dh * h, axis=1) / D  # (BR,) mean(dh h)
            dx = (dh - h * c[:, None]) * rstd[:, None]
            if HAS_ADD:
                dx += tl.load(add_ptr + r[:, None] * sa + d[None, :], mask=ok, other=0.0).to(tl.float32)
            tl.store(dx_ptr + r[:, None] * D + d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
    if PARAM_GRAD:
        tl.store(part_ptr + pid.to(tl.int64) * D + d, dw * scale, mask=d_ok)
        tl.store(part_ptr + (n_prog + pid).to(tl.int64) * D + d, db * scale, mask=d_ok)
        tree_sum(part_ptr, tree_ptr, dwb_ptr, ticket_ptr, pid, n_prog, D, TG, BD, BG)


def _rows(t: Tensor, D: int) -> Tensor:
    """t as (N, D) rows with unit column stride (a view where one exists, else a contiguous copy)."""
    t2 = t.reshape(-1, D)
    return t2 if t2.stride(1) == 1 or D == 1 else t2.contiguous()


def _x_rows_args(x: Tensor, D: int) -> tuple[Tensor, int, int, int]:
    """x's rows for the kernels: (rows, sx, G, sxg) with row r at (r // G) sx + (r % G) sxg. Evenly spaced rows
    are one group each (G 1); a (..., G, D) view of G rows per group, the groups evenly spaced (the joint query and
    key heads of a token inside a wider projection), is read in place; anything else is copied first."""
    if x.dim() >= 3 and x.stride(-1) == 1 and x.shape[-2] > 1:
        G = x.shape[-2]
        try:
            groups = x.view(-1, G, D)  # (N / G, G, D) without a copy, if the leading dims allow it
        except RuntimeError:
            groups = None
        if groups is not None and groups.shape[0] > 1 and groups.stride(0) != G * groups.stride(1):
            return groups, groups.stride(0), G, groups.stride(1)
    x2 = _rows(x, D)
    return x2, _row_stride(x2), 1, 0


def _group_args(t: Tensor, D: int) -> tuple[Tensor, int, int]:
    """t (..., n, D) as groups of n rows for the backward kernel's SPLIT mode: (t, group stride, row stride), read in
    place where the groups and rows are evenly spaced with a dense last dim, else a contiguous copy first."""
    n = t.shape[-2]
    if t.stride(-1) == 1:
        try:
            groups = t.view(-1, n, D)  # (N / n, n, D) without a copy, if the leading dims allow it
        except RuntimeError:
            groups = None
        if groups is not None:
            return groups, groups.stride(0), groups.stride(1)
    return t.contiguous(), n * D, D


def _grad_rows(grad: Tensor, D: int) -> tuple[Tensor, int, int, int, int, int]:
    """grad's rows for the backward kernel: (t, sg, sgg, GB, GG, sgb) with row r at
    (r // (GB GG)) sg + ((r // GG) % GB) sgb + (r % GG) sgg: evenly spaced rows (GB = GG = 1), or a (A, GB, GG, D)
    view with a dense last dim, read in place (the gradient of heads (B, T, H, D) that come from a (B, H, T, D)
    tensor transposed: its B and T do not merge), else a contiguous copy."""
    try:
        g2 = grad.view(-1, D)
    except RuntimeError:
        g2 = None
    if g2 is not None and (g2.stride(1) == 1 or D == 1):
        return g2, _row_stride(g2), 0, 1, 1, 0
    if grad.dim() >= 3 and grad.stride(-1) == 1:
        try:
            g4 = grad.view(-1, *grad.shape[-3:])  # (A, GB, GG, D): the dims before the last three merged
        except RuntimeError:
            g4 = None
        if g4 is not None:
            return g4, g4.stride(0), g4.stride(2), g4.shape[1], g4.shape[2], g4.stride(1)
    g2 = grad.reshape(-1, D).contiguous()
    return g2, _row_stride(g2), 0, 1, 1, 0


def _row_stride(t2: Tensor) -> int:
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def _tile(N: int, D: int) -> tuple[int, int, int]:
    """BR, BD and num_warps for rows of D."""
    BD = next_power_of_2(D)
    BR = max(1, min(TILES["elements"] // BD, next_power_of_2(max(N, 1))))
    elements = BR * BD
    return BR, BD, 4 if elements <= 2048 else 8 if elements <= 8192 else 16


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device, n_tiles: int) -> int:
    """The backward's persistent programs: TILES["programs"], else 2 per SM on a GPU, 4 in the interpreter."""
    most = TILES["programs"] or (2 * _sm_count(device.index or 0) if device.type == "cuda" else 4)
    return max(1, min(n_tiles, most))


@kernel_op("tvq_kernels::rms_norm")
def rms_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, scale: float,
             out_dtype: torch.dtype) -> Tensor:
    """(..., D) in ``out_dtype``, contiguous: (x / sqrt(mean(x^2, -1) + eps) * weight + bias) * scale, float32
    inside. x (..., D) any strides; weight and bias (D,) both or None."""
    D = x.shape[-1]
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if not out.numel():
        return out
    x2, sx, G, sxg = _x_rows_args(x, D)
    N = x.numel() // D
    BR, BD, warps = _tile(N, D)
    affine = weight is not None
    _fwd_kernel[(cdiv(N, BR),)](x2, weight if affine else x2, bias if affine else x2, out, N, D, sx, G, sxg,
                                       eps, scale, AFFINE=affine, BR=BR, BD=BD, num_warps=warps)
    return out


@rms_norm.register_fake
def _(x, weight, bias, eps, scale, out_dtype):
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


@kernel_op("tvq_kernels::rms_norm_backward")
def rms_norm_backward(grad: Tensor, x: Tensor, weight: Tensor | None, eps: float, scale: float, x_grad: bool,
                      param_grad: bool, grad_add: Tensor | None = None,
                      grad2: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`rms_norm` given ``grad`` (x's shape, any dtype and strides): dx (x's shape and dtype,
    contiguous; empty (0,) unless ``x_grad``; plus ``grad_add``, x's gradient from its other uses, if given), and
    the weight's and bias's as one (2, D) float32 (empty (0,) unless ``param_grad``, which needs the weight). With
    ``grad2`` the gradient comes in two parts along dim -2 (x (..., G, D): grad (..., G1, D), grad2 (..., G - G1, D)),
    each read in place."""
    D = x.shape[-1]
    dx = torch.empty(x.shape if x_grad else (0,), dtype=x.dtype, device=x.device)
    if not (x_grad or param_grad):
        return dx, x.new_empty(0, dtype=torch.float32)
    x2, sx, G, sxg = _x_rows_args(x, D)
    N = x.numel() // D if D else 0
    if N == 0 or D == 0:
        return dx, x.new_zeros((2, D) if param_grad else (0,), dtype=torch.float32)
    if grad2 is None:
        gs, g2s, sec = _grad_rows(grad, D), (x2, 0, 0), 0
    else:  # rows of x are groups of G = G1 + G2 (x's view), the gradient's the same groups in two tensors
        gs, g2s, sec = (*_group_args(grad, D), 1, 1, 0), _group_args(grad2, D), grad.shape[-2]
        if G != x.shape[-2]:
            x2, sx, G, sxg = x.reshape(-1, x.shape[-2], D), x.shape[-2] * D, x.shape[-2], D  # x contiguous
            x2 = x2.contiguous()
    a2 = _rows(grad_add, D) if grad_add is not None and x_grad else None
    BR, BD, warps = _tile(N, D)
    n_tiles = cdiv(N, BR)
    n_prog = _programs(x.device, n_tiles)
    tree = tree_args(n_prog, D, BD, TILES["elements"], x2, param_grad)  # out: the weight's and the bias's
    affine = weight is not None
    _bwd_kernel[(n_prog,)](x2, weight if affine else x2, gs[0], g2s[0], a2 if a2 is not None else x2,
                           dx if x_grad else x2, tree["part"], tree["tree"], tree["out"], tree["ticket"], N, D, sx, G,
                           sxg, *gs[1:], g2s[1], g2s[2], sec, _row_stride(a2) if a2 is not None else 0, eps,
                           scale, n_tiles, tree["G"], AFFINE=affine, X_GRAD=x_grad, PARAM_GRAD=param_grad,
                           HAS_ADD=a2 is not None, SPLIT=grad2 is not None, BR=BR, BD=BD, BG=tree["BG"],
                           num_warps=warps)
    return dx, tree["out"]


@rms_norm_backward.register_fake
def _(grad, x, weight, eps, scale, x_grad, param_grad, grad_add=None, grad2=None):
    return (torch.empty(x.shape if x_grad else (0,), dtype=x.dtype, device=x.device),
            x.new_empty((2, x.shape[-1]) if param_grad else (0,), dtype=torch.float32))


@register_launches("tvq_kernels::rms_norm_backward")
def _(grad, x, weight, eps, scale, x_grad, param_grad, grad_add=None, grad2=None):
    """One launch; scratch with the parameters' gradients: the (2, n_prog, D) float32 partial sums and the tree's
    (2, ~sqrt(n_prog), D), written and read once (n_prog as on a 132-SM GPU where there is none)."""
    return 1, param_scratch(x) if param_grad else 0


def param_scratch(x: Tensor) -> int:
    """Bytes of a persistent norm backward's partial sums and their tree for rows of x (:func:`tree_sum`)."""
    if not x.numel():
        return 0
    N, D = x.numel() // x.shape[-1], x.shape[-1]
    n_tiles = cdiv(N, _tile(N, D)[0])
    n_prog = max(1, min(n_tiles, TILES["programs"] or 2 * (_sm_count(0) if torch.cuda.is_available() else 132)))
    return 2 * (n_prog + math.isqrt(max(n_prog - 1, 0)) + 2) * D * 4


class _RMSNorm(torch.autograd.Function):
    """out = rms_norm(x, ...); saves x and the weight only (backward recomputes the statistics), one backward
    launch for every gradient that is needed. With ``residual`` it also returns x itself (a view) for the residual
    stream: backward adds that output's gradient to the norm's in the same launch. With ``split`` n, out is returned
    as its two parts along dim -2 (views: the first n rows of each group, the rest), whose gradients the backward
    kernel reads where they are (no join of the two)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, scale, out_dtype, residual, split):
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.scale, ctx.bias_dtype, ctx.split = eps, scale, bias.dtype if bias is not None else None, split
        out = rms_norm(x, weight, bias, eps, scale, out_dtype)
        outs = out.split([split, x.shape[-2] - split], -2) if split else (out,)
        return (*outs, x.view_as(x)) if residual else outs if split else out

    @staticmethod
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        n_out = 2 if ctx.split else 1
        grad, grad2 = grads[0], grads[1] if ctx.split else None
        grad_x = grads[n_out] if len(grads) > n_out else None
        dx, dwb = rms_norm_backward(grad, x, weight, ctx.eps, ctx.scale, need_x, need_w or need_b, grad_x, grad2)
        return (dx if need_x else None, dwb[0].to(weight.dtype) if need_w else None,
                dwb[1].to(ctx.bias_dtype) if need_b else None, None, None, None, None, None)


def rms_norm_kernel(x: Tensor, eps: float, weight: Tensor | None = None, bias: Tensor | None = None, *,
                    scale: float = 1.0, out_dtype: torch.dtype | None = None, residual: bool = False,
                    split: int | None = None) -> Tensor | tuple[Tensor, ...]:
    """(x / sqrt(mean(x^2, -1) + eps) * weight + bias) * scale, (..., D) in ``out_dtype`` (default x's): the
    Triton twin of :func:`tvq.layers.norm.rms_norm` (times ``scale``), every step in float32, the result cast once.

    x (..., D) any leading dims and strides, D at most :data:`MAX_D`; weight and bias (D,) both or neither.
    Gradients reach x (in its dtype), weight and bias (in theirs), only those that need one. ``residual``: return
    (out, x), x for the residual stream (x + f(out)), whose gradient the norm's backward kernel adds to its own
    (no separate add). ``split`` n (0 < n < x.shape[-2]): the result as its two parts along dim -2,
    ``out.split([n, G - n], -2)``, whose gradients backward reads in place (not joined by a ``cat``).
    """
    if x.dim() == 0:
        raise ValueError("rms_norm_kernel: x needs a last dim to normalize")
    D = x.shape[-1]
    if (weight is None) != (bias is None):
        raise ValueError("rms_norm_kernel: weight and bias must both be given or both be None")
    if weight is not None and (weight.shape != (D,) or bias.shape != (D,)):
        raise ValueError(f"rms_norm_kernel: weight and bias ({D},) expected, got {tuple(weight.shape)} and "
                         f"{tuple(bias.shape)}")
    if D > MAX_D:
        raise ValueError(f"rms_norm_kernel: rows of at most {MAX_D} elements, got {D}")
    if split is not None and not (x.dim() >= 2 and 0 < split < x.shape[-2]):
        raise ValueError(f"rms_norm_kernel: split must be in (0, {x.shape[-2] if x.dim() >= 2 else 0}), got {split}")
    return _RMSNorm.apply(x, weight, bias, float(eps), float(scale), out_dtype or x.dtype, residual, split or 0)
