"""A residual branch's dropout, LayerDrop and residual add as one Triton kernel (forward and backward).

The sublayers end with ``x + layer_drop(nn.Dropout(p)(res), layerdrop, training)`` (res the branch's output
(B, T, D), bf16 under autocast; x the residual stream, float32 under autocast). Here that is one elementwise pass:
``out = x + res * mask * row_scale[b]`` with ``mask`` in {0, 1/(1-p)} (dropped with probability p) and
``row_scale[b]`` LayerDrop's keep_b / (1 - layerdrop) for the first dim's entry b (:func:`layer_drop_scale`; None
when no LayerDrop). Sums in float32, the output in ``x + res``'s promoted dtype (float32 for float32 x, bf16 res).

The mask is never stored: each program draws it with Triton's counter-based RNG (Philox, ``tl.randint4x``) from an
int ``seed`` and the element's position, and backward draws the same mask again from the same seed: ``d_res =
grad * mask * row_scale[b]`` (one kernel, written in res's dtype: no separate cast pass), ``d_x = grad`` (no
kernel; cast to x's dtype only when it differs). Nothing is saved for backward but ``row_scale`` (B floats).

The random stream: element i (flat index within its row b, i.e. ``x[b].flatten()[i]``) is dropped iff
``(r >> 1) < round(p 2^31)`` where r is 32-bit lane ``i % 4`` of ``philox(seed, counter = b ceil(E / 4) + i // 4)``
(E = elements per row; when 4 divides E the counter is the flat index // 4): one Philox call (10 rounds) gives
four elements' draws, as in PyTorch's own dropout, since at one call per element the integer work would cost
more than the memory traffic on an H100/H200. The mask depends only on (seed, shape), not on row_scale.
``seed`` is drawn by :func:`draw_seed` with torch's default CPU generator (no device sync, reproducible under
``torch.manual_seed``); the stream differs from ``nn.Dropout``'s (which draws from the device generator).
``p == 0`` compiles a variant without the RNG (a constexpr); ``p == 1`` drops everything (out = x + 0 * res).

Bytes per element (rough, from the shapes, not measured: no GPU was at hand), res bf16, x and out float32.
Today, forward: ``native_dropout`` (read 2, write 2 + a 1-byte mask), LayerDrop's mul and div (2 + 2 each), the add
(read 4 + 2, write 4): ~23 bytes, and the mask is saved until backward (1 byte per element per sublayer). Backward:
the add's gradient cast to bf16 for res (4 + 2), the div and mul (2 + 2 each), ``native_dropout_backward`` (read
2 + 1, write 2): ~19. Here: forward reads x and res and writes out (4 + 2 + 4 = 10), backward reads grad and writes
d_res (4 + 2 = 6; d_x is grad itself): ~16 against ~42 bytes per element, and no saved mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Philox groups (4 elements each) per program: 4 BLOCK elements (tests may shrink it)
BLOCK = 512
NUM_WARPS = 4


@triton.jit
def _multiplier(scale_ptr, seed, b, cnt, lane, thresh, keep_scale,
                ROW_SCALE: tl.constexpr, DROP: tl.constexpr):
    """(BG, 4) float32 multipliers of res: mask * row_scale[b] (mask 0 or keep_scale, from Philox)."""
    m = tl.full(lane.shape, 1.0, tl.float32) * keep_scale
    if DROP:
        r0, r1, r2, r3 = tl.randint4x(seed, cnt)  # (BG,) each: 4 independent 32-bit draws per counter
        r = tl.where(lane == 0, r0[:, None], tl.where(lane == 1, r1[:, None],
                     tl.where(lane == 2, r2[:, None], r3[:, None])))  # (BG, 4)
        r31 = (r.to(tl.uint32, bitcast=True) >> 1).to(tl.int32)  # uniform in [0, 2^31)
        m = tl.where(r31 >= thresh, m, 0.0)
    if ROW_SCALE:
        m = m * tl.load(scale_ptr + b).to(tl.float32)
    return m


@triton.jit(do_not_specialize=["seed"])
def _fwd_kernel(x_ptr, res_ptr, scale_ptr, out_ptr, seed, E, n_chunk, thresh, keep_scale,
                ROW_SCALE: tl.constexpr, DROP: tl.constexpr, BG: tl.constexpr):
    """out = x + res * multiplier for 4 BG elements of one row b (E elements per row)."""
    pid = tl.program_id(0).to(tl.int64)
    b, c = pid // n_chunk, pid % n_chunk
    g = c * BG + tl.arange(0, BG)  # (BG,) groups of 4 within the row
    lane = tl.arange(0, 4)[None, :]  # (1, 4)
    i = g[:, None] * 4 + lane  # (BG, 4) index within the row
    ok = i < E
    offs = b * E + i
    cnt = b * ((E + 3) // 4) + g  # the Philox counter of each group
    m = _multiplier(scale_ptr, seed, b, cnt, lane, thresh, keep_scale, ROW_SCALE, DROP)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x + r * m).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["seed"])
def _bwd_kernel(g_ptr, scale_ptr, gr_ptr, seed, E, n_chunk, thresh, keep_scale,
                ROW_SCALE: tl.constexpr, DROP: tl.constexpr, BG: tl.constexpr):
    """d_res = grad * multiplier (the forward's mask drawn again) for 4 BG elements of one row b."""
    pid = tl.program_id(0).to(tl.int64)
    b, c = pid // n_chunk, pid % n_chunk
    g = c * BG + tl.arange(0, BG)
    lane = tl.arange(0, 4)[None, :]
    i = g[:, None] * 4 + lane
    ok = i < E
    offs = b * E + i
    cnt = b * ((E + 3) // 4) + g
    m = _multiplier(scale_ptr, seed, b, cnt, lane, thresh, keep_scale, ROW_SCALE, DROP)
    gr = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(gr_ptr + offs, (gr * m).to(gr_ptr.dtype.element_ty), mask=ok)


def _rows(t: Tensor) -> tuple[int, int]:
    """Rows (the first dim; 1 for a 0-d tensor) and elements per row."""
    B = t.shape[0] if t.dim() else 1
    return B, (t.numel() // B if B else 0)


def _launch_args(p: float, E: int) -> tuple[int, float, bool, int]:
    """Threshold of the 31-bit draws, the kept elements' scale, whether to draw at all, chunks per row."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"residual_dropout: p must be in [0, 1], got {p}")
    drop = 0.0 < p < 1.0
    thresh = min(round(p * 2**31), 2**31 - 1) if drop else 0
    keep_scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    return thresh, keep_scale, drop, triton.cdiv(E, 4 * BLOCK)


def _scale_arg(row_scale: Tensor | None, B: int, like: Tensor) -> Tensor:
    if row_scale is None:
        return like  # never read (ROW_SCALE off)
    if row_scale.shape != (B,):
        raise ValueError(f"residual_dropout: row_scale ({B},) expected, got {tuple(row_scale.shape)}")
    return row_scale.contiguous()


@torch.library.custom_op("tvq_kernels::residual_dropout", mutates_args=())
def residual_dropout_op(x: Tensor, res: Tensor, row_scale: Tensor | None, p: float, seed: int) -> Tensor:
    """x + res * mask * row_scale[b] in ``x + res``'s dtype (x, res the same shape; mask from ``seed``, see the
    module docstring; row_scale (x.shape[0],) or None)."""
    if x.shape != res.shape:
        raise ValueError(f"residual_dropout: x and res of one shape expected, got {tuple(x.shape)} and "
                         f"{tuple(res.shape)}")
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, res.dtype), device=x.device)
    if not out.numel():
        return out
    B, E = _rows(x)
    thresh, keep_scale, drop, n_chunk = _launch_args(p, E)
    _fwd_kernel[(B * n_chunk,)](x.contiguous(), res.contiguous(), _scale_arg(row_scale, B, out), out, seed, E,
                                n_chunk, thresh, keep_scale, ROW_SCALE=row_scale is not None, DROP=drop,
                                BG=BLOCK, num_warps=NUM_WARPS)
    return out


@residual_dropout_op.register_fake
def _(x, res, row_scale, p, seed):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, res.dtype))


@torch.library.custom_op("tvq_kernels::residual_dropout_backward", mutates_args=())
def residual_dropout_backward_op(grad: Tensor, row_scale: Tensor | None, p: float, seed: int,
                                 dtype: torch.dtype) -> Tensor:
    """d_res = grad * mask * row_scale[b] in ``dtype`` (res's), the mask the forward's (same seed and shape)."""
    d_res = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    if not d_res.numel():
        return d_res
    B, E = _rows(grad)
    thresh, keep_scale, drop, n_chunk = _launch_args(p, E)
    _bwd_kernel[(B * n_chunk,)](grad.contiguous(), _scale_arg(row_scale, B, d_res), d_res, seed, E, n_chunk,
                                thresh, keep_scale, ROW_SCALE=row_scale is not None, DROP=drop, BG=BLOCK,
                                num_warps=NUM_WARPS)
    return d_res


@residual_dropout_backward_op.register_fake
def _(grad, row_scale, p, seed, dtype):
    return grad.new_empty(grad.shape, dtype=dtype)


class _ResidualDropout(torch.autograd.Function):
    """out = x + res * mask * row_scale; d_x = grad, d_res by the backward kernel (the mask drawn again);
    row_scale gets no gradient. Saves row_scale only."""

    @staticmethod
    def forward(ctx, x, res, row_scale, p, seed):
        ctx.save_for_backward(row_scale)
        ctx.p, ctx.seed, ctx.x_dtype, ctx.res_dtype = p, seed, x.dtype, res.dtype
        return residual_dropout_op(x, res, row_scale, p, seed)

    @staticmethod
    def backward(ctx, grad):
        (row_scale,) = ctx.saved_tensors
        d_x = d_res = None
        if ctx.needs_input_grad[0]:
            d_x = grad.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            d_res = residual_dropout_backward_op(grad, row_scale, ctx.p, ctx.seed, ctx.res_dtype)
        return d_x, d_res, None, None, None


@torch.compiler.disable
def draw_seed() -> int:
    """A fresh seed for :func:`residual_dropout`, in [0, 2^31 - 1), from torch's default CPU generator: no device
    sync, reproducible under ``torch.manual_seed``. Drawn outside any dispatch mode (real under FakeTensorMode and
    the cost model, whose fake tensors would have no value to read) and outside torch.compile's graph."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return int(torch.randint(2**31 - 1, (), dtype=torch.int64, device="cpu"))


def layer_drop_scale(n: int, p: float, device: torch.device | str | None = None) -> Tensor | None:
    """LayerDrop's row_scale for :func:`residual_dropout`: (n,) float32 keep_b / (1 - p), keep_b ~ Bernoulli(1 - p),
    drawn on ``device`` as :func:`tvq.layers.residual.layer_drop` draws it (the same rows for the same generator
    state); None when p == 0. For training only (the caller checks)."""
    if p == 0:
        return None
    return torch.empty(n, device=device).bernoulli_(1 - p).div_(1 - p)  # two kernels: the draw, the scale


def residual_dropout(x: Tensor, res: Tensor, p: float = 0.0, row_scale: Tensor | None = None,
                     seed: int | None = None) -> Tensor:
    """``x + res * mask * row_scale[b]``: a residual branch's dropout (mask elementwise 0 with probability p, else
    1 / (1 - p)), LayerDrop (``row_scale`` (x.shape[0],) float32, keep_b / (1 - layerdrop) from
    :func:`layer_drop_scale`, or None) and the residual add as one kernel; backward one kernel too.

    x and res of one shape (any; the first dim is the one ``row_scale`` indexes), any of float32, float16,
    bfloat16; the output in ``x + res``'s promoted dtype, math in float32. ``seed`` (int) picks the mask (the same
    seed and shape, the same mask); None draws one with :func:`draw_seed` (when p > 0). Gradients reach x (grad
    itself) and res (grad * the same mask * row_scale, in res's dtype), not row_scale. Needs Triton and a CUDA
    tensor (or ``TRITON_INTERPRET=1`` on a CPU): the caller checks :func:`tvq.ops.kernels.kernels_enabled`.
    """
    if x.shape != res.shape:
        raise ValueError(f"residual_dropout: x and res of one shape expected, got {tuple(x.shape)} and "
                         f"{tuple(res.shape)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"residual_dropout: p must be in [0, 1], got {p}")
    if seed is None:
        seed = draw_seed() if 0.0 < p < 1.0 else 0
    if row_scale is not None:
        row_scale = row_scale.float()
    return _ResidualDropout.apply(x, res, row_scale, float(p), int(seed))
