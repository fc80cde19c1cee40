"""Transformer-XL's query biases and the positional scores, as one Triton kernel each way.

Every query of head h gets two per-head vectors added (docs/spec.md section 1): ``qu = q + s u_h`` scores the
content, ``qv = q + s v_h`` the positions, with s = D_k^-1/4 (u and v are float32 parameters; q is in the compute
dtype). ``qv`` is only ever read by the positional scores ``pos = qv @ rel_h^T`` (B, H, T, R), by distance (rel
(H, R, D_k), R = M + 1 relative embeddings), so the kernel computes them too. In PyTorch that is a stack of u and
v, its scale and cast, two broadcast adds and a batched GEMM; backward the adds' sums over the rows (one each, for u
and v), the GEMM's two gradients and q's gradient as a sum: fourteen launches per sublayer and step (eleven for
the biases, three for the GEMM). Here, three:

* forward, one kernel: q read once; qu, qv and pos written in q's dtype, each ``q + s u_h`` computed in float32 and
  rounded once, pos by ``tl.dot`` of the rounded qv (as the GEMM reads it) against rel in tiles of distances;
* backward, one kernel and one GEMM: ``d_q = d_qu + d_pos @ rel`` (the product accumulated in float32 on
  chip and added before one rounding: ``d_qv`` never reaches HBM), each program's float32 sums of its rows of
  ``d_qu`` and ``d_qv`` times s, which the launch's last program adds up into u's and v's gradients (float32, in a
  fixed order: deterministic; :func:`tvq.ops.kernels.common.last_program`), and rel's gradient ``d_pos^T @ qv``
  summed over all rows
  of a head: a reduction over B T rows that cuBLAS splits over the whole GPU, where a kernel owning a head's rows
  would run on a few SMs (enwik8: 9 tiles of distances for its one head).

The twin is the PyTorch path of :func:`tvq.ops.blockwise_attention` (``(u * s).to(q.dtype)`` added by autograd,
``(q + v) @ rel^T`` as a GEMM).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tvq.ops.kernels import kernel_op, register_flops
from tvq.ops.kernels.common import cdiv, dot_options, last_program, next_power_of_2, tickets, tile

ROWS = 64  # query rows per program at most (tests may shrink it)
ELEMENTS = 4096  # elements of a program's (rows, D_k) tile at most (rows = ELEMENTS / D_k): registers, not spills
DISTANCES = 64  # relative distances per product tile at most (tests may shrink it)
PARTS = 8  # the programs' partial sums the last program adds per step, at most (registers: 8 x BD float32)


@triton.jit
def _fwd_kernel(q_ptr, u_ptr, v_ptr, rel_ptr, qu_ptr, qv_ptr, pos_ptr, H, T, D, R, n_t, scale, sq_b, sq_h, sq_t,
                sr_h, sr_r, BT: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    """Rows t0 .. t0 + BT - 1 of one (b, h): qu = q + scale u[h], qv = q + scale v[h] and pos = qv @ rel[h]^T
    (outputs contiguous)."""
    pid = tl.program_id(0).to(tl.int64)  # one grid axis (CUDA caps the others at 65535), row tiles fastest
    pid_t, p = pid % n_t, pid // n_t
    b, h = p // H, p % H
    t = pid_t * BT + tl.arange(0, BT)  # (BT,)
    d = tl.arange(0, BD)  # (BD,)
    t_ok = t < T
    ok = t_ok[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + b * sq_b + h * sq_h + t[:, None] * sq_t + d[None, :], mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + h * D + d, mask=d < D, other=0.0).to(tl.float32) * scale  # (BD,)
    v = tl.load(v_ptr + h * D + d, mask=d < D, other=0.0).to(tl.float32) * scale
    out = (p * T + t[:, None]) * D + d[None, :]
    tl.store(qu_ptr + out, (q + u[None, :]).to(qu_ptr.dtype.element_ty), mask=ok)
    qv = (q + v[None, :]).to(qv_ptr.dtype.element_ty)  # (BT, BD), rounded: what the product reads
    tl.store(qv_ptr + out, qv, mask=ok)
    if UPCAST:
        qv = qv.to(tl.float32)
    for r0 in range(0, R, BR):
        r = r0 + tl.arange(0, BR)  # (BR,) distances
        rel = tl.load(rel_ptr + h * sr_h + r[None, :] * sr_r + d[:, None], mask=(r < R)[None, :] & (d < D)[:, None],
                      other=0.0)  # (BD, BR)
        if UPCAST:
            rel = rel.to(tl.float32)
        s = tl.dot(qv, rel, input_precision=PRECISION)  # (BT, BR) float32
        tl.store(pos_ptr + (p * T + t[:, None]) * R + r[None, :], s.to(pos_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & (r < R)[None, :])


@triton.jit
def _bwd_kernel(gu_ptr, gpos_ptr, rel_ptr, gq_ptr, part_ptr, guv_ptr, ticket_ptr, B, H, T, D, R, n_t, scale, su_b,
                su_h, su_t, sr_h, sr_r, BT: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Rows t0 .. t0 + BT - 1 of one (b, h): d_qv = d_pos @ rel[h] (float32, on chip), d_q = d_qu + d_qv, and this
    program's float32 sums over its rows of scale d_qu and scale d_qv, written to part[0, h, b n_t + pid_t] and
    part[1, h, b n_t + pid_t] (part (2, H, B n_t, D); d_pos contiguous (B, H, T, R)); the launch's last program then
    sums each (c, h)'s B n_t rows, BP at a time in a fixed order, into guv[c, h] (float32 (2, H, D))."""
    pid = tl.program_id(0).to(tl.int64)
    pid_t, p = pid % n_t, pid // n_t
    b, h = p // H, p % H
    t = pid_t * BT + tl.arange(0, BT)
    d = tl.arange(0, BD)
    t_ok = t < T
    ok = t_ok[:, None] & (d < D)[None, :]
    gu = tl.load(gu_ptr + b * su_b + h * su_h + t[:, None] * su_t + d[None, :], mask=ok, other=0.0).to(tl.float32)
    gv = tl.zeros((BT, BD), dtype=tl.float32)
    for r0 in range(0, R, BR):
        r = r0 + tl.arange(0, BR)
        gp = tl.load(gpos_ptr + (p * T + t[:, None]) * R + r[None, :], mask=t_ok[:, None] & (r < R)[None, :],
                     other=0.0)  # (BT, BR)
        rel = tl.load(rel_ptr + h * sr_h + r[:, None] * sr_r + d[None, :], mask=(r < R)[:, None] & (d < D)[None, :],
                      other=0.0)  # (BR, BD)
        if UPCAST:
            gp, rel = gp.to(tl.float32), rel.to(tl.float32)
        gv = tl.dot(gp, rel, gv, input_precision=PRECISION)
    tl.store(gq_ptr + (p * T + t[:, None]) * D + d[None, :], (gu + gv).to(gq_ptr.dtype.element_ty), mask=ok)
    n_rows = B * n_t  # partial sums per (c, h)
    part = part_ptr + (h * n_rows + b * n_t + pid_t) * D + d
    tl.store(part, tl.sum(gu, 0) * scale, mask=d < D)
    tl.store(part + H * n_rows * D, tl.sum(gv, 0) * scale, mask=d < D)
    if last_program(ticket_ptr, tl.num_programs(0)):
        for ch in range(0, 2 * H):  # (c, h) = divmod(ch, H)
            acc = tl.zeros((BP, BD), dtype=tl.float32)
            for i0 in range(0, n_rows, BP):
                i = i0 + tl.arange(0, BP)
                acc += tl.load(part_ptr + (ch * n_rows + i[:, None]) * D + d[None, :],
                               mask=(i < n_rows)[:, None] & (d < D)[None, :], other=0.0, cache_modifier=".cg")
            tl.store(guv_ptr + ch * D + d, tl.sum(acc, 0), mask=d < D)


def _tiles(T: int, D: int, R: int) -> tuple[int, int, int, int]:
    """(BT rows, BD columns, BR distances, n_t row tiles) of a (T, D) head with R distances (all at least 16:
    ``tl.dot``'s minimum)."""
    BD = tile(D, 2**30)
    BT = max(16, min(ROWS, ELEMENTS // BD, next_power_of_2(max(T, 1))))
    return BT, BD, tile(R, DISTANCES), cdiv(T, BT)


def _strides(x: Tensor) -> tuple[Tensor, int, int, int]:
    """x (B, H, T, D) with a dense last dim, and its first three strides."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, x.stride(0), x.stride(1), x.stride(2)


def _rel(rel: Tensor) -> tuple[Tensor, int, int]:
    """rel (H, R, D) with a dense last dim (an expanded head axis stays a view: stride 0), and its strides."""
    if rel.stride(-1) != 1:
        rel = rel.contiguous()
    return rel, rel.stride(0), rel.stride(1)


@kernel_op("tvq_kernels::query_biases")
def query_biases(q: Tensor, u: Tensor, v: Tensor, rel: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(qu, qv, pos): q + scale u[h] and q + scale v[h] (B, H, T, D) and qv @ rel[h]^T (B, H, T, R), all in q's dtype
    (contiguous), for q (B, H, T, D), u, v (H, D) and rel (H, R, D) in q's dtype."""
    B, H, T, D = q.shape
    R = rel.shape[1]
    qu = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    qv = torch.empty_like(qu)
    pos = torch.empty(B, H, T, R, dtype=q.dtype, device=q.device)
    if qu.numel():
        q, sb, sh, st = _strides(q)
        rel, sr_h, sr_r = _rel(rel)
        BT, BD, BR, n_t = _tiles(T, D, R)
        _fwd_kernel[(n_t * B * H,)](q, u.contiguous(), v.contiguous(), rel, qu, qv, pos, H, T, D, R, n_t, scale, sb,
                                    sh, st, sr_h, sr_r, BT=BT, BD=BD, BR=BR, **dot_options(q.dtype))
    return qu, qv, pos


@query_biases.register_fake
def _(q, u, v, rel, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(*q.shape[:3], rel.shape[1])


@register_flops("tvq_kernels::query_biases")
def _(q, u, v, rel, scale):
    """The positional scores' product: (T, D) @ (D, R) per (b, h), in q's dtype."""
    return str(q.dtype).removeprefix("torch."), 2 * q.numel() * rel.shape[1]


@kernel_op("tvq_kernels::query_biases_backward")
def query_biases_backward(g_qu: Tensor, g_pos: Tensor, rel: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(d_q (B, H, T, D) in g_qu's dtype, float32 (2, H, D): the sums over (b, t) of scale d_qu and scale d_qv, u's
    and v's gradients) for the gradients g_qu (B, H, T, D) and g_pos (B, H, T, R) of :func:`query_biases`' qu and pos
    (d_qv = g_pos @ rel[h]; g_pos and rel in g_qu's dtype)."""
    B, H, T, D = g_qu.shape
    R = rel.shape[1]
    g_q = torch.empty(B, H, T, D, dtype=g_qu.dtype, device=g_qu.device)
    g_uv = torch.empty(2, H, D, dtype=torch.float32, device=g_qu.device)
    if not g_q.numel():
        return g_q, g_uv.zero_()
    BT, BD, BR, n_t = _tiles(T, D, R)
    parts = torch.empty(2, H, B * n_t, D, dtype=torch.float32, device=g_qu.device)  # every entry written
    g_qu, su_b, su_h, su_t = _strides(g_qu)
    rel, sr_h, sr_r = _rel(rel)
    _bwd_kernel[(n_t * B * H,)](g_qu, g_pos.contiguous(), rel, g_q, parts, g_uv, tickets(g_qu.device), B, H, T, D, R,
                                n_t, scale, su_b, su_h, su_t, sr_h, sr_r, BT=BT, BD=BD, BR=BR,
                                BP=min(PARTS, next_power_of_2(B * n_t)), **dot_options(g_qu.dtype))
    return g_q, g_uv


@query_biases_backward.register_fake
def _(g_qu, g_pos, rel, scale):
    B, H, T, D = g_qu.shape
    return g_qu.new_empty(g_qu.shape), g_qu.new_empty(2, H, D, dtype=torch.float32)


@register_flops("tvq_kernels::query_biases_backward")
def _(g_qu, g_pos, rel, scale):
    """d_pos @ rel: (T, R) @ (R, D) per (b, h), in the gradients' dtype."""
    return str(g_qu.dtype).removeprefix("torch."), 2 * g_qu.numel() * rel.shape[1]


def relative_gradient(g_pos: Tensor, qv: Tensor) -> Tensor:
    """rel's gradient (H, R, D): sum over b and t of g_pos[b, h, t]^T qv[b, h, t] (g_pos (B, H, T, R), qv (B, H, T, D)),
    one batched GEMM over heads. With one row or one head as (H, R, B T) @ (H, B T, D) of views; else B and H do
    not merge and einsum lays them out."""
    B, H, T, R = g_pos.shape
    if B > 1 and H > 1:
        return torch.einsum("bhtr,bhtd->hrd", g_pos, qv)
    x = g_pos.transpose(0, 1).reshape(H, B * T, R)  # views
    y = qv.transpose(0, 1).reshape(H, B * T, qv.shape[-1])
    return torch.bmm(x.transpose(1, 2), y)


class _QueryBiases(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, u, v, rel, scale):
        qu, qv, pos = query_biases(q, u, v, rel, scale)
        ctx.save_for_backward(qv, rel)
        ctx.scale, ctx.u_dtype, ctx.v_dtype = scale, u.dtype, v.dtype
        ctx.mark_non_differentiable(qv)
        return qu, pos

    @staticmethod
    def backward(ctx, g_qu, g_pos):
        qv, rel = ctx.saved_tensors
        g_qu = torch.zeros_like(qv) if g_qu is None else g_qu
        g_pos = qv.new_zeros(*qv.shape[:3], rel.shape[1]) if g_pos is None else g_pos.to(qv.dtype)
        g_q, g_uv = query_biases_backward(g_qu, g_pos, rel, ctx.scale)  # g_uv (2, H, D) float32
        g_rel = relative_gradient(g_pos, qv) if ctx.needs_input_grad[3] else None
        return g_q, g_uv[0].to(ctx.u_dtype), g_uv[1].to(ctx.v_dtype), g_rel, None


def query_biases_kernel(q: Tensor, u: Tensor, v: Tensor, rel: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(q + scale u, (q + scale v) @ rel^T)`` per head: q (B, H, T, D_k) (any strides but a dense last dim), u and
    v (H, D_k) (any float dtype: the parameters), rel (H, R, D_k) (read in q's dtype; an expanded head axis is not
    copied) -> qu (B, H, T, D_k) and the positional scores pos (B, H, T, R), in q's dtype, the sums computed in
    float32. Gradients reach q, u, v and rel. The kernel twin of ``qu = q + (u * scale).to(q.dtype)[:, None]`` and
    ``pos = (q + (v * scale).to(q.dtype)[:, None]) @ rel.transpose(-1, -2)``."""
    B, H, T, D = q.shape
    if u.shape != (H, D) or v.shape != (H, D) or rel.dim() != 3 or rel.shape[0] != H or rel.shape[2] != D:
        raise ValueError(f"query_biases_kernel: q (B, H, T, D), u, v (H, D) and rel (H, R, D) expected, got "
                         f"{tuple(q.shape)}, {tuple(u.shape)}, {tuple(v.shape)} and {tuple(rel.shape)}")
    return _QueryBiases.apply(q, u, v, rel.to(q.dtype), float(scale))
