"""One sublayer's residual add and the next sublayer's RMSNorm as one Triton kernel each way: the twin of
:func:`tvq.layers.residual.add_residual` followed by :func:`tvq.layers.norm.rms_norm` (``residual=True``).

Between two pre-norm sublayers the residual stream is written by the first (``y = x + res * mask * row_factor``,
:mod:`tvq.ops.kernels.residual`) and read straight back by the second's norm (``h = y / rms(y) * weight + bias``,
:mod:`tvq.ops.kernels.rms_norm`). Here one program owns whole rows of D (as the norm's), adds the branch, writes y
and, from the same registers, h: one launch instead of two and no read of y (4 bytes per element under autocast).
Backward is one persistent launch too (as the norm's): with g_h the gradient of h and g_y the gradient y gets from
its other uses (the next residual add), ``dy = g_y + (dh - h mean(dh h)) / rms`` (dh = g_h weight) is x's gradient
and ``dy * mask * row_factor`` res's, both written by the program that computes dy (the norm's backward wrote dy
and the residual's backward read it back), and the norm's parameter gradients as per-program partial sums that the
launch's last programs add up (:func:`tvq.ops.kernels.common.tree_sum`, as the norm's).

The dropout mask and LayerDrop's row factors are drawn from a seed with the residual kernel's Philox stream, laid
out by rows here: element (r, d) of row r (of N = B T rows of D) keeps lane d % 4 of ``philox(seed, r ceil(D / 4) +
d // 4)`` (:func:`tvq.ops.kernels.residual.dropout_scale4`: one call for four elements, interleaved), and batch
entry b's factor is lane 0 of ``philox(seed, N ceil(D / 4) + b)``. The distributions are the residual kernel's,
the draws are not (another layout of the same stream): backward draws them again from the same seed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tvq.ops.kernels import kernel_op, register_launches
from tvq.ops.kernels.common import cdiv, tree_args, tree_sum
from tvq.ops.kernels.residual import draw_seed, dropout_scale4, dropout_threshold, row_scale
from tvq.ops.kernels.rms_norm import MAX_D, TILES, _programs, _tile, param_scratch


@triton.jit
def _multiplier(seed, r, T, NG, n_cnt, thresh, keep_scale, ld_thresh, ld_scale, LAYERDROP: tl.constexpr,
                DROP: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """(BR, BD) float32 multipliers of res for rows r (BR,): the dropout mask (0 or keep_scale) times LayerDrop's
    factor of each row's batch entry r // T (0 or ld_scale)."""
    m = tl.full((BR, BD), 1.0, tl.float32) * keep_scale
    if DROP:
        cnt = r[:, None] * NG + tl.arange(0, BD // 4)[None, :]  # (BR, BD / 4) Philox counters, four columns each
        k0, k1, k2, k3 = dropout_scale4(seed, cnt, thresh, 1.0)
        m = m * tl.interleave(tl.interleave(k0, k2), tl.interleave(k1, k3))  # column 4 g + j from lane j
    if LAYERDROP:
        m = m * row_scale(seed, n_cnt + r // T, ld_thresh, ld_scale)[:, None]
    return m


@triton.jit(do_not_specialize=["seed"])
def _fwd_kernel(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, h_ptr, seed, N, D, T, NG, n_cnt, thresh, keep_scale, ld_thresh,
                ld_scale, eps, AFFINE: tl.constexpr, LAYERDROP: tl.constexpr, DROP: tl.constexpr,
                BR: tl.constexpr, BD: tl.constexpr):
    """Rows (BR, D): y = x + res * multiplier, h = y (as stored) / rms * weight + bias; float32 inside."""
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BR + tl.arange(0, BR)  # (BR,)
    d = tl.arange(0, BD)
    d_ok = d < D
    ok = (r < N)[:, None] & d_ok[None, :]
    offs = r[:, None] * D + d[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = _multiplier(seed, r, T, NG, n_cnt, thresh, keep_scale, ld_thresh, ld_scale, LAYERDROP, DROP, BR, BD)
    y = (x + res * m).to(y_ptr.dtype.element_ty)  # the stream as stored: what an unfused norm would read
    tl.store(y_ptr + offs, y, mask=ok)
    y = y.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(y * y, axis=1) / D + eps)  # (BR,)
    if AFFINE:
        w = tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        h = y * rstd[:, None] * w[None, :] + b[None, :]
    else:
        h = y * rstd[:, None]
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["seed"])
def _bwd_kernel(y_ptr, w_ptr, gh_ptr, gy_ptr, dx_ptr, dres_ptr, part_ptr, tree_ptr, dwb_ptr, ticket_ptr, seed, N, D,
                T, NG, n_cnt, thresh, keep_scale, ld_thresh, ld_scale, eps, n_tiles, TG, AFFINE: tl.constexpr,
                HAS_GH: tl.constexpr, HAS_GY: tl.constexpr, X_GRAD: tl.constexpr, RES_GRAD: tl.constexpr,
                PARAM_GRAD: tl.constexpr, LAYERDROP: tl.constexpr, DROP: tl.constexpr, BR: tl.constexpr,
                BD: tl.constexpr, BG: tl.constexpr):
    """Row tiles pid, pid + n_prog, ...: dy = g_y + the norm's input gradient (statistics recomputed from y) to dx,
    dy * multiplier to d_res; with PARAM_GRAD this program's float32 sums of g_h h and g_h to part[0, pid] and
    part[1, pid], added up into dwb (2, D) by the launch's last programs (:func:`tvq.ops.kernels.common.tree_sum`)."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    d = tl.arange(0, BD)
    d_ok = d < D
    if AFFINE:
        w = tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    else:
        w = tl.full((BD,), 1.0, tl.float32)
    dw = tl.zeros((BD,), dtype=tl.float32)
    db = tl.zeros((BD,), dtype=tl.float32)
    for t in range(pid, n_tiles, n_prog):
        r = (t * BR + tl.arange(0, BR)).to(tl.int64)  # (BR,)
        ok = (r < N)[:, None] & d_ok[None, :]
        offs = r[:, None] * D + d[None, :]
        dy = tl.zeros((BR, BD), dtype=tl.float32)
        if HAS_GH:
            y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(gh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(y * y, axis=1) / D + eps)  # (BR,)
            h = y * rstd[:, None]
            if PARAM_GRAD:
                dw += tl.sum(g * h, axis=0)
                db += tl.sum(g, axis=0)
            dh = g * w[None, :]
            dy = (dh - h * (tl.sum(dh * h, axis=1) / D)[:, None]) * rstd[:, None]
        if HAS_GY:
            dy += tl.load(gy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if X_GRAD:
            tl.store(dx_ptr + offs, dy.to(dx_ptr.dtype.element_ty), mask=ok)
        if RES_GRAD:
            m = _multiplier(seed, r, T, NG, n_cnt, thresh, keep_scale, ld_thresh, ld_scale, LAYERDROP, DROP, BR, BD)
            tl.store(dres_ptr + offs, (dy * m).to(dres_ptr.dtype.element_ty), mask=ok)
    if PARAM_GRAD:
        tl.store(part_ptr + pid.to(tl.int64) * D + d, dw, mask=d_ok)
        tl.store(part_ptr + (n_prog + pid).to(tl.int64) * D + d, db, mask=d_ok)
        tree_sum(part_ptr, tree_ptr, dwb_ptr, ticket_ptr, pid, n_prog, D, TG, BD, BG)


def _stream_args(y: Tensor, p: float, layerdrop: float) -> dict:
    """The random stream's scalar arguments for y (B, T, D) (see :func:`_multiplier`)."""
    D = y.shape[-1]
    N = y.numel() // D
    thresh, keep_scale, drop = dropout_threshold(p, "p")
    ld_thresh, ld_scale, ld_draw = dropout_threshold(layerdrop, "layerdrop")
    NG = cdiv(D, 4)
    return dict(T=max(N // max(y.shape[0], 1), 1), NG=NG, n_cnt=N * NG, thresh=thresh, keep_scale=keep_scale,
                ld_thresh=ld_thresh if ld_draw else 0, ld_scale=ld_scale, LAYERDROP=layerdrop > 0, DROP=drop)


@kernel_op("tvq_kernels::residual_norm")
def residual_norm(x: Tensor, res: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, p: float,
                  layerdrop: float, seed: int, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(y, h): y = x + res * mask * row_factor (B, T, D) in ``x + res``'s dtype and h = rms_norm(y) * weight + bias
    in ``out_dtype``, contiguous (x, res (B, T, D) of one shape; weight and bias (D,) or None)."""
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, res.dtype), device=x.device)
    h = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if not y.numel():
        return y, h
    D = x.shape[-1]
    N = x.numel() // D
    BR, BD, warps = _tile(N, D)
    BD = max(BD, 4)  # four columns per Philox call
    affine = weight is not None
    _fwd_kernel[(cdiv(N, BR),)](x.contiguous(), res.contiguous(), weight if affine else y, bias if affine else y, y, h,
                                seed, N, D, eps=eps, AFFINE=affine, BR=BR, BD=BD, num_warps=warps,
                                **_stream_args(y, p, layerdrop))
    return y, h


@residual_norm.register_fake
def _(x, res, weight, bias, eps, p, layerdrop, seed, out_dtype):
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, res.dtype)),
            x.new_empty(x.shape, dtype=out_dtype))


@kernel_op("tvq_kernels::residual_norm_backward")
def residual_norm_backward(y: Tensor, weight: Tensor | None, g_h: Tensor | None, g_y: Tensor | None, eps: float,
                           p: float, layerdrop: float, seed: int, x_dtype: torch.dtype, res_dtype: torch.dtype,
                           x_grad: bool, res_grad: bool, param_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`residual_norm` given g_h (h's, or None: zeros) and g_y (y's other gradient, or None):
    dx (y's shape, ``x_dtype``; (0,) unless ``x_grad``), d_res (``res_dtype``; (0,) unless ``res_grad``) and the
    weight's and bias's as one (2, D) float32 ((0,) unless ``param_grad``, which needs the weight and g_h)."""
    D = y.shape[-1]
    N = y.numel() // D if D else 0
    dx = y.new_empty(y.shape if x_grad else (0,), dtype=x_dtype)
    d_res = y.new_empty(y.shape if res_grad else (0,), dtype=res_dtype)
    param_grad = param_grad and g_h is not None
    if N == 0 or not (x_grad or res_grad or param_grad):
        return dx, d_res, y.new_zeros((2, D) if param_grad else (0,), dtype=torch.float32)
    BR, BD, warps = _tile(N, D)
    BD = max(BD, 4)
    n_tiles = cdiv(N, BR)
    n_prog = _programs(y.device, n_tiles)
    tree = tree_args(n_prog, D, BD, TILES["elements"], y, param_grad)  # out: the weight's and the bias's
    affine = weight is not None
    _bwd_kernel[(n_prog,)](y.contiguous(), weight if affine else y, g_h.contiguous() if g_h is not None else y,
                           g_y.contiguous() if g_y is not None else y, dx if x_grad else y, d_res if res_grad else y,
                           tree["part"], tree["tree"], tree["out"], tree["ticket"], seed, N, D, eps=eps,
                           n_tiles=n_tiles, TG=tree["G"], AFFINE=affine, HAS_GH=g_h is not None, HAS_GY=g_y is not None,
                           X_GRAD=x_grad,
                           RES_GRAD=res_grad, PARAM_GRAD=param_grad, BR=BR, BD=BD, BG=tree["BG"], num_warps=warps,
                           **_stream_args(y, p, layerdrop))
    return dx, d_res, tree["out"]


@residual_norm_backward.register_fake
def _(y, weight, g_h, g_y, eps, p, layerdrop, seed, x_dtype, res_dtype, x_grad, res_grad, param_grad):
    return (y.new_empty(y.shape if x_grad else (0,), dtype=x_dtype),
            y.new_empty(y.shape if res_grad else (0,), dtype=res_dtype),
            y.new_empty((2, y.shape[-1]) if param_grad and g_h is not None else (0,), dtype=torch.float32))


@register_launches("tvq_kernels::residual_norm_backward")
def _(y, weight, g_h, g_y, eps, p, layerdrop, seed, x_dtype, res_dtype, x_grad, res_grad, param_grad):
    """One launch; scratch with the parameters' gradients: the partial sums and their tree (as the norm's)."""
    return 1, param_scratch(y) if param_grad and g_h is not None else 0


class _ResidualNorm(torch.autograd.Function):
    """(y, h) of :func:`residual_norm`; saves y and the weight (backward recomputes the statistics and the mask)."""

    @staticmethod
    def forward(ctx, x, res, weight, bias, eps, p, layerdrop, seed, out_dtype):
        y, h = residual_norm(x, res, weight, bias, eps, p, layerdrop, seed, out_dtype)
        ctx.save_for_backward(y, weight)
        ctx.eps, ctx.p, ctx.layerdrop, ctx.seed = eps, p, layerdrop, seed
        ctx.dtypes = x.dtype, res.dtype, bias.dtype if bias is not None else None
        ctx.set_materialize_grads(False)
        return y, h

    @staticmethod
    def backward(ctx, g_y, g_h):
        y, weight = ctx.saved_tensors
        need_x, need_res, need_w, need_b = ctx.needs_input_grad[:4]
        x_dtype, res_dtype, bias_dtype = ctx.dtypes
        dx, d_res, dwb = residual_norm_backward(y, weight, g_h, g_y, ctx.eps, ctx.p, ctx.layerdrop, ctx.seed,
                                                x_dtype, res_dtype, need_x, need_res, need_w or need_b)
        if (need_w or need_b) and g_h is None:
            dwb = y.new_zeros(2, y.shape[-1], dtype=torch.float32)
        return (dx if need_x else None, d_res if need_res else None, dwb[0].to(weight.dtype) if need_w else None,
                dwb[1].to(bias_dtype) if need_b else None, None, None, None, None, None)


def residual_norm_kernel(x: Tensor, res: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                         p: float = 0.0, layerdrop: float = 0.0, seed: int | None = None,
                         out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``y = x + LayerDrop(Dropout(res))`` and ``h = rms_norm(y) * weight + bias`` (in ``out_dtype``, default y's
    promoted with the weight's) in one launch each way: x, res (B, T, D) of one shape (any float dtypes: y in their
    promoted dtype), weight and bias (D,) both or None, D at most :data:`tvq.ops.kernels.rms_norm.MAX_D`. ``seed``
    picks the mask and LayerDrop's rows (None: drawn by :func:`tvq.ops.kernels.residual.draw_seed` when anything is
    random). Gradients reach x, res, weight and bias."""
    if x.shape != res.shape or x.dim() != 3:
        raise ValueError(f"residual_norm_kernel: x and res (B, T, D) of one shape expected, got {tuple(x.shape)} "
                         f"and {tuple(res.shape)}")
    D = x.shape[-1]
    if (weight is None) != (bias is None) or (weight is not None and (weight.shape != (D,) or bias.shape != (D,))):
        raise ValueError(f"residual_norm_kernel: weight and bias ({D},) both or neither expected")
    if D > MAX_D:
        raise ValueError(f"residual_norm_kernel: rows of at most {MAX_D} elements, got {D}")
    for name, value in (("p", p), ("layerdrop", layerdrop)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"residual_norm_kernel: {name} must be in [0, 1], got {value}")
    if seed is None:
        seed = draw_seed() if 0.0 < p < 1.0 or 0.0 < layerdrop < 1.0 else 0
    y_dtype = torch.promote_types(x.dtype, res.dtype)
    if out_dtype is None:
        out_dtype = y_dtype if weight is None else torch.promote_types(y_dtype, weight.dtype)
    return _ResidualNorm.apply(x, res, weight, bias, float(eps), float(p), float(layerdrop), int(seed), out_dtype)
