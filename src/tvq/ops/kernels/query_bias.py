"""Transformer-XL's query biases, ``q + s u`` and ``q + s v``, as one Triton kernel each way.

Every query of head h gets two per-head vectors added (docs/spec.md section 1): ``qu = q + s u_h`` scores the
content, ``qv = q + s v_h`` the positions, with s = D_k^-1/4 (u and v are float32 parameters; q is in the compute
dtype). In PyTorch that is a stack of u and v, its scale and cast, and two broadcast adds; backward the two adds'
sums over the rows (one each, for u and v), q's gradient as their sum, and the scale and cast again: eleven launches
per sublayer and step for two (H, D_k) vectors. Here:

* forward, one kernel: q read once, qu and qv written in q's dtype, each ``q + s u_h`` computed in float32 and
  rounded once;
* backward, one kernel and one sum: ``d_q = d_qu + d_qv`` written in q's dtype, and each program's float32 sums
  of its rows of ``d_qu`` and ``d_qv`` times s, which one ``sum`` over the programs of each head turns into u's
  and v's gradients (float32, in a fixed order: deterministic, no atomics).

The twin is the PyTorch path of :func:`tvq.ops.blockwise_attention` (``(u * s).to(q.dtype)`` added by autograd).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

ROWS = 64  # query rows per program at most (tests may shrink it)
ELEMENTS = 4096  # elements of a program's tile at most (rows = ELEMENTS / D_k): registers, not spills


@triton.jit
def _fwd_kernel(q_ptr, u_ptr, v_ptr, qu_ptr, qv_ptr, H, T, D, n_t, scale, sq_b, sq_h, sq_t,
                BT: tl.constexpr, BD: tl.constexpr):
    """Rows t0 .. t0 + BT - 1 of one (b, h): qu = q + scale u[h], qv = q + scale v[h] (outputs contiguous)."""
    pid = tl.program_id(0).to(tl.int64)  # one grid axis (CUDA caps the others at 65535), row tiles fastest
    pid_t, p = pid % n_t, pid // n_t
    b, h = p // H, p % H
    t = pid_t * BT + tl.arange(0, BT)  # (BT,)
    d = tl.arange(0, BD)  # (BD,)
    ok = (t < T)[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + b * sq_b + h * sq_h + t[:, None] * sq_t + d[None, :], mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + h * D + d, mask=d < D, other=0.0).to(tl.float32) * scale  # (BD,)
    v = tl.load(v_ptr + h * D + d, mask=d < D, other=0.0).to(tl.float32) * scale
    out = (p * T + t[:, None]) * D + d[None, :]
    tl.store(qu_ptr + out, (q + u[None, :]).to(qu_ptr.dtype.element_ty), mask=ok)
    tl.store(qv_ptr + out, (q + v[None, :]).to(qv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_kernel(gu_ptr, gv_ptr, gq_ptr, part_ptr, P, H, T, D, n_t, scale, su_b, su_h, su_t, sv_b, sv_h, sv_t,
                BT: tl.constexpr, BD: tl.constexpr):
    """Rows t0 .. t0 + BT - 1 of one (b, h): d_q = d_qu + d_qv, and this program's float32 sums over its rows of
    scale d_qu and scale d_qv, written to part[0, b, h, pid_t] and part[1, b, h, pid_t] (part (2, B, H, n_t, D),
    P = B H)."""
    pid = tl.program_id(0).to(tl.int64)
    pid_t, p = pid % n_t, pid // n_t
    b, h = p // H, p % H
    t = pid_t * BT + tl.arange(0, BT)
    d = tl.arange(0, BD)
    ok = (t < T)[:, None] & (d < D)[None, :]
    gu = tl.load(gu_ptr + b * su_b + h * su_h + t[:, None] * su_t + d[None, :], mask=ok, other=0.0).to(tl.float32)
    gv = tl.load(gv_ptr + b * sv_b + h * sv_h + t[:, None] * sv_t + d[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(gq_ptr + (p * T + t[:, None]) * D + d[None, :], (gu + gv).to(gq_ptr.dtype.element_ty), mask=ok)
    part = part_ptr + (p * n_t + pid_t) * D + d
    tl.store(part, tl.sum(gu, 0) * scale, mask=d < D)
    tl.store(part + P * n_t * D, tl.sum(gv, 0) * scale, mask=d < D)


def _tiles(T: int, D: int) -> tuple[int, int, int]:
    """(BT rows, BD columns, n_t row tiles) of a (T, D) head."""
    BD = triton.next_power_of_2(D)
    BT = max(1, min(ROWS, ELEMENTS // BD, triton.next_power_of_2(max(T, 1))))
    return BT, BD, triton.cdiv(T, BT)


def _strides(x: Tensor) -> tuple[Tensor, int, int, int]:
    """x (B, H, T, D) with a dense last dim, and its first three strides."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, x.stride(0), x.stride(1), x.stride(2)


@torch.library.custom_op("tvq_kernels::query_biases", mutates_args=())
def query_biases(q: Tensor, u: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(q + scale u[h], q + scale v[h]) for q (B, H, T, D) and u, v (H, D), in q's dtype (contiguous)."""
    B, H, T, D = q.shape
    qu = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    qv = torch.empty_like(qu)
    if qu.numel():
        q, sb, sh, st = _strides(q)
        BT, BD, n_t = _tiles(T, D)
        _fwd_kernel[(n_t * B * H,)](q, u.contiguous(), v.contiguous(), qu, qv, H, T, D, n_t, scale, sb, sh, st,
                                    BT=BT, BD=BD)
    return qu, qv


@query_biases.register_fake
def _(q, u, v, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape)


@torch.library.custom_op("tvq_kernels::query_biases_backward", mutates_args=())
def query_biases_backward(g_qu: Tensor, g_qv: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(d_q (B, H, T, D) in g_qu's dtype, the per-program float32 sums (2, B, H, n_t, D) of scale d_qu and
    scale d_qv) for the gradients g_qu, g_qv (B, H, T, D) of :func:`query_biases`' outputs."""
    B, H, T, D = g_qu.shape
    g_q = torch.empty(B, H, T, D, dtype=g_qu.dtype, device=g_qu.device)
    BT, BD, n_t = _tiles(T, D)
    parts = torch.empty(2, B, H, n_t, D, dtype=torch.float32, device=g_qu.device)  # every entry written
    if g_q.numel():
        g_qu, su_b, su_h, su_t = _strides(g_qu)
        g_qv, sv_b, sv_h, sv_t = _strides(g_qv)
        _bwd_kernel[(n_t * B * H,)](g_qu, g_qv, g_q, parts, B * H, H, T, D, n_t, scale, su_b, su_h, su_t, sv_b,
                                    sv_h, sv_t, BT=BT, BD=BD)
    return g_q, parts


@query_biases_backward.register_fake
def _(g_qu, g_qv, scale):
    B, H, T, D = g_qu.shape
    return g_qu.new_empty(g_qu.shape), g_qu.new_empty(2, B, H, _tiles(T, D)[2], D, dtype=torch.float32)


class _QueryBiases(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, u, v, scale):
        ctx.scale, ctx.u_dtype, ctx.v_dtype = scale, u.dtype, v.dtype
        return query_biases(q, u, v, scale)

    @staticmethod
    def backward(ctx, g_qu, g_qv):
        if g_qu is None:
            g_qu = torch.zeros_like(g_qv)
        if g_qv is None:
            g_qv = torch.zeros_like(g_qu)
        g_q, parts = query_biases_backward(g_qu, g_qv, ctx.scale)
        g_uv = parts.sum((1, 3))  # (2, H, D) float32: the programs' sums in a fixed order
        return g_q, g_uv[0].to(ctx.u_dtype), g_uv[1].to(ctx.v_dtype), None


def query_biases_kernel(q: Tensor, u: Tensor, v: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(q + scale u, q + scale v)`` per head: q (B, H, T, D_k) (any strides but a dense last dim), u and v (H, D_k)
    (any float dtype: the parameters), both results in q's dtype, computed in float32. Gradients reach q, u and v.
    The kernel twin of ``q + (u * scale).to(q.dtype)[:, None]``."""
    B, H, T, D = q.shape
    if u.shape != (H, D) or v.shape != (H, D):
        raise ValueError(f"query_biases_kernel: q (B, H, T, D) and u, v (H, D) expected, got {tuple(q.shape)}, "
                         f"{tuple(u.shape)} and {tuple(v.shape)}")
    return _QueryBiases.apply(q, u, v, float(scale))
