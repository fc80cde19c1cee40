"""The key list of a chunk, its carried window joined with the chunk's keys, values and codes, as one Triton kernel
(the kernel twin of :func:`tvq.ops.cache.join_window`).

Attention reads keys (B, H, M + T, D_k), values (B, H, M + T, D_v) and codes (B, H, M + T): the state's M window
slots, then the chunk's T. In PyTorch that is three ``torch.cat`` launches (each a copy, the state's part cast to the
chunk's dtype). Here one launch writes all three: a program owns a tile of BR key-list rows of one (b, h) and copies
their keys, values and codes, each row from the state (r < M) or the chunk (r >= M), the chunk read through its own
strides (the values are a transposed view of the projection's (B, T, H D_v) output). The bytes are the three copies'
own; a launch per sublayer is what goes (three become one). Backward is the ``cat``'s: slices of the gradients, no
kernel (the state's part cast back to its dtype where it differs).

With ``count0`` the same launch also counts the key list's codes per block (the blockwise attention's cache counts,
:func:`tvq.ops.cache.block_counts`): programs past the row tiles each own a tile of codes of one (b, h) and walk the
blocks, reading the codes where this launch's other programs read them (the state's and the chunk's), the running
counts in registers (:func:`tvq.ops.kernels.cache_scan.count_blocks`, the counting kernel's own loop). One launch
instead of two: the counts' kernel would wait for the joined codes only to read them back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tvq.ops.kernels import kernel_op
from tvq.ops.kernels.cache_scan import count_blocks
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
def _join_rows(sk_ptr, k_ptr, sv_ptr, v_ptr, sc_ptr, c_ptr, keys_ptr, values_ptr, codes_ptr, b, h, r, M, N, Dk, Dv,
               ssk_b, ssk_h, ssk_t, sk_b, sk_h, sk_t, ssv_b, ssv_h, ssv_t, sv_b, sv_h, sv_t, ssc_b, ssc_h, sc_b, sc_h,
               BK: tl.constexpr, BV: tl.constexpr):
    """Keys, values and codes of key-list rows r (BR,) of (b, h)."""
    _copy_rows(sk_ptr, k_ptr, keys_ptr, b, h, r, M, N, Dk, ssk_b, ssk_h, ssk_t, sk_b, sk_h, sk_t, BK)
    _copy_rows(sv_ptr, v_ptr, values_ptr, b, h, r, M, N, Dv, ssv_b, ssv_h, ssv_t, sv_b, sv_h, sv_t, BV)
    old, new = r < M, (r >= M) & (r < N)
    x = tl.load(sc_ptr + b * ssc_b + h * ssc_h + r, mask=old, other=0)
    y = tl.load(c_ptr + b * sc_b + h * sc_h + (r - M), mask=new, other=0)
    tl.store(codes_ptr + (b * tl.num_programs(1) + h) * N + r, tl.where(old, x, y), mask=r < N)


@triton.jit
def _join_kernel(sk_ptr, k_ptr, sv_ptr, v_ptr, sc_ptr, c_ptr, keys_ptr, values_ptr, codes_ptr, count0_ptr, first_ptr,
                 counts_ptr, M, N, Dk, Dv, ssk_b, ssk_h, ssk_t, sk_b, sk_h, sk_t, ssv_b, ssv_h, ssv_t, sv_b, sv_h, sv_t,
                 ssc_b, ssc_h, sc_b, sc_h, first_int, nb, L, S, COUNT: tl.constexpr, PER_ROW: tl.constexpr,
                 BR: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BS: tl.constexpr, BL: tl.constexpr):
    """Keys, values and codes of BR key-list rows of (b, h) = (program_id(2), program_id(1)); grid (row tiles [+ code
    tiles], H, B): COUNT, a program past the row tiles counts one tile of codes per block (:func:`count_blocks`,
    keys before first_ptr[b] (PER_ROW) or ``first_int`` empty)."""
    b, h = tl.program_id(2).to(tl.int64), tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0).to(tl.int64)
    n_row_tiles = tl.cdiv(N, BR)
    if pid < n_row_tiles:
        _join_rows(sk_ptr, k_ptr, sv_ptr, v_ptr, sc_ptr, c_ptr, keys_ptr, values_ptr, codes_ptr, b, h,
                   pid * BR + tl.arange(0, BR), M, N, Dk, Dv, ssk_b, ssk_h, ssk_t, sk_b, sk_h, sk_t, ssv_b, ssv_h,
                   ssv_t, sv_b, sv_h, sv_t, ssc_b, ssc_h, sc_b, sc_h, BK, BV)
    elif COUNT:
        first = tl.load(first_ptr + b) if PER_ROW else first_int
        count_blocks(sc_ptr + b * ssc_b + h * ssc_h, c_ptr + b * sc_b + h * sc_h, M, count0_ptr, counts_ptr,
                     b * tl.num_programs(1) + h, pid - n_row_tiles, first, nb, L, S, BS, BL)


def _dense_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@kernel_op("tvq_kernels::window_join")
def window_join(state_keys: Tensor, keys: Tensor, state_values: Tensor, values: Tensor, state_codes: Tensor,
                codes: Tensor, count0: Tensor | None = None, first_valid: Tensor | None = None, first: int = 0,
                nb: int = 0, L: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(keys (B, H, M + T, D_k) in keys' dtype, values (B, H, M + T, D_v) in values' dtype, codes (B, H, M + T)
    int64, counts), each list the state's M rows then the chunk's T, contiguous. Inputs any strides with a dense last
    dim (the codes' too); the state's keys and values are cast to the chunk's dtypes. With ``count0`` (B, H, S)
    float32, counts (B, H, nb, S) float32 = count0 plus, per code, the keys of the joined list's blocks 0..n-1 of L
    ((nb - 1) L <= M + T) at or after first_valid[b] ((B,) int32) or ``first``, as :func:`tvq.ops.cache.block_counts`;
    else an empty (0,)."""
    B, H, M, Dk = state_keys.shape
    T, Dv = keys.shape[2], values.shape[-1]
    N = M + T
    out_k = keys.new_empty(B, H, N, Dk)
    out_v = values.new_empty(B, H, N, Dv)
    out_c = codes.new_empty(B, H, N)
    count = count0 is not None
    S = count0.shape[-1] if count else 1
    if count and (count0.shape != (B, H, S) or (nb - 1) * L > N):  # (the last block's keys are never counted)
        raise ValueError(f"window_join: count0 (B, H, S) = ({B}, {H}, S) and (nb - 1) L <= M + T = {N} expected, "
                         f"got {tuple(count0.shape)} and nb {nb}, L {L}")
    counts = count0.new_empty(B, H, nb, S) if count else codes.new_empty(0, dtype=torch.float32)
    if not out_c.numel() and not counts.numel():
        return out_k, out_v, out_c, counts
    sk, k, sv, v = (_dense_last(x) for x in (state_keys, keys, state_values, values))
    sc, c = _dense_last(state_codes), _dense_last(codes)
    BR, BS = BLOCK_ROWS, tile(S, 64)
    n_count = cdiv(S, BS) if count and counts.numel() else 0
    _join_kernel[(cdiv(N, BR) + n_count, H, B)](
        sk, k, sv, v, sc, c, out_k, out_v, out_c, count0.contiguous() if count else c,
        first_valid if first_valid is not None else c, counts if count else c, M, N, Dk, Dv, *sk.stride()[:3],
        *k.stride()[:3], *sv.stride()[:3], *v.stride()[:3], *sc.stride()[:2], *c.stride()[:2], first, nb, L, S,
        COUNT=n_count > 0, PER_ROW=first_valid is not None, BR=BR, BK=tile(Dk, 128), BV=tile(Dv, 128), BS=BS,
        BL=tile(max(L, 1), 64))
    return out_k, out_v, out_c, counts


@window_join.register_fake
def _(state_keys, keys, state_values, values, state_codes, codes, count0=None, first_valid=None, first=0, nb=0, L=0):
    B, H, M, Dk = state_keys.shape
    N = M + keys.shape[2]
    counts = count0.new_empty(B, H, nb, count0.shape[-1]) if count0 is not None else \
        codes.new_empty(0, dtype=torch.float32)
    return (keys.new_empty(B, H, N, Dk), values.new_empty(B, H, N, values.shape[-1]), codes.new_empty(B, H, N),
            counts)


class _WindowJoin(torch.autograd.Function):
    """The three joined lists (and the block counts, if asked); backward slices the gradients (the ``cat``'s
    backward), the state's part cast back."""

    @staticmethod
    def forward(ctx, state_keys, keys, state_values, values, state_codes, codes, counting):
        ctx.M, ctx.dtypes = state_keys.shape[2], (state_keys.dtype, state_values.dtype)
        ctx.set_materialize_grads(False)  # no zeros for the codes' gradient (nor an unused output's)
        out_k, out_v, out_c, counts = window_join(state_keys, keys, state_values, values, state_codes, codes,
                                                  *counting)
        ctx.mark_non_differentiable(out_c, counts)
        return out_k, out_v, out_c, counts

    @staticmethod
    def backward(ctx, g_keys, g_values, _g_codes, _g_counts):
        M, (sk_dtype, sv_dtype) = ctx.M, ctx.dtypes
        need = ctx.needs_input_grad
        g_sk = g_keys[:, :, :M].to(sk_dtype) if need[0] and g_keys is not None else None
        g_k = g_keys[:, :, M:] if need[1] and g_keys is not None else None
        g_sv = g_values[:, :, :M].to(sv_dtype) if need[2] and g_values is not None else None
        g_v = g_values[:, :, M:] if need[3] and g_values is not None else None
        return g_sk, g_k, g_sv, g_v, None, None, None


def window_join_kernel(state_keys: Tensor, keys: Tensor, state_values: Tensor, values: Tensor, state_codes: Tensor,
                       codes: Tensor, counts: tuple[Tensor, int | Tensor, int, int] | None = None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(cat([state_keys.to(keys.dtype), keys], 2), cat([state_values.to(values.dtype), values], 2),
    cat([state_codes, codes], 2), block counts or None)`` in one launch: state_keys (B, H, M, D_k), keys (B, H, T,
    D_k), state_values (B, H, M, D_v), values (B, H, T, D_v), state_codes and codes (B, H, M) and (B, H, T) int64,
    any strides. ``counts`` = (count0 (B, H, S) float32, n_invalid (an int or one per row (B,)), nb, L): also each
    block's cache counts (B, H, nb, S) of the joined codes, :func:`tvq.ops.cache.block_counts`'. Gradients reach the
    four float inputs (the codes and counts have none)."""
    B, H, M, Dk = state_keys.shape
    T = keys.shape[2]
    shapes = [(state_keys, (B, H, M, Dk)), (keys, (B, H, T, Dk)), (state_values, (B, H, M, values.shape[-1])),
              (values, (B, H, T, state_values.shape[-1])), (state_codes, (B, H, M)), (codes, (B, H, T))]
    if any(x.shape != s for x, s in shapes) or state_codes.dtype != torch.long or codes.dtype != torch.long:
        raise ValueError("window_join_kernel: state and chunk keys (B, H, M | T, D_k), values (B, H, M | T, D_v) and "
                         f"int64 codes (B, H, M | T) expected, got {[tuple(x.shape) for x, _ in shapes]} and codes "
                         f"{state_codes.dtype}, {codes.dtype}")
    counting = ()
    if counts is not None:
        count0, n_invalid, nb, L = counts
        if isinstance(n_invalid, Tensor):
            counting = (count0, n_invalid.to(device=codes.device, dtype=torch.int32).contiguous(), 0, nb, L)
        else:
            counting = (count0, None, int(n_invalid), nb, L)
    out_k, out_v, out_c, n = _WindowJoin.apply(state_keys, keys, state_values, values, state_codes, codes, counting)
    return out_k, out_v, out_c, n if counts is not None else None
