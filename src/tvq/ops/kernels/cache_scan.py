"""The compressive cache's share of the output as a Triton scan plus one batched GEMM per block
(the kernel twin of :func:`tvq.ops.cache.cache_read`).

Block n of a row p (P = B H rows) reads the cache C_n (S, D_v): the carried sums (the carried means
``mean0`` times the carried counts, multiplied on chip) plus the values of the valid keys of blocks 0..n-1,
summed per code. The output is ``p_cache[n] @ (C_n / count_n)``: the scan
(:func:`cache_scan`) writes the per-block MEANS (P, nb, S, D_v) in the compute dtype, and a batched GEMM
in the compute dtype reads them (:func:`cache_read_kernel`), or the window's value kernel reads them as it adds
the window's share (:func:`tvq.ops.kernels.window_values.block_values_kernel`: the blockwise path's choice, whose
cache output then never goes through HBM). The exact per-code sums stay in float32 on chip: a program owns one
(BS, BD) tile of one row's cache and walks the blocks in order, adding each block's keys with a one-hot
(BS, L) @ values (L, BD) product (``tl.dot``: tensor cores on a GPU), so there are no atomics and no float32
cache ever reaches HBM. Backward (:func:`cache_scan_backward`) is the reverse scan, in two kernels: a suffix sum
over blocks per (S, D_v) tile, writing G_{n+1} for every block in the values' dtype (a short walk: one tile read
and written per block), then a gather giving each valid key G_{n+1} at its code, in parallel over keys. (One
kernel doing both, each program walking every block's keys in order with a one-hot product, was measured on an
H200 at 1.7 ms a call at 32k tokens, enwik8: 192 programs each running a chain of 1,024 small products, 7 of 8
of whose rows were masked away: latency-bound, 19% of the step's GPU time.)

The scan also writes the state's cache after the chunk (:func:`cache_scan_fold`, the blockwise path's choice where
the chunk is whole blocks): a program walking its tile through every block holds, after the last one, exactly the
per-code sums that :func:`tvq.ops.cache.advance_state` folds into the carried cache, so it adds the last block's keys
too (which reach no block's cache) and writes count' and mean' in float32. That replaces
:func:`tvq.ops.kernels.code_sums.cache_fold_kernel`'s second pass over the leaving values (two launches with its
split-K partials). Backward, the new mean's gradient (a carried state's, where a later chunk's loss reads it) starts
the reverse scan.

Why the means go through HBM rather than being fused into the read: a fused read would hold a row's
running sums on chip while it multiplies: all of them, S x D_v float32, are 3 MiB at S 512, d_v 1536
(enwik8), far beyond one SM (256 KiB of registers, 228 KiB of shared memory). Tiled over D_v (S x 64
float32: 128 KiB per program), every tile re-reads each block's (L, S) weights: D_v / 64 = 24 reads of
2 S bytes per token, 24 KB, more than the 4 bytes per element (6 KB per token) that the means cost to
write and read in the compute dtype (bf16), against ~20 on today's chunked path (a float32 zero fill 4,
a scatter, a cumsum 4 + 4, a cast 4 + 2 and the GEMM's read 2).

Bytes moved per token and head, with E = S D_v / L cache elements per token (enwik8: 1536), bf16 compute:
today ~20 E forward and ~36 E backward (the recomputed caches 20, the per-block ``weights^T grad`` 2, its
float32 copy 2 + 4, a float32 cumsum 4 + 4); here ~4 E forward (means written and read) and ~8 E backward
(means recomputed, written and read; ``g_means`` written and read), plus the values read twice and their
gradients written once (2 D_v each; the S tiles of a row are the grid's fastest axis, so their programs
share the values in L2). enwik8: ~86 KB against ~18 KB (+ 9 KB of values) per token and layer for a
training step's cache read. Estimates from the shapes, not measured (no GPU was at hand).

The means (and in backward ``g_means``) of all blocks exist at once for a group of rows at most
:data:`_CHUNK_BYTES` large; only the inputs are saved for backward, which recomputes the means.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from tvq.ops.kernels import kernel_op, register_flops, register_launches
from tvq.ops.kernels.common import cdiv, dot_options, tile

_CHUNK_BYTES = 256 * 2**20  # the means (P', nb, S, D_v) of one group of rows stay under this


@triton.jit
def _tile_ids(S, Dv, BS: tl.constexpr, BD: tl.constexpr):
    """(S tile, D_v tile, row) of this program; one grid axis (CUDA caps the others at 65535), S tiles fastest:
    the programs of one row and D_v tile run together and share the row's values in L2."""
    pid = tl.program_id(0).to(tl.int64)
    n_s, n_d = tl.cdiv(S, BS), tl.cdiv(Dv, BD)
    return pid % n_s, (pid // n_s) % n_d, pid // (n_s * n_d)


@triton.jit
def _add_block(acc, cnt, codes_ptr, values_ptr, row, p, n, L, s, d, d_ok, first_valid, stride_vp, stride_vn,
               stride_vl, COUNT: tl.constexpr, BL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc (BS, BD) plus block n's valid keys per code s (one-hot (BS, BL) @ values (BL, BD), float32), and with
    COUNT cnt (BS,) plus how many there are."""
    for l0 in range(0, L, BL):
        ll = l0 + tl.arange(0, BL)  # (BL,)
        keep = (ll < L) & (n * L + ll >= first_valid)  # empty slots are never counted
        code = tl.load(codes_ptr + row * L + ll, mask=keep, other=-1)  # (BL,)
        v = tl.load(values_ptr + p * stride_vp + n * stride_vn + ll[:, None] * stride_vl + d[None, :],
                    mask=keep[:, None] & d_ok[None, :], other=0.0)  # (BL, BD)
        if UPCAST:
            v = v.to(tl.float32)
        hit = tl.where(code[None, :] == s[:, None], 1.0, 0.0)  # (BS, BL)
        acc = tl.dot(hit.to(v.dtype), v, acc, input_precision=PRECISION)
        if COUNT:
            cnt += tl.sum(hit, 1)
    return acc, cnt


@triton.jit
def _scan_fwd_kernel(codes_ptr, values_ptr, mean0_ptr, count_ptr, first_ptr, means_ptr, fold_count_ptr,
                     fold_mean_ptr, first_valid, nb, L, S, Dv, stride_vp, stride_vn, stride_vl, PER_ROW: tl.constexpr,
                     FOLD: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One (BS, BD) tile of row p's cache: C_0 = mean0 * count[p, 0] (the carried sums), then for n = 0..nb-1
    write means[p, n] = C_n / max(count_n, 1) and add block n's valid keys (one-hot (BS, BL) @ values (BL, BD),
    float32 accumulator). Keys before first_ptr[p] (PER_ROW) or ``first_valid`` are empty slots. FOLD: the last
    block's keys added too, and the cache after every block written in float32 (the state's: count
    count[p, nb - 1] + the last block's keys, mean C_nb / count, or mean0 where the count is 0)."""
    ts, td, p = _tile_ids(S, Dv, BS, BD)
    s = ts * BS + tl.arange(0, BS)  # (BS,)
    d = td * BD + tl.arange(0, BD)  # (BD,)
    s_ok, d_ok = s < S, d < Dv
    tile_ok = s_ok[:, None] & d_ok[None, :]  # (BS, BD)
    c0 = tl.load(count_ptr + p * nb * S + s, mask=s_ok, other=0.0)  # (BS,) the carried counts
    acc = tl.load(mean0_ptr + (p * S + s[:, None]) * Dv + d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    acc = acc * c0[:, None]  # (BS, BD)
    hits = tl.zeros((BS,), dtype=tl.float32)
    if PER_ROW:
        first_valid = tl.load(first_ptr + p)
    for n in range(nb):
        row = p * nb + n
        cnt = tl.load(count_ptr + row * S + s, mask=s_ok, other=1.0)  # (BS,)
        mean = acc / tl.maximum(cnt, 1.0)[:, None]
        tl.store(means_ptr + (row * S + s[:, None]) * Dv + d[None, :], mean.to(means_ptr.dtype.element_ty),
                 mask=tile_ok)
        if n + 1 < nb:  # the last block's keys reach no block's cache
            acc, hits = _add_block(acc, hits, codes_ptr, values_ptr, row, p, n, L, s, d, d_ok, first_valid,
                                   stride_vp, stride_vn, stride_vl, False, BL, UPCAST, PRECISION)
    if FOLD:  # but the state's
        row = p * nb + nb - 1
        acc, hits = _add_block(acc, hits, codes_ptr, values_ptr, row, p, nb - 1, L, s, d, d_ok, first_valid,
                               stride_vp, stride_vn, stride_vl, True, BL, UPCAST, PRECISION)
        new = tl.load(count_ptr + row * S + s, mask=s_ok, other=0.0) + hits  # (BS,)
        at = (p * S + s[:, None]) * Dv + d[None, :]
        m0 = tl.load(mean0_ptr + at, mask=tile_ok & (new == 0.0)[:, None], other=0.0).to(tl.float32)
        tl.store(fold_mean_ptr + at, tl.where((new > 0.0)[:, None], acc / tl.maximum(new, 1.0)[:, None], m0),
                 mask=tile_ok)
        if td == 0:
            tl.store(fold_count_ptr + p * S + s, new, mask=s_ok)


@triton.jit
def _suffix_kernel(g_means_ptr, count_ptr, g_next_ptr, g_mean0_ptr, g_fold_ptr, fold_count_ptr, nb, S, Dv,
                   FOLD: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
    """The reverse scan of one (BS, BD) tile, float32 on chip: G_n = sum over n' >= n of g_means[p, n'] /
    max(count_n', 1) [+ g_fold[p] / max(fold_count[p], 1) (FOLD: the gradient of the state's mean, which every
    block's keys reach)]. Writes g_next[p, n] = G_{n+1} (what block n's keys get; in g_next's dtype, the values')
    and g_mean0[p] = G_0 count[p, 0] (the carried means' gradient, in g_mean0's dtype; FOLD: plus g_fold where the
    state's count is 0, its mean then mean0 itself). A tile is read and written once per block: the walk is short
    (nb steps) and the per-key gather is :func:`_gather_kernel`'s, in parallel over keys."""
    ts, td, p = _tile_ids(S, Dv, BS, BD)
    s = ts * BS + tl.arange(0, BS)  # (BS,)
    d = td * BD + tl.arange(0, BD)  # (BD,)
    s_ok, d_ok = s < S, d < Dv
    tile_ok = s_ok[:, None] & d_ok[None, :]  # (BS, BD)
    at0 = (p * S + s[:, None]) * Dv + d[None, :]  # (BS, BD) in (P, S, D_v)
    g = tl.zeros((BS, BD), dtype=tl.float32)  # G_{n + 1}
    if FOLD:
        new = tl.load(fold_count_ptr + p * S + s, mask=s_ok, other=1.0)  # (BS,)
        g += tl.load(g_fold_ptr + at0, mask=tile_ok, other=0.0).to(tl.float32) / tl.maximum(new, 1.0)[:, None]
    for i in range(nb):
        n = nb - 1 - i
        at = ((p * nb + n) * S + s[:, None]) * Dv + d[None, :]  # (BS, BD)
        gm = tl.load(g_means_ptr + at, mask=tile_ok, other=0.0)
        cnt = tl.load(count_ptr + (p * nb + n) * S + s, mask=s_ok, other=1.0)  # (BS,)
        tl.store(g_next_ptr + at, g.to(g_next_ptr.dtype.element_ty), mask=tile_ok)
        g += gm.to(tl.float32) / tl.maximum(cnt, 1.0)[:, None]
    c0 = tl.load(count_ptr + p * nb * S + s, mask=s_ok, other=0.0)  # (BS,) the carried counts
    g = g * c0[:, None]
    if FOLD:  # an empty code's state mean is mean0 (its count 0, so is c0: G_0 c0 is 0 there)
        new = tl.load(fold_count_ptr + p * S + s, mask=s_ok, other=1.0)
        g += tl.load(g_fold_ptr + at0, mask=tile_ok & (new == 0.0)[:, None], other=0.0).to(tl.float32)
    tl.store(g_mean0_ptr + at0, g.to(g_mean0_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _gather_kernel(codes_ptr, g_next_ptr, first_ptr, g_values_ptr, first_valid, nb, L, S, Dv, n_rows,
                   PER_ROW: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """BR rows of row p's key list, one D_v tile: a valid key of block n gets g_next[p, n, code] (G_{n+1} at its
    code), an empty slot and a row after the blocks (r >= nb L) zero. Every key is independent: one program per
    (row tile, D_v tile), D_v tiles fastest."""
    pid = tl.program_id(0).to(tl.int64)
    n_d, n_r = tl.cdiv(Dv, BD), tl.cdiv(n_rows, BR)
    td, tr, p = pid % n_d, (pid // n_d) % n_r, pid // (n_d * n_r)
    r = tr * BR + tl.arange(0, BR)  # (BR,) key-list rows
    d = td * BD + tl.arange(0, BD)  # (BD,)
    d_ok = d < Dv
    if PER_ROW:
        first_valid = tl.load(first_ptr + p)
    keep = (r < nb * L) & (r >= first_valid)
    code = tl.load(codes_ptr + p * nb * L + r, mask=keep, other=0).to(tl.int64)  # (BR,)
    g = tl.load(g_next_ptr + ((p * nb + r // L) * S + code)[:, None] * Dv + d[None, :],
                mask=keep[:, None] & d_ok[None, :], other=0.0)  # (BR, BD)
    tl.store(g_values_ptr + (p * n_rows + r[:, None]) * Dv + d[None, :], g.to(g_values_ptr.dtype.element_ty),
             mask=(r < n_rows)[:, None] & d_ok[None, :])


def _grid(P: int, S: int, Dv: int, BS: int, BD: int) -> tuple[int]:
    """One program per (S tile, D_v tile, row): see :func:`_tile_ids`."""
    return (cdiv(S, BS) * cdiv(Dv, BD) * P,)


def _scan(codes: Tensor, values: Tensor, mean0: Tensor, count: Tensor, first_valid: Tensor | None, first: int,
          dtype: torch.dtype, fold: bool) -> tuple[Tensor, ...]:
    """The launch of :func:`cache_scan` (and with ``fold``, :func:`cache_scan_fold`): (means[, count', mean'])."""
    P, nb, L = codes.shape
    if values.stride(-1) != 1:
        values = values.contiguous()
    S, Dv = mean0.shape[1:]
    means = values.new_empty(P, nb, S, Dv, dtype=dtype)
    state = (count.new_empty(P, S), mean0.new_empty(P, S, Dv, dtype=torch.float32)) if fold else ()
    BS, BD, BL = tile(S, 64), tile(Dv, 64), tile(L, 32)
    if not means.numel():  # (fold: no rows, cache_scan_fold's check)
        return (means, *state)
    dummy = means
    _scan_fwd_kernel[_grid(P, S, Dv, BS, BD)](
        codes.contiguous(), values, mean0.contiguous(), count.contiguous(),
        first_valid if first_valid is not None else codes, means, *(state or (dummy, dummy)), first, nb, L, S, Dv,
        *values.stride()[:3], PER_ROW=first_valid is not None, FOLD=fold, BS=BS, BD=BD, BL=BL,
        **dot_options(values.dtype))
    return (means, *state)


@kernel_op("tvq_kernels::cache_scan")
def cache_scan(codes: Tensor, values: Tensor, mean0: Tensor, count: Tensor, first_valid: Tensor | None, first: int,
               dtype: torch.dtype) -> Tensor:
    """(P, nb, S, D_v) in ``dtype``: means[p, n, s] = C_n[s] / max(count[p, n, s], 1), with C_n = mean0[p] *
    count[p, 0] (the carried sums) + the values of the keys of blocks 0..n-1 with code s at or after
    ``first_valid[p]`` (``first`` where first_valid is None).

    codes (P, nb, L) in [0, S), values (P, nb, L, D_v), mean0 (P, S, D_v) the carried means (read in float32),
    count (P, nb, S) float32 (count[:, 0] the carried counts), first_valid (P,) int32 or None. values may be
    strided (a view of the keys' values), its last dim dense.
    """
    return _scan(codes, values, mean0, count, first_valid, first, dtype, False)[0]


@cache_scan.register_fake
def _(codes, values, mean0, count, first_valid, first, dtype):
    P, nb, _ = codes.shape
    return values.new_empty(P, nb, *mean0.shape[1:], dtype=dtype)


@kernel_op("tvq_kernels::cache_scan_fold")
def cache_scan_fold(codes: Tensor, values: Tensor, mean0: Tensor, count: Tensor, first_valid: Tensor | None,
                    first: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(means, count', mean'): :func:`cache_scan`'s means, and from the same launch the cache after every block, the
    last one's keys folded in too (the state's after the chunk: count' (P, S) = count[:, nb - 1] + the last block's
    valid keys per code, mean' (P, S, D_v) = C_nb / count', or mean0 where count' is 0, as
    :func:`tvq.ops.cache.merge_cache` leaves an empty code's mean), both float32: the per-code sums the scan holds
    on chip, written once, instead of a second pass over the values (:func:`tvq.ops.kernels.code_sums.
    cache_fold_kernel`: two launches, the values read again, float32 partials)."""
    P, nb, L = codes.shape
    if not nb * L * mean0.shape[1] * mean0.shape[2]:
        raise ValueError(f"cache_scan_fold: one key, one code and one value column at least, got nb L {nb * L}, "
                         f"S {mean0.shape[1]} and D_v {mean0.shape[2]}")
    means, new_count, new_mean = _scan(codes, values, mean0, count, first_valid, first, dtype, True)
    return means, new_count, new_mean


@cache_scan_fold.register_fake
def _(codes, values, mean0, count, first_valid, first, dtype):
    P, nb, _ = codes.shape
    S, Dv = mean0.shape[1:]
    return (values.new_empty(P, nb, S, Dv, dtype=dtype), count.new_empty(P, S),
            mean0.new_empty(P, S, Dv, dtype=torch.float32))


@kernel_op("tvq_kernels::cache_scan_backward")
def cache_scan_backward(codes: Tensor, g_means: Tensor, count: Tensor, first_valid: Tensor | None, first: int,
                        values_dtype: torch.dtype, mean0_dtype: torch.dtype, n_rows: int,
                        gather: bool = True, g_fold: Tensor | None = None,
                        fold_count: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`cache_scan` given g_means (P, nb, S, D_v): g_values (P, n_rows, D_v) in ``values_dtype``
    (the gradient of a key list of n_rows >= nb L values whose first nb L are the blocks' keys: the rest get zero)
    and g_mean0 (P, S, D_v) in ``mean0_dtype``. With G_n = sum over n' >= n of g_means[:, n'] / max(count[:, n'], 1),
    a valid key of block n gets G_{n+1} at its code (an empty slot zero) and mean0 gets G_0 count[:, 0]. Without
    ``gather``, G_{n+1} (P, nb, S, D_v) in ``values_dtype`` instead of g_values, for a kernel that gathers it as it
    reads (:func:`tvq.ops.kernels.window_values.window_values_grad_values`): one launch and one (P, n_rows, D_v)
    tensor fewer. ``g_fold`` (P, S, D_v), with ``fold_count`` (P, S): the gradient of :func:`cache_scan_fold`'s
    mean' too (G_n then starts from g_fold / max(fold_count, 1), and mean0 gets g_fold where fold_count is 0)."""
    P, nb, L = codes.shape
    S, Dv = g_means.shape[2:]
    g_mean0 = g_means.new_empty(P, S, Dv, dtype=mean0_dtype)
    g_next = g_means.new_empty(P, nb, S, Dv, dtype=values_dtype)  # (P, nb, S, D_v) G_{n+1}
    if not gather and not g_mean0.numel():
        return g_next, g_mean0
    g_values = g_means.new_empty(P, n_rows, Dv, dtype=values_dtype)
    if not g_mean0.numel():
        return g_values.zero_(), g_mean0
    BS, BD = tile(S, 64), tile(Dv, 64)
    fold = g_fold is not None
    if fold and (fold_count is None or g_fold.shape != (P, S, Dv) or fold_count.shape != (P, S)):
        raise ValueError(f"cache_scan_backward: g_fold {(P, S, Dv)} and fold_count {(P, S)} expected, got "
                         f"{None if g_fold is None else tuple(g_fold.shape)} and "
                         f"{None if fold_count is None else tuple(fold_count.shape)}")
    _suffix_kernel[_grid(P, S, Dv, BS, BD)](g_means.contiguous(), count.contiguous(), g_next, g_mean0,
                                            g_fold.contiguous() if fold else g_next,
                                            fold_count.contiguous() if fold else count, nb, S, Dv, FOLD=fold,
                                            BS=BS, BD=BD)
    if not gather:
        return g_next, g_mean0
    BR, BD = 32, tile(Dv, 128)  # the rows after the blocks (the last window's M slots) reach no cache: zero
    _gather_kernel[(P * cdiv(n_rows, BR) * cdiv(Dv, BD),)](
        codes.contiguous(), g_next, first_valid if first_valid is not None else codes, g_values, first, nb, L, S,
        Dv, n_rows, PER_ROW=first_valid is not None, BR=BR, BD=BD)
    return g_values, g_mean0


@cache_scan_backward.register_fake
def _(codes, g_means, count, first_valid, first, values_dtype, mean0_dtype, n_rows, gather=True, g_fold=None,
      fold_count=None):
    P, nb, L = codes.shape
    S, Dv = g_means.shape[2:]
    first_out = (P, n_rows, Dv) if gather else (P, nb, S, Dv)
    return g_means.new_empty(first_out, dtype=values_dtype), g_means.new_empty(P, S, Dv, dtype=mean0_dtype)


@register_flops("tvq_kernels::cache_scan")
def _(codes, values, mean0, count, first_valid, first, dtype):
    """The one-hot products: (S, L) @ (L, D_v) per block but the last, in the values' dtype."""
    P, nb, L = codes.shape
    return str(values.dtype).removeprefix("torch."), 2 * P * max(nb - 1, 0) * L * mean0.shape[1] * mean0.shape[2]


@register_flops("tvq_kernels::cache_scan_fold")
def _(codes, values, mean0, count, first_valid, first, dtype):
    """The one-hot products: (S, L) @ (L, D_v) per block, in the values' dtype."""
    P, nb, L = codes.shape
    return str(values.dtype).removeprefix("torch."), 2 * P * nb * L * mean0.shape[1] * mean0.shape[2]


@register_flops("tvq_kernels::cache_scan_backward")
def _(codes, g_means, count, first_valid, first, values_dtype, mean0_dtype, n_rows, gather=True, g_fold=None,
      fold_count=None):
    """No products: a suffix sum over blocks and a gather."""
    return str(values_dtype).removeprefix("torch."), 0


@register_launches("tvq_kernels::cache_scan_backward")
def _(codes, g_means, count, first_valid, first, values_dtype, mean0_dtype, n_rows, gather=True, g_fold=None,
      fold_count=None):
    """The suffix scan and the gather; scratch: G_{n+1} (P, nb, S, D_v) in the values' dtype, written whole and read
    at each key's code (nb L rows of D_v). Without ``gather`` the suffix scan alone, G_{n+1} its output."""
    P, nb, L = codes.shape
    S, Dv = g_means.shape[2:]
    size = torch.empty((), dtype=values_dtype).element_size()
    return (2, P * nb * (S + L) * Dv * size) if gather else (1, 0)


@triton.jit
def count_blocks(old_ptr, new_ptr, M, count0_ptr, out_ptr, p, ts, first, nb, L, S, BS: tl.constexpr,
                 BL: tl.constexpr):
    """BS codes (tile ts) of row p: out[p, n] = count0[p] + the valid keys (key-list index >= first) of blocks
    0..n-1 per code (int32 on chip), in float32; the row's key-list codes are old_ptr[i] for i < M, then
    new_ptr[i - M] (M 0: one list). Also run by :mod:`tvq.ops.kernels.window_join`'s launch, which writes that list."""
    s = ts * BS + tl.arange(0, BS)  # (BS,)
    s_ok = s < S
    run = tl.load(count0_ptr + p * S + s, mask=s_ok, other=0.0)  # (BS,) float32
    for n in range(0, nb):
        tl.store(out_ptr + (p * nb + n) * S + s, run, mask=s_ok)
        if n + 1 < nb:  # the last block's keys reach no block's cache
            hits = tl.zeros((BS,), dtype=tl.int32)
            for r0 in range(0, L, BL):
                i = n * L + r0 + tl.arange(0, BL)  # (BL,) key-list index
                keep = (r0 + tl.arange(0, BL) < L) & (i >= first)
                code = tl.load(old_ptr + i, mask=keep & (i < M), other=-1)  # (BL,), -1: no code
                code = tl.where(i < M, code, tl.load(new_ptr + (i - M), mask=keep & (i >= M), other=-1))
                hits += tl.sum((code[None, :] == s[:, None]).to(tl.int32), 1)
            run += hits.to(tl.float32)


@triton.jit
def _block_counts_kernel(codes_ptr, first_ptr, count0_ptr, out_ptr, first_valid, nb, L, S, stride_cp,
                         PER_ROW: tl.constexpr, BS: tl.constexpr, BL: tl.constexpr):
    """BS codes of row p: :func:`count_blocks` of its codes."""
    pid = tl.program_id(0).to(tl.int64)
    n_s = tl.cdiv(S, BS)
    ts, p = pid % n_s, pid // n_s
    first = tl.load(first_ptr + p) if PER_ROW else first_valid
    row = codes_ptr + p * stride_cp
    count_blocks(row, row, 0, count0_ptr, out_ptr, p, ts, first, nb, L, S, BS, BL)


@kernel_op("tvq_kernels::block_counts")
def block_counts(codes: Tensor, count0: Tensor, first_valid: Tensor | None, first: int, nb: int,
                 L: int) -> Tensor:
    """(P, nb, S) float32: count0 (P, S) plus, per code, the valid keys of blocks 0..n-1 of codes (P, >= nb L)
    (rows may be strided, the last dim dense); keys before first_valid[p] (P,) int32, or ``first`` where
    first_valid is None, are empty slots."""
    P, S = count0.shape
    out = count0.new_empty(P, nb, S)
    if not out.numel():
        return out
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    BS, BL = tile(S, 64), tile(L, 64)
    _block_counts_kernel[(P * cdiv(S, BS),)](
        codes, first_valid if first_valid is not None else codes, count0.contiguous(), out, first, nb, L, S,
        codes.stride(0), PER_ROW=first_valid is not None, BS=BS, BL=BL)
    return out


@block_counts.register_fake
def _(codes, count0, first_valid, first, nb, L):
    return count0.new_empty(count0.shape[0], nb, count0.shape[1])


def block_counts_kernel(codes: Tensor, count0: Tensor, first_valid: int | Tensor, nb: int, L: int) -> Tensor:
    """Each block's cache counts (P, nb, S) float32 (no gradient): the kernel twin of
    :func:`tvq.ops.cache.block_counts` for P = B H rows; codes (P, >= nb L), count0 (P, S) float32, first_valid an
    int or one per row (P,)."""
    if isinstance(first_valid, Tensor):
        return block_counts(codes, count0, first_valid.to(dtype=torch.int32).contiguous(), 0, nb, L)
    return block_counts(codes, count0, None, int(first_valid), nb, L)


def _row_groups(P: int, nb: int, S: int, Dv: int, dtype: torch.dtype) -> list[slice]:
    """Groups of rows whose means (P', nb, S, D_v) stay under :data:`_CHUNK_BYTES`."""
    size = max(1, _CHUNK_BYTES // max(1, nb * S * Dv * dtype.itemsize))
    return [slice(r, min(r + size, P)) for r in range(0, P, size)]


def cache_means(weights: Tensor, codes: Tensor, values: Tensor, mean0: Tensor, count: Tensor,
                first_valid: Tensor | None, first: int, fold: bool = False):
    """The scan over row groups whose means stay under :data:`_CHUNK_BYTES`: yields (rows, means (P', nb, S, D_v)
    in weights' dtype), with ``fold`` (rows, means, (count' (P', S), mean' (P', S, D_v)): the cache after every
    block, :func:`cache_scan_fold`). Arguments as :func:`cache_read_args` returns them."""
    P, nb, L, S = weights.shape
    blocks = values[:, : nb * L].unflatten(1, (nb, L))  # (P, nb, L, D_v), a view
    for r in _row_groups(P, nb, S, values.shape[-1], weights.dtype):
        args = (codes[r], blocks[r], mean0[r], count[r], _rows(first_valid, r), first, weights.dtype)
        if fold:
            means, *state = cache_scan_fold(*args)
            yield r, means, state
        else:
            yield r, cache_scan(*args)


def _rows(first_valid: Tensor | None, r: slice) -> Tensor | None:
    """A row group's first valid keys (None: one int for all rows)."""
    return None if first_valid is None else first_valid[r]


def keep_means(weights: Tensor, values: Tensor) -> bool:
    """Whether backward gets the forward's means (saved) rather than recomputing them: where they are no larger than
    the blocks' values (S <= L) and of one row group (enwik8: S = L = 512, the same 2 bytes per value element that a
    recomputation would write and read again)."""
    P, nb, L, S = weights.shape
    return S <= L and len(_row_groups(P, nb, S, values.shape[-1], weights.dtype)) == 1


def cache_read_backward(grad: Tensor, weights: Tensor, codes: Tensor, values: Tensor, mean0: Tensor, count: Tensor,
                        first_valid: Tensor | None, first: int, saved_means: Tensor | None, need_w: bool,
                        keys_too: bool, gather: bool = True, fold: tuple[Tensor, Tensor] | None = None
                        ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of the cache read (weights, values (P, N, D_v) whole, mean0; None where not asked):
    g_weights = grad @ means^T and g_means = weights^T @ grad (GEMMs in the compute dtype), the latter through the
    reverse scan. Without ``gather`` the scan's G_{n+1} (P, nb, S, D_v) in place of the values' gradient (see
    :func:`cache_scan_backward`). ``fold`` = (g_fold, count'): the gradient of the state's mean that the scan
    folded (:func:`cache_scan_fold`) joins the reverse scan's."""
    P, nb, L, S = weights.shape
    N, Dv = values.shape[1:]
    blocks = values[:, : nb * L].unflatten(1, (nb, L))  # (P, nb, L, D_v)
    grad = grad.to(weights.dtype)  # (P, nb, L, D_v)
    g_w, g_v, g_m = [], [], []
    for r in _row_groups(P, nb, S, Dv, weights.dtype):
        fv = _rows(first_valid, r)
        if need_w:
            means = saved_means if saved_means is not None else cache_scan(
                codes[r], blocks[r], mean0[r], count[r], fv, first, weights.dtype)
            g_w.append(grad[r] @ means.transpose(-1, -2))  # (P', nb, L, S)
            del means
        if keys_too:
            g_means = weights[r].transpose(-1, -2) @ grad[r]  # (P', nb, S, D_v)
            g_values, g_mean0 = cache_scan_backward(codes[r], g_means, count[r], fv, first, values.dtype,
                                                    mean0.dtype, N, gather,
                                                    *((fold[0][r], fold[1][r]) if fold is not None else ()))
            g_v.append(g_values)
            g_m.append(g_mean0)
            del g_means
    return join(g_w), join(g_v), join(g_m)


class _CacheRead(torch.autograd.Function):
    """out[:, n] = weights[:, n] @ means_n (the means from :func:`cache_means`; :func:`cache_read_backward`). ``values`` is
    the whole key list (P, N, D_v), its first nb L rows the blocks' keys: the reverse scan writes its gradient whole
    (the rest zero), so that no slice's backward pads it."""

    @staticmethod
    def forward(ctx, weights, codes, values, mean0, count, first_valid, first):
        out, means = [], None
        for r, means in cache_means(weights, codes, values, mean0, count, first_valid, first):
            out.append(weights[r] @ means)  # (P', nb, L, D_v)
        saved = means if ctx.needs_input_grad[0] and keep_means(weights, values) else None
        ctx.save_for_backward(weights, codes, values, mean0, count, first_valid, saved)
        ctx.first = first
        return join(out)

    @staticmethod
    def backward(ctx, grad):
        need_w, keys_too = ctx.needs_input_grad[0], ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        weights, codes, values, mean0, count, first_valid, saved = ctx.saved_tensors
        g_w, g_v, g_m = cache_read_backward(grad, weights, codes, values, mean0, count, first_valid, ctx.first, saved,
                                            need_w, keys_too)
        return g_w, None, g_v, g_m, None, None, None


def join(parts: list[Tensor]) -> Tensor | None:
    """The row groups' parts of one result (None: not computed); no copy for a single group."""
    return None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts)


def cache_read_kernel(weights: Tensor, codes: Tensor, values: Tensor, mean0: Tensor, count: Tensor,
                      first_valid: int | Tensor) -> Tensor:
    """The cache's share of each block's output, (P, nb, L, D_v) in ``weights``' dtype:
    out[:, n] = weights[:, n] @ (C_n / max(count[:, n], 1)), C_n as in :func:`tvq.ops.cache.cache_read` with the
    carried sums ``start = count[:, 0, :, None] * mean0``.

    weights (P, nb, L, S) are the cache's softmax weights NOT divided by the count (the scan divides),
    codes (P, nb, L), values (P, N, D_v) the key list (N >= nb L; its first nb L rows are the blocks' keys, the
    rest reach no cache and get a zero gradient), mean0 (P, S, D_v) the carried cache's means (read in float32;
    its gradient in its dtype), count (P, nb, S) each block's counts (no gradient; count[:, 0] the carried ones),
    ``first_valid`` an int or one per row (P,): keys before it are empty slots. Gradients reach weights, values
    and mean0.
    """
    return _CacheRead.apply(*cache_read_args(weights, codes, values, mean0, count, first_valid))


def cache_read_args(weights: Tensor, codes: Tensor, values: Tensor, mean0: Tensor, count: Tensor,
                    first_valid: int | Tensor) -> tuple:
    """:func:`cache_read_kernel`'s arguments checked and in the kernels' layout: mean0 contiguous, count float32 and
    contiguous (detached), then the first valid keys as (P,) int32 and 0 (one per row) or None and the int."""
    P, nb, L, S = weights.shape
    Dv = values.shape[-1]
    if codes.shape != (P, nb, L) or values.dim() != 3 or values.shape[0] != P or values.shape[1] < nb * L \
            or mean0.shape != (P, S, Dv) or count.shape != (P, nb, S):
        raise ValueError(f"cache_read_kernel: weights (P, nb, L, S), codes (P, nb, L), values (P, N >= nb L, D_v), "
                         f"mean0 (P, S, D_v) and count (P, nb, S) expected, got {tuple(weights.shape)}, "
                         f"{tuple(codes.shape)}, {tuple(values.shape)}, {tuple(mean0.shape)} and {tuple(count.shape)}")
    if isinstance(first_valid, Tensor):
        first_valid, first = first_valid.to(device=codes.device, dtype=torch.int32).expand(P).contiguous(), 0
    else:
        first_valid, first = None, int(first_valid)
    return (weights, codes.contiguous(), values, mean0.contiguous(), count.detach().to(torch.float32).contiguous(),
            first_valid, first)
