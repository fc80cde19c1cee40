"""Per-code counts and value sums as one Triton kernel (the kernel twin of :func:`tvq.ops.cache.code_statistics`).

Every key that leaves the window folds into the cache (:func:`tvq.ops.cache.advance_state`): per code, a count and
a value sum over the chunk's T leaving keys, and the EMA codebook sums its keys per code the same way. In PyTorch
that is a float32 copy of the values (a bf16 training step's values are 2 bytes wide: read 2, write 4), a zero
fill of the (S, D_v) sums and an ``index_add_`` reading the copy again: ~16 bytes per value element moved for a
result of S D_v. Here a program owns one (BS, BD) float32 tile of one row's sums and walks the row's keys in
chunks of BL, adding a one-hot (BS, BL) @ values (BL, BD) product (``tl.dot``, tensor cores on a GPU; exact: the
one-hot is 0 or 1 and the sum is float32): the values are read in their own dtype, the sums written once, no
atomics, no float32 copy. The S tiles of a row are the grid's fastest axis, so their programs read the same value
tiles from L2 (S / BS re-reads otherwise). The counts come from the same one-hot (the D_v tile 0 programs).

Gradient (only the sums have one): a valid key r gets g_sums[code[r]] (a gather, in PyTorch), an empty one zero.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from tvq.ops.kernels import register_flops
from tvq.ops.kernels.common import dot_options, tile


@triton.jit
def _sums_kernel(codes_ptr, valid_ptr, values_ptr, counts_ptr, sums_ptr, N, S, D, stride_vp, stride_vn,
                 HAS_VALID: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One (BS, BD) tile of row p's sums (and, for D tile 0, its BS counts) over the row's N keys."""
    pid = tl.program_id(0).to(tl.int64)
    n_s, n_d = tl.cdiv(S, BS), tl.cdiv(D, BD)
    ts, td, p = pid % n_s, (pid // n_s) % n_d, pid // (n_s * n_d)
    s = ts * BS + tl.arange(0, BS)  # (BS,)
    d = td * BD + tl.arange(0, BD)  # (BD,)
    s_ok, d_ok = s < S, d < D
    acc = tl.zeros((BS, BD), dtype=tl.float32)
    cnt = tl.zeros((BS,), dtype=tl.float32)
    for r0 in range(0, N, BL):
        r = r0 + tl.arange(0, BL)  # (BL,)
        keep = r < N
        if HAS_VALID:
            keep = keep & (tl.load(valid_ptr + p * N + r, mask=keep, other=0) != 0)
        code = tl.load(codes_ptr + p * N + r, mask=keep, other=-1)  # (BL,), -1: no code
        v = tl.load(values_ptr + p * stride_vp + r[:, None] * stride_vn + d[None, :],
                    mask=keep[:, None] & d_ok[None, :], other=0.0)  # (BL, BD)
        if UPCAST:
            v = v.to(tl.float32)
        hit = code[None, :] == s[:, None]  # (BS, BL)
        acc = tl.dot(tl.where(hit, 1.0, 0.0).to(v.dtype), v, acc, input_precision=PRECISION)
        cnt += tl.sum(tl.where(hit, 1.0, 0.0), 1)
    tl.store(sums_ptr + (p * S + s[:, None]) * D + d[None, :], acc, mask=s_ok[:, None] & d_ok[None, :])
    if td == 0:
        tl.store(counts_ptr + p * S + s, cnt, mask=s_ok)


@torch.library.custom_op("tvq_kernels::code_sums", mutates_args=())
def code_sums(codes: Tensor, values: Tensor, valid: Tensor | None, n_code: int) -> tuple[Tensor, Tensor]:
    """Counts (P, S) and value sums (P, S, D), float32, of the keys with codes (P, N) in [0, S) and values
    (P, N, D) (rows may be strided, the last dim dense), skipping those where ``valid`` (P, N) is False."""
    P, N = codes.shape
    D = values.shape[-1]
    if values.stride(-1) != 1:
        values = values.contiguous()
    counts = codes.new_empty(P, n_code, dtype=torch.float32)
    sums = values.new_empty(P, n_code, D, dtype=torch.float32)
    if not sums.numel() or not N:
        return counts.zero_(), sums.zero_()
    BS, BD, BL = tile(n_code, 64), tile(D, 64), tile(N, 32)
    grid = (triton.cdiv(n_code, BS) * triton.cdiv(D, BD) * P,)
    _sums_kernel[grid](codes.contiguous(), valid.contiguous() if valid is not None else codes, values, counts, sums,
                       N, n_code, D, values.stride(0), values.stride(1), HAS_VALID=valid is not None,
                       BS=BS, BD=BD, BL=BL, **dot_options(values.dtype))
    return counts, sums


@code_sums.register_fake
def _(codes, values, valid, n_code):
    P = codes.shape[0]
    return (codes.new_empty(P, n_code, dtype=torch.float32),
            values.new_empty(P, n_code, values.shape[-1], dtype=torch.float32))


@register_flops("tvq_kernels::code_sums")
def _(codes, values, valid, n_code):
    """The one-hot products: (S, N) @ (N, D) per row, in the values' dtype."""
    return str(values.dtype).removeprefix("torch."), 2 * codes.numel() * n_code * values.shape[-1]


class _CodeSums(torch.autograd.Function):
    """(counts, sums) by the kernel; the values' gradient gathers g_sums at each valid key's code."""

    @staticmethod
    def forward(ctx, codes, values, valid, n_code):
        counts, sums = code_sums(codes, values, valid, n_code)
        ctx.save_for_backward(codes, valid)
        ctx.values_dtype = values.dtype
        ctx.mark_non_differentiable(counts)
        return counts, sums

    @staticmethod
    def backward(ctx, _, g_sums):
        codes, valid = ctx.saved_tensors
        g = g_sums.gather(1, codes[..., None].expand(*codes.shape, g_sums.shape[-1]))  # (P, N, D)
        if valid is not None:
            g = torch.where(valid[..., None], g, 0.0)
        return None, g.to(ctx.values_dtype), None, None


def code_sums_kernel(codes: Tensor, values: Tensor, valid: Tensor | None, n_code: int) -> tuple[Tensor, Tensor]:
    """Per-code counts (..., S) and value sums (..., S, D), float32, of the keys with codes (..., N) and values
    (..., N, D); ``valid`` (bool, broadcastable to codes) False for keys to skip, None for all. The kernel twin of
    :func:`tvq.ops.cache.code_statistics` (in float32); gradients reach the values through the sums."""
    lead, N = codes.shape[:-1], codes.shape[-1]
    if values.shape[:-1] != codes.shape:
        raise ValueError(f"code_sums_kernel: codes (..., N) and values (..., N, D) expected, got "
                         f"{tuple(codes.shape)} and {tuple(values.shape)}")
    P = math.prod(lead)
    mask = None if valid is None else valid.expand(codes.shape).reshape(P, N)
    counts, sums = _CodeSums.apply(codes.reshape(P, N), values.reshape(P, N, values.shape[-1]), mask, n_code)
    return counts.view(*lead, n_code), sums.view(*lead, n_code, values.shape[-1])
