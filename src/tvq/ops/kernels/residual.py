"""A residual branch's dropout, LayerDrop and residual add as one Triton kernel (forward and backward).

The sublayers end with ``x + layer_drop(nn.Dropout(p)(res), layerdrop, training)`` (res the branch's output
(B, T, D), bf16 under autocast; x the residual stream, float32 under autocast). Here that is one elementwise pass:
``out = x + res * mask * row_factor[b]`` with ``mask`` in {0, 1/(1-p)} (dropped with probability p) and
``row_factor[b]`` LayerDrop's in {0, 1/(1-layerdrop)} for the first dim's entry b. Sums in float32, the output in
``x + res``'s promoted dtype (float32 for float32 x, bf16 res).

Neither is stored: each program draws them with Triton's counter-based RNG (Philox) from an int ``seed`` and the
element's position, and backward draws them again from the same seed: ``d_res = grad * mask * row_factor[b]`` (one
kernel, written in res's dtype: no separate cast pass), ``d_x = grad`` (no kernel; cast to x's dtype only when it
differs). Nothing is saved for backward, and no launch draws LayerDrop's rows apart (two on the PyTorch path).

The random stream: element i (flat index within its row b, i.e. ``x[b].flatten()[i]``) is dropped iff
``(r >> 1) < round(p 2^31)`` where r is 32-bit lane ``i % 4`` of ``philox(seed, counter = b ceil(E / 4) + i // 4)``
(E = elements per row; when 4 divides E the counter is the flat index // 4): one Philox call (10 rounds) gives
four elements' draws, as in PyTorch's own dropout, since at one call per element the integer work would cost
more than the memory traffic on an H100/H200. Row b is dropped by LayerDrop iff lane 0 of
``philox(seed, counter = B ceil(E / 4) + b)`` (a counter past every element's) passes the same test with
``layerdrop``. The mask depends only on (seed, shape), not on ``layerdrop``.
``seed`` is drawn by :func:`draw_seed` with torch's default CPU generator (no device sync, reproducible under
``torch.manual_seed``); the stream differs from ``nn.Dropout``'s and LayerDrop's ``bernoulli_`` (which draw from
the device generator). ``p == 0`` (``layerdrop == 0``) compiles a variant without that draw (a constexpr);
``p == 1`` drops everything (out = x + 0 * res).

Bytes per element (rough, from the shapes, not measured: no GPU was at hand), res bf16, x and out float32.
Today, forward: ``native_dropout`` (read 2, write 2 + a 1-byte mask), LayerDrop's draw and scale (two launches), its mul (2 + 2), the add
(read 4 + 2, write 4): ~23 bytes, and the mask is saved until backward (1 byte per element per sublayer). Backward:
the add's gradient cast to bf16 for res (4 + 2), the mul (2 + 2), ``native_dropout_backward`` (read
2 + 1, write 2): ~19. Here: forward reads x and res and writes out (4 + 2 + 4 = 10), backward reads grad and writes
d_res (4 + 2 = 6; d_x is grad itself): ~16 against ~42 bytes per element, and no saved mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tvq.ops.kernels import kernel_op
from tvq.ops.kernels.common import cdiv

# Philox groups (4 elements each) per program: 4 BLOCK elements (tests may shrink it)
BLOCK = 512
NUM_WARPS = 4


@triton.jit
def _r31(r):
    """32-bit draws -> uniform int32 in [0, 2^31)."""
    return (r.to(tl.uint32, bitcast=True) >> 1).to(tl.int32)


@triton.jit
def dropout_scale(seed, cnt, lane, thresh, keep_scale):
    """The dropout mask of the stream (module docstring) at Philox counters cnt, lanes lane (shapes that
    broadcast): keep_scale where lane ``lane`` of ``philox(seed, cnt)`` passes the threshold, else 0 (float32).
    Shared with the other kernels that draw this stream (:mod:`tvq.ops.kernels.dropout_linear`)."""
    r0, r1, r2, r3 = tl.randint4x(seed, cnt)  # 4 independent 32-bit draws per counter
    r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return tl.where(_r31(r) >= thresh, keep_scale, 0.0)


@triton.jit
def dropout_scale4(seed, cnt, thresh, keep_scale):
    """The four lanes' multipliers (keep_scale or 0, float32, cnt's shape each) of the stream at Philox counters
    cnt: one Philox call for four elements (a kernel that lays them out its own way interleaves them)."""
    r0, r1, r2, r3 = tl.randint4x(seed, cnt)
    return (tl.where(_r31(r0) >= thresh, keep_scale, 0.0), tl.where(_r31(r1) >= thresh, keep_scale, 0.0),
            tl.where(_r31(r2) >= thresh, keep_scale, 0.0), tl.where(_r31(r3) >= thresh, keep_scale, 0.0))


@triton.jit
def row_scale(seed, cnt, thresh, scale):
    """LayerDrop's factor (scale or 0, float32) of the rows whose draws are lane 0 of Philox at counters cnt."""
    return tl.where(_r31(tl.randint(seed, cnt)) >= thresh, scale, 0.0)


@triton.jit
def _multiplier(seed, b, cnt, lane, n_cnt, thresh, keep_scale, ld_thresh, ld_scale,
                LAYERDROP: tl.constexpr, DROP: tl.constexpr):
    """(BG, 4) float32 multipliers of res for row b: mask (0 or keep_scale, from Philox at the groups' counters cnt)
    times LayerDrop's row factor (0 or ld_scale, from Philox at counter n_cnt + b, which no element uses)."""
    m = tl.full(lane.shape, 1.0, tl.float32) * keep_scale
    if DROP:
        m = m * dropout_scale(seed, cnt[:, None], lane, thresh, 1.0)  # (BG, 4)
    if LAYERDROP:
        m = m * row_scale(seed, tl.full((1,), 0, tl.int64) + n_cnt + b, ld_thresh, ld_scale)[:, None]  # (1,)
    return m


@triton.jit(do_not_specialize=["seed"])
def _fwd_kernel(x_ptr, res_ptr, out_ptr, seed, E, n_chunk, n_cnt, thresh, keep_scale, ld_thresh, ld_scale,
                LAYERDROP: tl.constexpr, DROP: tl.constexpr, BG: tl.constexpr):
    """out = x + res * multiplier for 4 BG elements of one row b (E elements per row)."""
    pid = tl.program_id(0).to(tl.int64)
    b, c = pid // n_chunk, pid % n_chunk
    g = c * BG + tl.arange(0, BG)  # (BG,) groups of 4 within the row
    lane = tl.arange(0, 4)[None, :]  # (1, 4)
    i = g[:, None] * 4 + lane  # (BG, 4) index within the row
    ok = i < E
    offs = b * E + i
    cnt = b * ((E + 3) // 4) + g  # the Philox counter of each group
    m = _multiplier(seed, b, cnt, lane, n_cnt, thresh, keep_scale, ld_thresh, ld_scale, LAYERDROP, DROP)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x + r * m).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["seed"])
def _bwd_kernel(g_ptr, gr_ptr, seed, E, n_chunk, n_cnt, thresh, keep_scale, ld_thresh, ld_scale,
                LAYERDROP: tl.constexpr, DROP: tl.constexpr, BG: tl.constexpr):
    """d_res = grad * multiplier (the forward's mask and row factor drawn again) for 4 BG elements of one row b."""
    pid = tl.program_id(0).to(tl.int64)
    b, c = pid // n_chunk, pid % n_chunk
    g = c * BG + tl.arange(0, BG)
    lane = tl.arange(0, 4)[None, :]
    i = g[:, None] * 4 + lane
    ok = i < E
    offs = b * E + i
    cnt = b * ((E + 3) // 4) + g
    m = _multiplier(seed, b, cnt, lane, n_cnt, thresh, keep_scale, ld_thresh, ld_scale, LAYERDROP, DROP)
    gr = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(gr_ptr + offs, (gr * m).to(gr_ptr.dtype.element_ty), mask=ok)


def _rows(t: Tensor) -> tuple[int, int]:
    """Rows (the first dim; 1 for a 0-d tensor) and elements per row."""
    B = t.shape[0] if t.dim() else 1
    return B, (t.numel() // B if B else 0)


def dropout_threshold(p: float, name: str) -> tuple[int, float, bool]:
    """For dropping with probability p: the threshold of the 31-bit draws, the kept ones' scale, whether to draw."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"residual_dropout: {name} must be in [0, 1], got {p}")
    draw = 0.0 < p < 1.0
    thresh = min(round(p * 2**31), 2**31 - 1) if draw else 0
    return thresh, 0.0 if p == 1.0 else 1.0 / (1.0 - p), draw


def _launch(t: Tensor, p: float, layerdrop: float) -> dict:
    """The kernels' grid and scalar arguments for rows of t (see :func:`_multiplier`)."""
    B, E = _rows(t)
    thresh, keep_scale, drop = dropout_threshold(p, "p")
    ld_thresh, ld_scale, ld_draw = dropout_threshold(layerdrop, "layerdrop")
    n_chunk = cdiv(E, 4 * BLOCK)
    return dict(grid=(B * n_chunk,), E=E, n_chunk=n_chunk, n_cnt=B * ((E + 3) // 4), thresh=thresh,
                keep_scale=keep_scale, ld_thresh=ld_thresh if ld_draw else 0, ld_scale=ld_scale,
                LAYERDROP=layerdrop > 0, DROP=drop)


@kernel_op("tvq_kernels::residual_dropout")
def residual_dropout_op(x: Tensor, res: Tensor, p: float, layerdrop: float, seed: int) -> Tensor:
    """x + res * mask * row_factor[b] in ``x + res``'s dtype (x, res the same shape; mask and row factors from
    ``seed``, see the module docstring)."""
    if x.shape != res.shape:
        raise ValueError(f"residual_dropout: x and res of one shape expected, got {tuple(x.shape)} and "
                         f"{tuple(res.shape)}")
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, res.dtype), device=x.device)
    if not out.numel():
        return out
    args = _launch(x, p, layerdrop)
    _fwd_kernel[args.pop("grid")](x.contiguous(), res.contiguous(), out, seed, **args, BG=BLOCK, num_warps=NUM_WARPS)
    return out


@residual_dropout_op.register_fake
def _(x, res, p, layerdrop, seed):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, res.dtype))


@kernel_op("tvq_kernels::residual_dropout_backward")
def residual_dropout_backward_op(grad: Tensor, p: float, layerdrop: float, seed: int, dtype: torch.dtype) -> Tensor:
    """d_res = grad * mask * row_factor[b] in ``dtype`` (res's), drawn as the forward drew them (same seed and
    shape)."""
    d_res = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    if not d_res.numel():
        return d_res
    args = _launch(grad, p, layerdrop)
    _bwd_kernel[args.pop("grid")](grad.contiguous(), d_res, seed, **args, BG=BLOCK, num_warps=NUM_WARPS)
    return d_res


@residual_dropout_backward_op.register_fake
def _(grad, p, layerdrop, seed, dtype):
    return grad.new_empty(grad.shape, dtype=dtype)


class _ResidualDropout(torch.autograd.Function):
    """out = x + res * mask * row_factor; d_x = grad, d_res by the backward kernel (mask and row factors drawn
    again). Saves nothing."""

    @staticmethod
    def forward(ctx, x, res, p, layerdrop, seed):
        ctx.p, ctx.layerdrop, ctx.seed, ctx.x_dtype, ctx.res_dtype = p, layerdrop, seed, x.dtype, res.dtype
        return residual_dropout_op(x, res, p, layerdrop, seed)

    @staticmethod
    def backward(ctx, grad):
        d_x = d_res = None
        if ctx.needs_input_grad[0]:
            d_x = grad.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            d_res = residual_dropout_backward_op(grad, ctx.p, ctx.layerdrop, ctx.seed, ctx.res_dtype)
        return d_x, d_res, None, None, None


@torch.compiler.disable
def draw_seed() -> int:
    """A fresh seed for :func:`residual_dropout`, in [0, 2^31 - 1), from torch's default CPU generator: no device
    sync, reproducible under ``torch.manual_seed``. Drawn outside any dispatch mode (real under FakeTensorMode and
    the cost model, whose fake tensors would have no value to read) and outside torch.compile's graph."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return int(torch.randint(2**31 - 1, (), dtype=torch.int64, device="cpu"))


def residual_dropout(x: Tensor, res: Tensor, p: float = 0.0, layerdrop: float = 0.0,
                     seed: int | None = None) -> Tensor:
    """``x + res * mask * row_factor[b]``: a residual branch's dropout (mask elementwise 0 with probability p, else
    1 / (1 - p)), LayerDrop (row b's factor 0 with probability ``layerdrop``, else 1 / (1 - layerdrop), for the
    first dim's entries) and the residual add as one kernel; backward one kernel too. Both drawn in the kernel.

    x and res of one shape (any), any of float32, float16, bfloat16; the output in ``x + res``'s promoted dtype,
    math in float32. ``seed`` (int) picks the mask and the row factors (the same seed and shape, the same draws; the
    mask does not depend on ``layerdrop``); None draws one with :func:`draw_seed` (when anything is random).
    Gradients reach x (grad itself) and res (grad * the same mask * row factor, in res's dtype). Needs Triton and a
    CUDA tensor (or ``TRITON_INTERPRET=1`` on a CPU): the caller checks :func:`tvq.ops.kernels.kernels_enabled`.
    """
    if x.shape != res.shape:
        raise ValueError(f"residual_dropout: x and res of one shape expected, got {tuple(x.shape)} and "
                         f"{tuple(res.shape)}")
    for name, value in (("p", p), ("layerdrop", layerdrop)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"residual_dropout: {name} must be in [0, 1], got {value}")
    if seed is None:
        seed = draw_seed() if 0.0 < p < 1.0 or 0.0 < layerdrop < 1.0 else 0
    return _ResidualDropout.apply(x, res, float(p), float(layerdrop), int(seed))
