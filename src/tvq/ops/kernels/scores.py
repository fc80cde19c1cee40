"""The scores and softmax of :func:`tvq.ops.blockwise_attention` as one fused Triton kernel (forward and backward).

Block n of L queries of a row p (P = B H rows) scores a window of W = M + L keys and, with the compressive
cache, its S codewords. Today that is ~8 full passes over (P, nb, L, W + S) tensors: the content product,
the skewed positional matrix (a pad and a copy), its masks, the cache scores, a ``cat``, the softmax, the
split and ``p_cache / count``. Here one program owns a tile of query rows of one (p, n): it reads the window's
keys straight from ``keys`` by offset (no window copy), adds the positional term ``pos[a, M + a - w]`` (``pos =
qv @ rel^T`` (P, nb, L, M + 1), by distance, comes from the query-bias kernel of :mod:`tvq.ops.kernels.query_bias`,
which keeps rel's and v's gradients there), masks
by distance and empty slots, scores the codewords, and writes the softmax weights once in the values' dtype
(plus a float32 log-sum-exp per row for backward). Backward recomputes the weights from the saved inputs and
the log-sum-exp and writes ``ds`` (in the compute dtype) and the un-skewed ``d_pos`` in one launch, which also
sums ``g_qu = ds_win @ key windows + ds_cache @ codebook`` on chip (FlashAttention's dQ: a program holds every
column of its query rows, and the key and codeword tiles are those its score recompute reads). The keys'
gradient, each key's sum over the windows that hold it of its kept ``ds_win^T @ qu``, runs on the window kernel
of :mod:`tvq.ops.kernels.window_values` as its values' gradient (p := ds_win, grad := qu) with the
straight-through rule as its ``keep`` (none, "own": w >= M, "near": w >= a): no key window is copied, no
(nb, W, D_k) gradient is written and summed, no masked copy of ds_win is made. Only the codebook's (S-wide)
gradient stays in PyTorch. The
cache's weights come out as they are (``p_cache``: the cache scan of :mod:`tvq.ops.kernels.cache_scan` divides
by the count) or divided by max(count, 1) (``divide``: ``p_mean``).

The softmax is online (a running max and sum over the column tiles), then a second sweep recomputes each
tile's scores and writes the normalised weights: the weights must be written normalised, and recomputing a
(rows x D_k) @ (D_k x cols) tile is cheaper than writing unnormalised weights and rescaling them in HBM.

Why scores and the D_v-wide products are split rather than one FlashAttention-style kernel: the output of a
tile of query rows is a (rows x D_v) float32 accumulator, plus the cache's running (S x D_v) sums; at D_v 1536
(enwik8) 64 rows alone take 384 KiB, more than one SM's registers and shared memory, so the weights go through
HBM once and the D_v-wide products (window values, :mod:`tvq.ops.kernels.cache_scan`) stay separate GEMMs.

Bytes per query and head (rough), with C = W + S score columns, a 2-byte compute and values dtype and float32
scores: today's forward writes and reads the content product (2 + 2 per column), the skewed positional matrix
(2 + 2), their sum and its float32 copy (2 + 2 + 4), the cache scores and their log-count and bias adds (~20 per
codeword), the ``cat`` (4 + 4), the softmax (4 + 4), the weights' cast (4 + 2) and ``p_cache / count`` (~14 per
codeword): ~60 C. Here the weights are written once (2 C) and the inputs' rows read once per sweep (L2-resident).
Backward today: ~50 C (softmax backward, the casts', split's, cat's, skew's and masks' backward); here ~10 C
(the upstream gradients read in two sweeps 4, ds written 2, the keys' gradient kernel's read of ds 2; d_pos is
M + 1 wide). enwik8 (W 1024, S 512: C 1536): ~170 KB against ~18 KB per token and layer.
The D_k-wide gradients, per query in units of D_k bytes, with r = W / L windows holding each key (2 at enwik8):
in PyTorch ``unfold``'s copy of the key windows (keys read 2 r, the copy written 2 r), the GEMM's read of it
(2 r), the window gradients of ``ds_win^T @ qu`` (2 r) and their fold (a zero fill 2, 2 r read, 4 r added), plus
the straight-through ``where``'s copy of ds_win (4 C bytes): ~14 r + 2, and 4 C. Here the score kernel's tiles
give g_qu (written once, 2) and the keys' gradient kernel reads qu r times (after the first from L2 when the
blocks run close together) and writes the keys' gradient once (2): ~6 to 2 r + 4; the cache's share of g_qu,
written and read apart in PyTorch (4), is summed on chip with the rest. enwik8 (D_k 128): ~10 KB (6 of them the
``where``) against ~1-1.5 KB per token and layer.
Estimates from the shapes, not measured (no GPU was at hand).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from tvq.ops.kernels import kernel_op, register_flops
from tvq.ops.kernels.common import cdiv, dot_options, tile
from tvq.ops.kernels.window_values import KEEP_MODES, window_values_grad_values


# largest tiles of query rows, window columns and codeword columns (tests shrink them to exercise several tiles)
TILES = {"rows": 64, "window": 64, "cache": 64}


def _precision(dtype: torch.dtype) -> str:
    """The PRECISION of :func:`_dot`: :func:`tvq.ops.kernels.common.dot_options`' own, or "upcast" where it says
    UPCAST (bfloat16 in the interpreter: the operands cast to float32, then "ieee")."""
    options = dot_options(dtype)
    return "upcast" if options["UPCAST"] else options["PRECISION"]


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b in float32, as :func:`_precision` says."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _window_scores(qu, a, w, n, k_row, sk_t, sk_d, pos_row, L, M, W, D, ninv, bias,
                   AGG: tl.constexpr, PER_ROW: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    """(BA, BW) float32 scores of query rows a of block n against window slots w, masked with -inf, and the keys'
    tile it read, (BD, BW) (backward multiplies the scores' gradient by it).

    Slot w holds key n L + w, at distance M + a - w from query a: near (0 <= w - a <= M) content +
    pos[a, M + a - w], old (w < a) content + bias with the cache (else -inf), future (w - a > M) -inf;
    an empty slot (key index < ninv) is -inf, per row only for the real queries (index >= ninv)."""
    d = tl.arange(0, BD)
    slot = n * L + w  # (BW,) key index
    k = tl.load(k_row + slot[None, :] * sk_t + d[:, None] * sk_d,
                mask=(w[None, :] < W) & (d[:, None] < D), other=0.0)  # (BD, BW)
    s = _dot(qu, k, PRECISION)  # (BA, BW) float32
    j = w[None, :] - a[:, None]  # (BA, BW): M - distance
    near = (j >= 0) & (j <= M)
    s += tl.load(pos_row + a[:, None] * (M + 1) + (M - j), mask=near & (a[:, None] < L), other=0.0).to(tl.float32)
    if AGG:
        s = tl.where(j < 0, s + bias, s)
        seen = j <= M
    else:
        seen = near
    empty = slot[None, :] < ninv
    if PER_ROW:
        empty = empty & ((M + n * L + a)[:, None] >= ninv)
    return tl.where(seen & (w[None, :] < W) & ~empty, s, float("-inf")), k


@triton.jit
def _cache_scores(qu, c, cb_row, count_row, S, D, bias, BD: tl.constexpr, PRECISION: tl.constexpr):
    """(BA, BS) float32 scores of the codewords c: qu . codebook[c] + log count[c] + bias (-inf where the count
    is 0), the counts (BS,) and the codebook's tile it read, (BD, BS)."""
    d = tl.arange(0, BD)
    cb = tl.load(cb_row + c[None, :] * D + d[:, None], mask=(c[None, :] < S) & (d[:, None] < D), other=0.0)  # (BD, BS)
    count = tl.load(count_row + c, mask=c < S, other=0.0)  # (BS,)
    s = _dot(qu, cb, PRECISION) + bias  # (BA, BS)
    return tl.where((count > 0)[None, :], s + tl.log(tl.maximum(count, 1.0))[None, :], float("-inf")), count, cb


@triton.jit
def _online(m, l, s):
    """Running row max m and sum l of exp(scores - m), updated with the tile s (rows of -inf stay safe)."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)


@triton.jit
def _row_setup(qu_ptr, k_ptr, pos_ptr, cb_ptr, count_ptr, bias_ptr, ninv_ptr, ninv_int, H, nb, L, M, S, D,
               sq_b, sq_h, sq_n, sq_l, sq_d, sk_b, sk_h, sc_h, sn_b, sn_h,
               HAS_BIAS: tl.constexpr, PER_ROW: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr):
    """This program's (p, n), its query rows a, their qu (BA, BD) and the bases of its rows of the inputs (the
    codebook's head and the counts' batch and head by strides: an mqa sublayer's one head expanded, stride 0)."""
    pn = tl.program_id(0).to(tl.int64)  # p nb + n
    p, n = pn // nb, pn % nb
    b, h = p // H, p % H
    a = tl.program_id(1) * BA + tl.arange(0, BA)  # (BA,)
    d = tl.arange(0, BD)
    qu = tl.load(qu_ptr + b * sq_b + h * sq_h + n * sq_n + a[:, None] * sq_l + d[None, :] * sq_d,
                 mask=(a[:, None] < L) & (d[None, :] < D), other=0.0)  # (BA, BD)
    if PER_ROW:
        ninv = tl.load(ninv_ptr + b)
    else:
        ninv = ninv_int
    if HAS_BIAS:
        bias = tl.load(bias_ptr + h).to(tl.float32)
    else:
        bias = 0.0
    return (pn, n, a, qu, k_ptr + b * sk_b + h * sk_h, pos_ptr + pn * L * (M + 1), cb_ptr + h * sc_h,
            count_ptr + b * sn_b + h * sn_h + n * S, ninv, bias)


@triton.jit
def _scores_fwd_kernel(qu_ptr, k_ptr, pos_ptr, cb_ptr, count_ptr, bias_ptr, ninv_ptr, p_win_ptr, p_cache_ptr,
                       lse_ptr, ninv_int, H, nb, L, M, W, S, D,
                       sq_b, sq_h, sq_n, sq_l, sq_d, sk_b, sk_h, sk_t, sk_d, sc_h, sn_b, sn_h,
                       AGG: tl.constexpr, HAS_BIAS: tl.constexpr, PER_ROW: tl.constexpr, DIVIDE: tl.constexpr,
                       BA: tl.constexpr, BW: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Softmax weights of BA query rows of one (p, n): a sweep for the row max and sum (online), a sweep that
    recomputes each tile and writes p_win (and p_cache, divided by max(count, 1) under DIVIDE), and the lse."""
    pn, n, a, qu, k_row, pos_row, cb_row, count_row, ninv, bias = _row_setup(
        qu_ptr, k_ptr, pos_ptr, cb_ptr, count_ptr, bias_ptr, ninv_ptr, ninv_int, H, nb, L, M, S, D,
        sq_b, sq_h, sq_n, sq_l, sq_d, sk_b, sk_h, sc_h, sn_b, sn_h, HAS_BIAS, PER_ROW, BA, BD)
    a_ok = a < L
    m = tl.full((BA,), float("-inf"), tl.float32)
    l = tl.zeros((BA,), tl.float32)
    for w0 in range(0, W, BW):
        s, _ = _window_scores(qu, a, w0 + tl.arange(0, BW), n, k_row, sk_t, sk_d, pos_row, L, M, W, D, ninv,
                              bias, AGG, PER_ROW, BD, PRECISION)
        m, l = _online(m, l, s)
    if AGG:
        for c0 in range(0, S, BS):
            s, count, _ = _cache_scores(qu, c0 + tl.arange(0, BS), cb_row, count_row, S, D, bias, BD, PRECISION)
            m, l = _online(m, l, s)
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(l)  # (BA,)
    tl.store(lse_ptr + pn * L + a, lse, mask=a_ok)
    rows = pn * L + a  # (BA,) output rows
    for w0 in range(0, W, BW):
        w = w0 + tl.arange(0, BW)
        s, _ = _window_scores(qu, a, w, n, k_row, sk_t, sk_d, pos_row, L, M, W, D, ninv, bias,
                              AGG, PER_ROW, BD, PRECISION)
        p = tl.exp(s - lse[:, None])
        tl.store(p_win_ptr + rows[:, None] * W + w[None, :], p.to(p_win_ptr.dtype.element_ty),
                 mask=a_ok[:, None] & (w[None, :] < W))
    if AGG:
        for c0 in range(0, S, BS):
            c = c0 + tl.arange(0, BS)
            s, count, _ = _cache_scores(qu, c, cb_row, count_row, S, D, bias, BD, PRECISION)
            p = tl.exp(s - lse[:, None])
            if DIVIDE:
                p = p / tl.maximum(count, 1.0)[None, :]
            tl.store(p_cache_ptr + rows[:, None] * S + c[None, :], p.to(p_cache_ptr.dtype.element_ty),
                     mask=a_ok[:, None] & (c[None, :] < S))


@triton.jit
def _scores_bwd_kernel(qu_ptr, k_ptr, pos_ptr, cb_ptr, count_ptr, bias_ptr, ninv_ptr, lse_ptr, g_win_ptr,
                       g_cache_ptr, ds_win_ptr, ds_cache_ptr, d_pos_ptr, d_bias_ptr, g_qu_ptr,
                       ninv_int, H, nb, L, M, W, S, D,
                       sq_b, sq_h, sq_n, sq_l, sq_d, sk_b, sk_h, sk_t, sk_d, sc_h, sn_b, sn_h,
                       AGG: tl.constexpr, HAS_BIAS: tl.constexpr, PER_ROW: tl.constexpr, DIVIDE: tl.constexpr,
                       BA: tl.constexpr, BW: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                       PRECISION: tl.constexpr):
    """ds = p (dp - delta), delta = rowsum(p dp), for BA query rows of one (p, n), p recomputed from the lse:
    a sweep for delta, a sweep writing ds_win, ds_cache, d_pos[a, d] = ds_win[a, M + a - d] (0 <= d <= M),
    each row's sum of ds over the columns that carry the cache bias (old slots and codewords), and qu's gradient
    ds_win @ keys + ds_cache @ codebook, summed on chip from the tiles the scores read (ds in the compute dtype,
    sums in float32): the program holds all of its rows' columns, so no other program adds to its rows."""
    pn, n, a, qu, k_row, pos_row, cb_row, count_row, ninv, bias = _row_setup(
        qu_ptr, k_ptr, pos_ptr, cb_ptr, count_ptr, bias_ptr, ninv_ptr, ninv_int, H, nb, L, M, S, D,
        sq_b, sq_h, sq_n, sq_l, sq_d, sk_b, sk_h, sc_h, sn_b, sn_h, HAS_BIAS, PER_ROW, BA, BD)
    a_ok = a < L
    rows = pn * L + a  # (BA,)
    lse = tl.load(lse_ptr + rows, mask=a_ok, other=0.0)  # (BA,)
    delta = tl.zeros((BA,), tl.float32)
    for w0 in range(0, W, BW):
        w = w0 + tl.arange(0, BW)
        s, _ = _window_scores(qu, a, w, n, k_row, sk_t, sk_d, pos_row, L, M, W, D, ninv, bias,
                              AGG, PER_ROW, BD, PRECISION)
        g = tl.load(g_win_ptr + rows[:, None] * W + w[None, :], mask=a_ok[:, None] & (w[None, :] < W),
                    other=0.0).to(tl.float32)
        delta += tl.sum(tl.exp(s - lse[:, None]) * g, 1)
    if AGG:
        for c0 in range(0, S, BS):
            c = c0 + tl.arange(0, BS)
            s, count, _ = _cache_scores(qu, c, cb_row, count_row, S, D, bias, BD, PRECISION)
            g = tl.load(g_cache_ptr + rows[:, None] * S + c[None, :], mask=a_ok[:, None] & (c[None, :] < S),
                        other=0.0).to(tl.float32)
            if DIVIDE:
                g = g / tl.maximum(count, 1.0)[None, :]
            delta += tl.sum(tl.exp(s - lse[:, None]) * g, 1)
    biased = tl.zeros((BA,), tl.float32)
    g_qu = tl.zeros((BA, BD), tl.float32)
    for w0 in range(0, W, BW):
        w = w0 + tl.arange(0, BW)
        s, k = _window_scores(qu, a, w, n, k_row, sk_t, sk_d, pos_row, L, M, W, D, ninv, bias,
                              AGG, PER_ROW, BD, PRECISION)
        in_tile = a_ok[:, None] & (w[None, :] < W)
        g = tl.load(g_win_ptr + rows[:, None] * W + w[None, :], mask=in_tile, other=0.0).to(tl.float32)
        ds = tl.exp(s - lse[:, None]) * (g - delta[:, None])  # (BA, BW)
        ds_c = ds.to(ds_win_ptr.dtype.element_ty)  # in the compute dtype, as written and as multiplied
        tl.store(ds_win_ptr + rows[:, None] * W + w[None, :], ds_c, mask=in_tile)
        g_qu += _dot(ds_c, tl.trans(k), PRECISION)  # (BA, BD): ds_win @ the window's keys
        j = w[None, :] - a[:, None]
        tl.store(d_pos_ptr + rows[:, None] * (M + 1) + (M - j), ds.to(d_pos_ptr.dtype.element_ty),
                 mask=in_tile & (j >= 0) & (j <= M))
        if AGG:
            biased += tl.sum(tl.where(j < 0, ds, 0.0), 1)
    if AGG:
        for c0 in range(0, S, BS):
            c = c0 + tl.arange(0, BS)
            s, count, cb = _cache_scores(qu, c, cb_row, count_row, S, D, bias, BD, PRECISION)
            in_tile = a_ok[:, None] & (c[None, :] < S)
            g = tl.load(g_cache_ptr + rows[:, None] * S + c[None, :], mask=in_tile, other=0.0).to(tl.float32)
            if DIVIDE:
                g = g / tl.maximum(count, 1.0)[None, :]
            ds = tl.exp(s - lse[:, None]) * (g - delta[:, None])  # (BA, BS)
            biased += tl.sum(tl.where(in_tile, ds, 0.0), 1)
            ds = ds.to(ds_cache_ptr.dtype.element_ty)
            tl.store(ds_cache_ptr + rows[:, None] * S + c[None, :], ds, mask=in_tile)
            g_qu += _dot(ds, tl.trans(cb), PRECISION)  # (BA, BD): ds_cache @ the codebook
        tl.store(d_bias_ptr + rows, biased, mask=a_ok)
    d = tl.arange(0, BD)
    tl.store(g_qu_ptr + rows[:, None] * D + d[None, :], g_qu.to(g_qu_ptr.dtype.element_ty),
             mask=a_ok[:, None] & (d[None, :] < D))


def _dense_rows(t: Tensor) -> bool:
    """Whether t's last two dims are dense (unit stride, rows one after another); its leading strides are free."""
    return t.stride(-1) == 1 and (t.shape[-2] <= 1 or t.stride(-2) == t.shape[-1])


def _launch_args(qu, keys, pos, codebook, count, cache_bias, n_invalid, n_invalid_int):
    """The shared leading arguments of both kernels, their meta-parameters and grid."""
    B, H, nb, L, D = qu.shape
    M = pos.shape[-1] - 1
    agg = codebook is not None
    S = codebook.shape[1] if agg else 0
    dummy = pos  # stands for absent tensors (never read: their constexpr flag is off)
    BA, BW, BS = tile(L, TILES["rows"]), tile(M + L, TILES["window"]), tile(max(S, 1), TILES["cache"])
    meta = dict(AGG=agg, HAS_BIAS=cache_bias is not None, PER_ROW=n_invalid is not None,
                BA=BA, BW=BW, BS=BS, BD=tile(D, 2**30), PRECISION=_precision(qu.dtype))
    if agg:  # read in place where each head's (S, D_k) codebook and (nb, S) counts are dense (an expanded head too)
        codebook = codebook if _dense_rows(codebook) else codebook.contiguous()
        count = count if _dense_rows(count) else count.contiguous()
    inputs = (qu, keys, pos.contiguous(), codebook if agg else dummy, count if agg else dummy,
              cache_bias.contiguous() if cache_bias is not None else dummy,
              n_invalid.contiguous() if n_invalid is not None else dummy)
    heads = (codebook.stride(0), count.stride(0), count.stride(1)) if agg else (0, 0, 0)
    sizes = (n_invalid_int, H, nb, L, M, M + L, S, D, *qu.stride(), *keys.stride(), *heads)
    return inputs, sizes, meta, (B * H * nb, cdiv(L, BA))


@kernel_op("tvq_kernels::window_scores")
def window_scores(qu: Tensor, keys: Tensor, pos: Tensor, codebook: Tensor | None, count: Tensor | None,
                  cache_bias: Tensor | None, n_invalid: Tensor | None, n_invalid_int: int, divide: bool,
                  out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The softmax of one block's window and cache scores: p_win (B, H, nb, L, W) and p_cache (B, H, nb, L, S)
    in ``out_dtype`` (p_cache divided by max(count, 1) under ``divide``; S = 0 without a codebook), and the
    row log-sum-exp (B, H, nb, L) float32.

    qu (B, H, nb, L, D_k) and keys (B, H, M + nb L, D_k) in one dtype (any strides), pos (B, H, nb, L, M + 1)
    the positional scores, codebook (H, S, D_k) and count (B, H, nb, S) float32 (both or neither: the cache),
    cache_bias (H,) or None, n_invalid (B,) per row (left padding) or None and ``n_invalid_int`` for all rows.
    """
    B, H, nb, L, _ = qu.shape
    W, S = pos.shape[-1] - 1 + L, codebook.shape[1] if codebook is not None else 0
    p_win = qu.new_empty(B, H, nb, L, W, dtype=out_dtype)
    p_cache = qu.new_empty(B, H, nb, L, S, dtype=out_dtype)
    lse = qu.new_empty(B, H, nb, L, dtype=torch.float32)
    inputs, sizes, meta, grid = _launch_args(qu, keys, pos, codebook, count, cache_bias, n_invalid, n_invalid_int)
    # an empty p_cache (no cache) is never written: lse stands for it (no null pointer reaches the launch)
    _scores_fwd_kernel[grid](*inputs, p_win, p_cache if S else lse, lse, *sizes, DIVIDE=divide, **meta)
    return p_win, p_cache, lse


@window_scores.register_fake
def _(qu, keys, pos, codebook, count, cache_bias, n_invalid, n_invalid_int, divide, out_dtype):
    B, H, nb, L, _ = qu.shape
    W, S = pos.shape[-1] - 1 + L, codebook.shape[1] if codebook is not None else 0
    return (qu.new_empty(B, H, nb, L, W, dtype=out_dtype), qu.new_empty(B, H, nb, L, S, dtype=out_dtype),
            qu.new_empty(B, H, nb, L, dtype=torch.float32))


@kernel_op("tvq_kernels::window_scores_backward")
def window_scores_backward(qu: Tensor, keys: Tensor, pos: Tensor, codebook: Tensor | None, count: Tensor | None,
                           cache_bias: Tensor | None, n_invalid: Tensor | None, n_invalid_int: int, divide: bool,
                           lse: Tensor, g_win: Tensor, g_cache: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the scores given those of :func:`window_scores`' weights: ds_win (B, H, nb, L, W) and
    ds_cache (B, H, nb, L, S) in qu's dtype (the compute dtype, as the GEMMs that read them), d_pos
    (B, H, nb, L, M + 1) = ds_win[a, M + a - d] (distance d) in pos's dtype, the per-row sum of ds over the
    columns that carry the cache bias (B, H, nb, L) float32 (zeros without the cache), and qu's gradient
    (B, H, nb, L, D_k) = ds_win @ each block's key window + ds_cache @ codebook, in qu's dtype."""
    B, H, nb, L, D = qu.shape
    W, S = pos.shape[-1] - 1 + L, g_cache.shape[-1]
    ds_win = qu.new_empty(B, H, nb, L, W)
    ds_cache = qu.new_empty(B, H, nb, L, S)
    d_pos = pos.new_empty(pos.shape)  # every entry written: slot M + a - d is in the window for 0 <= d <= M
    # every row written by the kernel where there is a cache; zeros (a fill) only without one
    d_bias = (qu.new_empty if S else qu.new_zeros)(B, H, nb, L, dtype=torch.float32)
    g_qu = qu.new_empty(B, H, nb, L, D)
    inputs, sizes, meta, grid = _launch_args(qu, keys, pos, codebook, count, cache_bias, n_invalid, n_invalid_int)
    cache_io = (g_cache.contiguous(), ds_cache, d_bias) if S else (lse, lse, lse)  # without the cache never touched
    # the float32 (BA, BD) accumulator of g_qu beside qu's tile and the (BA, BW) score, gradient and ds tiles: at
    # 64 x 128 (enwik8) ~250 registers a thread over 4 warps, at the limit (spills); 8 warps halve it (not timed)
    warps = 8 if meta["BA"] * meta["BD"] >= 64 * 128 else 4
    _scores_bwd_kernel[grid](*inputs, lse, g_win.contiguous(), cache_io[0], ds_win, cache_io[1], d_pos, cache_io[2],
                             g_qu, *sizes, DIVIDE=divide, num_warps=warps, **meta)
    return ds_win, ds_cache, d_pos, d_bias, g_qu


@window_scores_backward.register_fake
def _(qu, keys, pos, codebook, count, cache_bias, n_invalid, n_invalid_int, divide, lse, g_win, g_cache):
    B, H, nb, L, _ = qu.shape
    W, S = pos.shape[-1] - 1 + L, g_cache.shape[-1]
    return (qu.new_empty(B, H, nb, L, W), qu.new_empty(B, H, nb, L, S), pos.new_empty(pos.shape),
            qu.new_empty(B, H, nb, L, dtype=torch.float32), qu.new_empty(qu.shape))


def _score_flops(qu: Tensor, pos: Tensor, codebook: Tensor | None, products: int) -> tuple[str, int]:
    """``products`` (rows x D_k) @ (D_k x columns) products over every block's W window and S cache columns (those
    masked in a tile are computed too), in qu's dtype."""
    B, H, nb, L, D = qu.shape
    cols = pos.shape[-1] - 1 + L + (codebook.shape[1] if codebook is not None else 0)
    return str(qu.dtype).removeprefix("torch."), products * 2 * B * H * nb * L * cols * D


@register_flops("tvq_kernels::window_scores")
def _(qu, keys, pos, codebook, count, cache_bias, n_invalid, n_invalid_int, divide, out_dtype):
    """The scores twice: a sweep for the softmax's max and sum, a sweep writing the weights."""
    return _score_flops(qu, pos, codebook, 2)


@register_flops("tvq_kernels::window_scores_backward")
def _(qu, keys, pos, codebook, count, cache_bias, n_invalid, n_invalid_int, divide, lse, g_win, g_cache):
    """The scores twice (a sweep for delta, a sweep writing ds) and ds @ keys / codebook for qu's gradient."""
    return _score_flops(qu, pos, codebook, 3)


class _WindowSoftmax(torch.autograd.Function):
    """(p_win, p_cache) of :func:`window_softmax`; backward runs the score kernel's backward (which also writes qu's
    gradient), then the keys' on the window kernel of :mod:`tvq.ops.kernels.window_values` (keys read in place,
    products in the compute dtype, qu's) and the codebook's in PyTorch."""

    @staticmethod
    def forward(ctx, qu, keys, pos, codebook, count, cache_bias, n_invalid, n_invalid_int, key_keep, divide,
                out_dtype):
        p_win, p_cache, lse = window_scores(qu, keys, pos, codebook, count, cache_bias, n_invalid, n_invalid_int,
                                            divide, out_dtype)
        ctx.save_for_backward(qu, keys, pos, codebook, count, cache_bias, n_invalid, lse)
        ctx.n_invalid_int, ctx.key_keep, ctx.divide = n_invalid_int, KEEP_MODES[key_keep], divide
        return p_win, p_cache

    @staticmethod
    def backward(ctx, g_win, g_cache):
        qu, keys, pos, codebook, count, cache_bias, n_invalid, lse = ctx.saved_tensors
        # qu's gradient ds_win @ key windows + ds_cache @ codebook comes from the same launch (B, H, nb, L, D_k)
        ds_win, ds_cache, d_pos, d_bias, g_qu = window_scores_backward(
            qu, keys, pos, codebook, count, cache_bias, n_invalid, ctx.n_invalid_int, ctx.divide, lse, g_win, g_cache)
        B, H = ds_win.shape[:2]
        ds_rows = ds_win.flatten(0, 1)  # (P, nb, L, W), P = B H
        g_keys = g_cb = g_bias = None
        if ctx.needs_input_grad[1]:
            # sum over the windows holding each key of its kept ds_win^T @ qu (the window kernel's values gradient)
            g_keys = window_values_grad_values(ds_rows, qu.flatten(0, 1), ctx.key_keep, keys.dtype)
            g_keys = g_keys.unflatten(0, (B, H))  # (B, H, M + nb L, D_k)
        if codebook is not None and ctx.needs_input_grad[3]:
            g_cb = torch.einsum("bhnls,bhnld->hsd", ds_cache, qu)  # (H, S, D_k)
        if cache_bias is not None and ctx.needs_input_grad[5]:
            g_bias = d_bias.sum((0, 2, 3)).to(cache_bias.dtype)  # (H,)
        g_qu = g_qu if ctx.needs_input_grad[0] else None
        return g_qu, g_keys, d_pos, g_cb, None, g_bias, None, None, None, None, None


def window_softmax(qu: Tensor, keys: Tensor, pos: Tensor, *, n_invalid: int | Tensor, key_keep: str | None,
                   cache: tuple[Tensor, Tensor] | None, cache_bias: Tensor | None, out_dtype: torch.dtype,
                   divide: bool = False, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Softmax weights of :func:`tvq.ops.blockwise_attention`'s blocks over their window and cache:
    p_win (B, H, nb, L, W) and p_cache (B, H, nb, L, S) in ``out_dtype`` (S = 0 without the cache; divided by
    max(count, 1) under ``divide``: the weights of the cache's means).

    qu (B, H, nb, L, D_k) = q + u, keys (B, H, M + nb L, D_k) (the windows are read in place), pos
    (B, H, nb, L, M + 1) the positional scores ``(q + v) @ rel^T`` (pos[a, d]: distance d), ``cache`` = (codebook (H, S, D_k),
    count (B, H, nb, S)) or None (no cache columns, old window keys -inf), ``cache_bias`` (H,) added to the
    cache's scores and the old window keys' (with the cache only), ``key_keep`` the straight-through rule: the
    (query a, slot w) pairs whose score gradient reaches the key, None (all), "own" (the block's own slots, w >= M)
    or "near" (w >= a: old slots are codewords). Products run in ``dtype`` (default qu's), scores and the softmax
    in float32. Gradients reach qu, keys, pos, the codebook and cache_bias.
    """
    dtype = dtype or qu.dtype
    codebook, count = (cache[0].to(dtype), cache[1].detach().to(torch.float32)) if cache is not None else (None, None)
    per_row = isinstance(n_invalid, Tensor)
    return _WindowSoftmax.apply(
        qu.to(dtype), keys.to(dtype), pos.contiguous(), codebook, count, cache_bias if cache is not None else None,
        n_invalid.to(device=qu.device, dtype=torch.int64) if per_row else None, 0 if per_row else int(n_invalid),
        key_keep, divide, out_dtype)
