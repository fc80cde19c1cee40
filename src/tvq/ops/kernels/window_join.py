"""The key list of a chunk, its carried window joined with the chunk's keys, values and codes, as one Triton kernel
(the kernel twin of :func:`tvq.ops.cache.join_window`).

Attention reads keys (B, H, M + T, D_k), values (B, H, M + T, D_v) and codes (B, H, M + T): the state's M window
slots, then the chunk's T. In PyTorch that is three ``torch.cat`` launches (each a copy, the state's part cast to the
chunk's dtype). Here one launch writes all three: a program owns a tile of BR key-list rows of one (b, h) and copies
their keys, values and codes, each row from the state (r < M) or the chunk (r >= M), the chunk read through its own
strides (the values are a transposed view of the projection's (B, T, H D_v) output). The bytes are the three copies'
own; a launch per sublayer is what goes (three become one). Backward is the ``cat``'s: slices of the gradients, no
kernel (the state's part cast back to its dtype where it differs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tvq.ops.kernels import kernel_op
from tvq.ops.kernels.common import cdiv, tile

BLOCK_ROWS = 16  # key-list rows per program (tests may shrink it)


@triton.jit
def _copy_rows(state_ptr, chunk_ptr, out_ptr, b, h, r, M, N, D, ss_b, ss_h, ss_t, sc_b, sc_h, sc_t,
               BD: tl.constexpr):
    """Rows r (BR,) of one (b, h) of a (B, H, N, D) output (contiguous): state[b, h, r] for r < M, else
    chunk[b, h, r - M], cast to the output's dtype; D in tiles of BD."""
    old = r < M
    new = (r >= M) & (r < N)
    src_old = state_ptr + b * ss_b + h * ss_h + r[:, None] * ss_t  # (BR, 1)
    src_new = chunk_ptr + b * sc_b + h * sc_h + (r - M)[:, None] * sc_t
    dst = out_ptr + ((b * tl.num_programs(1) + h) * N + r[:, None]) * D  # (BR, 1)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)[None, :]  # (1, BD)
        d_ok = d < D
        x = tl.load(src_old + d, mask=old[:, None] & d_ok, other=0.0).to(out_ptr.dtype.element_ty)
        y = tl.load(src_new + d, mask=new[:, None] & d_ok, other=0.0).to(out_ptr.dtype.element_ty)
        tl.store(dst + d, tl.where(old[:, None], x, y), mask=(r < N)[:, None] & d_ok)


@triton.jit
def _join_kernel(sk_ptr, k_ptr, sv_ptr, v_ptr, sc_ptr, c_ptr, keys_ptr, values_ptr, codes_ptr, M, N, Dk, Dv,
                 ssk_b, ssk_h, ssk_t, sk_b, sk_h, sk_t, ssv_b, ssv_h, ssv_t, sv_b, sv_h, sv_t,
                 ssc_b, ssc_h, sc_b, sc_h, BR: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Keys, values and codes of BR key-list rows of (b, h) = (program_id(2), program_id(1)); grid (row tiles, H,
    B)."""
    b, h = tl.program_id(2).to(tl.int64), tl.program_id(1).to(tl.int64)
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # (BR,) key-list rows
    _copy_rows(sk_ptr, k_ptr, keys_ptr, b, h, r, M, N, Dk, ssk_b, ssk_h, ssk_t, sk_b, sk_h, sk_t, BK)
    _copy_rows(sv_ptr, v_ptr, values_ptr, b, h, r, M, N, Dv, ssv_b, ssv_h, ssv_t, sv_b, sv_h, sv_t, BV)
    old, new = r < M, (r >= M) & (r < N)
    x = tl.load(sc_ptr + b * ssc_b + h * ssc_h + r, mask=old, other=0)
    y = tl.load(c_ptr + b * sc_b + h * sc_h + (r - M), mask=new, other=0)
    tl.store(codes_ptr + (b * tl.num_programs(1) + h) * N + r, tl.where(old, x, y), mask=r < N)


def _dense_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@kernel_op("tvq_kernels::window_join")
def window_join(state_keys: Tensor, keys: Tensor, state_values: Tensor, values: Tensor, state_codes: Tensor,
                codes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(keys (B, H, M + T, D_k) in keys' dtype, values (B, H, M + T, D_v) in values' dtype, codes (B, H, M + T)
    int64), each the state's M rows then the chunk's T, contiguous. Inputs any strides with a dense last dim (the
    codes' too); the state's keys and values are cast to the chunk's dtypes."""
    B, H, M, Dk = state_keys.shape
    T, Dv = keys.shape[2], values.shape[-1]
    N = M + T
    out_k = keys.new_empty(B, H, N, Dk)
    out_v = values.new_empty(B, H, N, Dv)
    out_c = codes.new_empty(B, H, N)
    if not out_c.numel():
        return out_k, out_v, out_c
    sk, k, sv, v = (_dense_last(x) for x in (state_keys, keys, state_values, values))
    sc, c = _dense_last(state_codes), _dense_last(codes)
    BR = BLOCK_ROWS
    _join_kernel[(cdiv(N, BR), H, B)](
        sk, k, sv, v, sc, c, out_k, out_v, out_c, M, N, Dk, Dv, *sk.stride()[:3], *k.stride()[:3], *sv.stride()[:3],
        *v.stride()[:3], *sc.stride()[:2], *c.stride()[:2], BR=BR, BK=tile(Dk, 128), BV=tile(Dv, 128))
    return out_k, out_v, out_c


@window_join.register_fake
def _(state_keys, keys, state_values, values, state_codes, codes):
    B, H, M, Dk = state_keys.shape
    N = M + keys.shape[2]
    return keys.new_empty(B, H, N, Dk), values.new_empty(B, H, N, values.shape[-1]), codes.new_empty(B, H, N)


class _WindowJoin(torch.autograd.Function):
    """The three joined lists; backward slices the gradients (the ``cat``'s backward), the state's part cast back."""

    @staticmethod
    def forward(ctx, state_keys, keys, state_values, values, state_codes, codes):
        ctx.M, ctx.dtypes = state_keys.shape[2], (state_keys.dtype, state_values.dtype)
        ctx.set_materialize_grads(False)  # no zeros for the codes' gradient (nor an unused output's)
        out_k, out_v, out_c = window_join(state_keys, keys, state_values, values, state_codes, codes)
        ctx.mark_non_differentiable(out_c)
        return out_k, out_v, out_c

    @staticmethod
    def backward(ctx, g_keys, g_values, _g_codes):
        M, (sk_dtype, sv_dtype) = ctx.M, ctx.dtypes
        need = ctx.needs_input_grad
        g_sk = g_keys[:, :, :M].to(sk_dtype) if need[0] and g_keys is not None else None
        g_k = g_keys[:, :, M:] if need[1] and g_keys is not None else None
        g_sv = g_values[:, :, :M].to(sv_dtype) if need[2] and g_values is not None else None
        g_v = g_values[:, :, M:] if need[3] and g_values is not None else None
        return g_sk, g_k, g_sv, g_v, None, None


def window_join_kernel(state_keys: Tensor, keys: Tensor, state_values: Tensor, values: Tensor, state_codes: Tensor,
                       codes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(cat([state_keys.to(keys.dtype), keys], 2), cat([state_values.to(values.dtype), values], 2),
    cat([state_codes, codes], 2))`` in one launch: state_keys (B, H, M, D_k), keys (B, H, T, D_k), state_values
    (B, H, M, D_v), values (B, H, T, D_v), state_codes and codes (B, H, M) and (B, H, T) int64, any strides.
    Gradients reach the four float inputs (the codes have none)."""
    B, H, M, Dk = state_keys.shape
    T = keys.shape[2]
    shapes = [(state_keys, (B, H, M, Dk)), (keys, (B, H, T, Dk)), (state_values, (B, H, M, values.shape[-1])),
              (values, (B, H, T, state_values.shape[-1])), (state_codes, (B, H, M)), (codes, (B, H, T))]
    if any(x.shape != s for x, s in shapes) or state_codes.dtype != torch.long or codes.dtype != torch.long:
        raise ValueError("window_join_kernel: state and chunk keys (B, H, M | T, D_k), values (B, H, M | T, D_v) and "
                         f"int64 codes (B, H, M | T) expected, got {[tuple(x.shape) for x, _ in shapes]} and codes "
                         f"{state_codes.dtype}, {codes.dtype}")
    return _WindowJoin.apply(state_keys, keys, state_values, values, state_codes, codes)
