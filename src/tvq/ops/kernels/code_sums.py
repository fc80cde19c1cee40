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

:func:`cache_fold_kernel` is the same kernel folding the sums into a carried cache as it writes them (the state's
advance, :func:`tvq.ops.cache.advance_state`): per code the new count c + n and mean m + (sum - n m) / max(c + n, 1)
(:func:`tvq.ops.cache.merge_cache`'s formula), with the empty slots given as each row's first valid key, so no
mask, no sums and none of the merge's six elementwise kernels go through HBM. (Where the blockwise path's cache scan
runs over the same keys it writes that state itself: :func:`tvq.ops.kernels.cache_scan.cache_scan_fold`; this
kernel folds the rest: a padded last block, the cache's warm-up, an mqa sublayer, a chunk of a context-parallel
sequence.)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from tvq.ops.kernels import kernel_op, register_flops, register_launches
from tvq.ops.kernels.common import cdiv, dot_options, tile


@triton.jit
def _store(acc, cnt, counts_ptr, sums_ptr, count0_ptr, mean0_ptr, p, s, d, td, S, D, FOLD: tl.constexpr):
    """Write one tile's sums acc (BS, BD) and, from the D tile 0 program, its counts cnt (BS,); FOLD: the cache
    (count0, mean0) with them folded in instead (merge_cache: count c + n, mean m + (sum - n m) / max(c + n, 1))."""
    s_ok = s < S
    ok = s_ok[:, None] & (d < D)[None, :]
    if FOLD:
        c0 = tl.load(count0_ptr + p * S + s, mask=s_ok, other=0.0)  # (BS,)
        m0 = tl.load(mean0_ptr + (p * S + s[:, None]) * D + d[None, :], mask=ok, other=0.0)  # (BS, BD)
        new = c0 + cnt
        acc = m0 + (acc - cnt[:, None] * m0) / tl.maximum(new, 1.0)[:, None]
        cnt = new
    tl.store(sums_ptr + (p * S + s[:, None]) * D + d[None, :], acc, mask=ok)
    if td == 0:
        tl.store(counts_ptr + p * S + s, cnt, mask=s_ok)


@triton.jit
def _sums_kernel(codes_ptr, valid_ptr, values_ptr, counts_ptr, sums_ptr, first_ptr, count0_ptr, mean0_ptr, first_int,
                 N, S, D, P, chunk, stride_cp, stride_vp, stride_vn, HAS_VALID: tl.constexpr, FIRST: tl.constexpr,
                 FOLD: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    """One (BS, BD) tile of row p's sums (and, for D tile 0, its BS counts) over the row's keys k chunk ..
    (k + 1) chunk - 1, k the program's chunk (the slowest grid axis; counts (K, P, S) and sums (K, P, S, D) hold
    one slice per chunk); FIRST: keys before first[p] (else first_int) skipped; FOLD (one chunk only): the counts
    and means of the cache (count0, mean0) with the sums folded in are written instead."""
    pid = tl.program_id(0).to(tl.int64)
    n_s, n_d = tl.cdiv(S, BS), tl.cdiv(D, BD)
    ts, td, p, k = pid % n_s, (pid // n_s) % n_d, (pid // (n_s * n_d)) % P, pid // (n_s * n_d * P)
    counts_ptr += k * P * S
    sums_ptr += k * P * S * D
    s = ts * BS + tl.arange(0, BS)  # (BS,)
    d = td * BD + tl.arange(0, BD)  # (BD,)
    d_ok = d < D
    acc = tl.zeros((BS, BD), dtype=tl.float32)
    cnt = tl.zeros((BS,), dtype=tl.float32)
    first = tl.load(first_ptr + p) if FIRST else first_int
    end = tl.minimum(N, (k + 1) * chunk)
    for r0 in range(k * chunk, end, BL):
        r = r0 + tl.arange(0, BL)  # (BL,)
        keep = (r < end) & (r >= first)
        if HAS_VALID:
            keep = keep & (tl.load(valid_ptr + p * N + r, mask=keep, other=0) != 0)
        code = tl.load(codes_ptr + p * stride_cp + r, mask=keep, other=-1)  # (BL,), -1: no code
        v = tl.load(values_ptr + p * stride_vp + r[:, None] * stride_vn + d[None, :],
                    mask=keep[:, None] & d_ok[None, :], other=0.0)  # (BL, BD)
        if UPCAST:
            v = v.to(tl.float32)
        hit = code[None, :] == s[:, None]  # (BS, BL)
        acc = tl.dot(tl.where(hit, 1.0, 0.0).to(v.dtype), v, acc, input_precision=PRECISION)
        cnt += tl.sum(tl.where(hit, 1.0, 0.0), 1)
    _store(acc, cnt, counts_ptr, sums_ptr, count0_ptr, mean0_ptr, p, s, d, td, S, D, FOLD)


@triton.jit
def _reduce_kernel(part_counts_ptr, part_sums_ptr, counts_ptr, sums_ptr, count0_ptr, mean0_ptr, K, P, S, D,
                   FOLD: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
    """One (BS, BD) tile of row p: the K chunks' partial counts (K, P, S) and sums (K, P, S, D) added in chunk
    order (float32, deterministic), then folded into the cache as :func:`_sums_kernel` does (FOLD)."""
    pid = tl.program_id(0).to(tl.int64)
    n_s, n_d = tl.cdiv(S, BS), tl.cdiv(D, BD)
    ts, td, p = pid % n_s, (pid // n_s) % n_d, pid // (n_s * n_d)
    s = ts * BS + tl.arange(0, BS)  # (BS,)
    d = td * BD + tl.arange(0, BD)  # (BD,)
    s_ok, d_ok = s < S, d < D
    ok = s_ok[:, None] & d_ok[None, :]
    acc = tl.zeros((BS, BD), dtype=tl.float32)
    cnt = tl.zeros((BS,), dtype=tl.float32)
    for k in range(K):
        acc += tl.load(part_sums_ptr + ((k * P + p) * S + s[:, None]) * D + d[None, :], mask=ok, other=0.0)
        cnt += tl.load(part_counts_ptr + (k * P + p) * S + s, mask=s_ok, other=0.0)
    _store(acc, cnt, counts_ptr, sums_ptr, count0_ptr, mean0_ptr, p, s, d, td, S, D, FOLD)


@kernel_op("tvq_kernels::code_sums")
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
    codes = codes.contiguous()
    _launch(codes, values, counts, sums, valid=valid.contiguous() if valid is not None else None)
    return counts, sums


# Below this many programs the walk over the keys is split into chunks (each chunk's partial sums written in
# float32, then added in order by :func:`_reduce_kernel`): ~4 programs per SM of an H100/H200 (132 SMs). One
# program per (S, D) tile walking every key was measured on an H200 at 0.6 ms a call at 32k tokens (the codebook's
# statistics over d_k = 128: 16 programs in all), latency-bound.
SPLIT_BELOW_PROGRAMS = 512
MIN_CHUNK_KEYS = 1024  # keys per chunk at least: shorter walks cost less than the partials' traffic and launch


def _chunks(P: int, N: int, S: int, D: int, BS: int, BD: int, BL: int) -> tuple[int, int]:
    """(K chunks, keys per chunk, a multiple of BL) for a walk over N keys of a grid of P S/BS D/BD programs."""
    base = P * cdiv(S, BS) * cdiv(D, BD)
    K = max(1, min(cdiv(SPLIT_BELOW_PROGRAMS, base), N // MIN_CHUNK_KEYS)) if base < SPLIT_BELOW_PROGRAMS else 1
    chunk = cdiv(cdiv(N, K), BL) * BL
    return cdiv(N, chunk), chunk


def _tiles(N: int, S: int, D: int) -> tuple[int, int, int]:
    return tile(S, 64), tile(D, 64), tile(N, 32)


def _launch(codes: Tensor, values: Tensor, counts: Tensor, sums: Tensor, valid: Tensor | None = None,
            first: Tensor | None = None, first_int: int = 0, cache: tuple[Tensor, Tensor] | None = None) -> None:
    """Run the kernel over codes (P, N) (rows strided, last dim dense) and values (P, N, D) (last dim dense), in
    K chunks of keys and a reduction where one walk per tile would leave the GPU mostly idle (:func:`_chunks`)."""
    (P, N), S, D = codes.shape, counts.shape[1], values.shape[-1]
    BS, BD, BL = _tiles(N, S, D)
    K, chunk = _chunks(P, N, S, D, BS, BD, BL)
    tiles = cdiv(S, BS) * cdiv(D, BD) * P
    dummy = codes  # pointers never read
    count0, mean0 = cache if cache is not None else (dummy, dummy)
    part_counts, part_sums = (counts, sums) if K == 1 else (counts.new_empty(K, P, S), sums.new_empty(K, P, S, D))
    _sums_kernel[(tiles * K,)](codes, dummy if valid is None else valid, values, part_counts, part_sums,
                               dummy if first is None else first, count0, mean0, first_int, N, S, D, P, chunk,
                               codes.stride(0), values.stride(0), values.stride(1), HAS_VALID=valid is not None,
                               FIRST=first is not None, FOLD=cache is not None and K == 1, BS=BS, BD=BD, BL=BL,
                               **dot_options(values.dtype))
    if K > 1:
        _reduce_kernel[(tiles,)](part_counts, part_sums, counts, sums, count0, mean0, K, P, S, D,
                                 FOLD=cache is not None, BS=BS, BD=BD)


def _launches(codes: Tensor, values: Tensor, S: int) -> tuple[int, int]:
    """(launches, scratch bytes: the partials written and read) of :func:`_launch`, for the cost model."""
    (P, N), D = codes.shape, values.shape[-1]
    K, _ = _chunks(P, N, S, D, *_tiles(N, S, D))
    return (1, 0) if K == 1 else (2, 2 * K * P * S * (D + 1) * 4)


@code_sums.register_fake
def _(codes, values, valid, n_code):
    P = codes.shape[0]
    return (codes.new_empty(P, n_code, dtype=torch.float32),
            values.new_empty(P, n_code, values.shape[-1], dtype=torch.float32))


@register_launches("tvq_kernels::code_sums")
def _(codes, values, valid, n_code):
    return _launches(codes, values, n_code)


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


@kernel_op("tvq_kernels::cache_fold")
def cache_fold(codes: Tensor, values: Tensor, first: Tensor | None, first_int: int, count: Tensor,
               mean: Tensor) -> tuple[Tensor, Tensor]:
    """(count', mean') (P, S), (P, S, D) float32: the cache (count (P, S), mean (P, S, D) float32) with the keys of
    codes (P, N) and values (P, N, D) folded in, keys before first[p] (P,) int32 (``first_int`` where first is
    None) skipped (rows may be strided, the last dims dense)."""
    P, N = codes.shape
    new_count, new_mean = torch.empty_like(count), torch.empty_like(mean)
    if not new_mean.numel():
        return new_count.copy_(count), new_mean
    if values.stride(-1) != 1:
        values = values.contiguous()
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    _launch(codes, values, new_count, new_mean, first=None if first is None else first.contiguous(),
            first_int=first_int, cache=(count.contiguous(), mean.contiguous()))
    return new_count, new_mean


@cache_fold.register_fake
def _(codes, values, first, first_int, count, mean):
    return torch.empty_like(count), torch.empty_like(mean)


@register_launches("tvq_kernels::cache_fold")
def _(codes, values, first, first_int, count, mean):
    return _launches(codes, values, count.shape[1])


@register_flops("tvq_kernels::cache_fold")
def _(codes, values, first, first_int, count, mean):
    """The one-hot products: (S, N) @ (N, D) per row, in the values' dtype."""
    return str(values.dtype).removeprefix("torch."), 2 * codes.numel() * count.shape[1] * values.shape[-1]


class _CacheFold(torch.autograd.Function):
    """(count', mean') by the kernel. Gradients (PyTorch; a carried state's gradient is rare): g_sum = g_mean' /
    max(count', 1) reaches each valid key's value at its code, and the old mean gets g_mean' (1 - n / max(count', 1)),
    n = count' - count the keys folded in."""

    @staticmethod
    def forward(ctx, codes, values, first, first_int, count, mean):
        new_count, new_mean = cache_fold(codes, values, first, first_int, count, mean)
        ctx.mark_non_differentiable(new_count)
        ctx.save_for_backward(codes, first, count, new_count)
        ctx.first_int = first_int
        ctx.values_dtype = values.dtype
        return new_count, new_mean

    @staticmethod
    def backward(ctx, _, g_mean):
        codes, first, count, new_count = ctx.saved_tensors
        if g_mean is None:
            return None, None, None, None, None, None
        denom = new_count.clamp_min(1.0)[..., None]  # (P, S, 1)
        g_values = None
        if ctx.needs_input_grad[1]:
            g_sum = g_mean / denom  # (P, S, D)
            g_values = g_sum.gather(1, codes[..., None].expand(*codes.shape, g_sum.shape[-1]))  # (P, N, D)
            slot = torch.arange(codes.shape[1], device=codes.device)
            valid = slot >= (ctx.first_int if first is None else first[:, None])  # (P, N) or (N,)
            g_values = torch.where(valid[..., None], g_values, 0.0).to(ctx.values_dtype)
        g_mean0 = g_mean * (1 - (new_count - count)[..., None] / denom) if ctx.needs_input_grad[5] else None
        return None, g_values, None, None, None, g_mean0


def cache_fold_kernel(codes: Tensor, values: Tensor, n_invalid: int | Tensor, count: Tensor,
                      mean: Tensor) -> tuple[Tensor, Tensor]:
    """The cache (count (B, H, S), mean (B, H, S, D) float32) with the keys leaving the window folded in: codes
    (B, H, N), values (B, H, N, D), the first ``n_invalid`` (an int or one per row (B,)) empty slots. The kernel
    twin of :func:`tvq.ops.cache.code_statistics` then :func:`tvq.ops.cache.merge_cache` (float32); gradients
    reach the values and the old mean."""
    B, H, N = codes.shape
    S, D = count.shape[-1], values.shape[-1]
    if values.shape[:3] != (B, H, N) or count.shape != (B, H, S) or mean.shape != (B, H, S, D):
        raise ValueError(f"cache_fold_kernel: codes (B, H, N), values (B, H, N, D), count (B, H, S) and mean "
                         f"(B, H, S, D) expected, got {tuple(codes.shape)}, {tuple(values.shape)}, "
                         f"{tuple(count.shape)} and {tuple(mean.shape)}")
    first = n_invalid.to(device=codes.device, dtype=torch.int32)[:, None].expand(B, H).reshape(B * H) \
        if isinstance(n_invalid, Tensor) else None
    new_count, new_mean = _CacheFold.apply(codes.flatten(0, 1), values.flatten(0, 1), first,
                                           0 if first is not None else int(n_invalid), count.reshape(B * H, S),
                                           mean.reshape(B * H, S, D))
    return new_count.view(B, H, S), new_mean.view(B, H, S, D)
