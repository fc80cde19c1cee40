"""The window's share of :func:`tvq.ops.blockwise_attention`'s output as Triton kernels (forward and backward).

Block n of L queries of a row p (P = B H rows) reads a window of W = M + L values, rows n L .. n L + W - 1 of the
key list's values (P, M + nb L, D_v), which starts with the M carried window slots:
``out[p, n, a] = acc[p, n, a] + sum_w p_win[p, n, a, w] values[p, n L + w]``, ``acc`` the cache read's output.
In PyTorch that is a batched GEMM over a strided view of overlapping windows, which a batched GEMM cannot read
for several rows at once: the windows are copied ((W / L) D_v per token, kept alive for backward), and backward
writes the gradient of every window (P, nb, W, D_v) and then sums the overlaps (:class:`tvq.ops.blockwise._Windows`).
Here every kernel reads the values straight from the key list by offset and each result is written once:

* forward: a program owns a (rows x BD) float32 accumulator of one (p, n), starts it from ``acc`` (the sum needs no
  extra pass) and walks the window in tiles of BW columns: ``acc += p_win tile (rows, BW) @ values (BW, BD)``.
  Tiled over D_v because W is the reduction (a tile of it cannot finish an output) and a whole row of the output
  does not fit on chip: at D_v 1536 (enwik8) 64 rows x 1536 float32 are 384 KiB, more than an SM's registers
  (256 KiB) or shared memory (228 KiB). A 64 x 64 tile is 16 KiB; the D_v tiles of a (p, n) are the grid's
  fastest axis, so their programs run together and re-read the same weights from L2, not HBM.
* ``g_p[a, w] = grad[a] . values[n L + w]``: a (rows x BW) accumulator per program, reduced over D_v in tiles.
* ``g_values[r] = sum over the blocks n whose window holds row r of sum_a keep(a, w) p[n][a, w] grad[n][a]``,
  w = r - n L: a program per (row tile, D_v tile) loops over those blocks (ceil(W / L) + 1 at most; exactly W / L
  for an aligned row tile when L divides W): no atomics, each row written once, no (nb, W, D_v) intermediate.
  The straight-through rule (which (query, slot) products give the value a gradient) is a constexpr ``keep``:
  0 all, 1 the block's own slots (w >= M), 2 the near slots (w >= a: old slots are codewords).

The blockwise path runs the cache read and the window product as one autograd node (:func:`block_values_kernel`):
forward, the same kernel also adds the cache's share, ``cache weights (rows, BS) @ means (BS, BD)`` over S tiles,
from the scan's per-block means (:mod:`tvq.ops.kernels.cache_scan`), so the cache read's output is never written;
backward, the window's ``g_values`` kernel starts from the cache read's gradient of the values, so the values get
one gradient tensor instead of two that autograd would add.

The GAU's output gate rides along (``gate``, the gate's pre-activation): forward, the program that writes an output
tile also writes y = out SiLU(gate) (out is still written: the gate's gradient needs it); backward, the weights'
gradient launch reads y's gradient and makes it out's (times SiLU(gate)) as it loads each tile, and extra programs
of the same launch (one per (rows, D_v) tile, elementwise) write out's gradient (for the launches after it) and the
gate's. (Stores in the weight tiles' own loop, from their column-tile-0 programs, took the kernel from 86 to 255
registers per thread at enwik8's shape on sm_90 and spilled on sm_80: the compile check of
:mod:`tvq.bench.gpu_compile`.) The gate's own kernel (:func:`tvq.ops.kernels.gate.silu_gate`) and its backward then never run: one
launch fewer each way, and out is not read back to be gated.

The score kernel's backward (:mod:`tvq.ops.kernels.scores`) calls the forward and ``g_values`` ops directly for
the keys' side (p := ds_win, values := keys: g_qu; grad := qu: the keys' gradient, keep the key rule).

Products run in the compute dtype (``dtype``; the operands are cast on load, so float32 values under autocast are
not copied), sums in float32, results in the compute dtype (gradients in their input's dtype).

Bytes per token and head (rough, from the shapes, not measured: no GPU was at hand), bf16, enwik8 (d_v 1536,
L = M = 512, W = 1024; one value row is 3 KB, a row of weights 2 KB). Today, forward: the window copy (read the
values, write 2 rows: ~9 KB), the GEMM's reads of it and of the weights (6 + 2), the cache output read and the sum
written (3 + 3): ~23 KB, and the 6 KB copy is saved for backward (the straight-through
``_KeepGradMatmul`` saves the view instead and copies it again there). Backward: ``grad @ v_win^T`` (3 + 6 read,
2 written), ``p^T @ grad`` with the straight-through ``where`` (2 + 2 + 2 + 3 read, 6 written), the fold
(a 3 KB zero fill, 6 read, 2 x 6 read and written): ~53 KB. Here, forward: weights 2, values 3 (each row is read
by W / L = 2 windows, the second from L2 when the blocks run close together; 6 worst case), acc 3, out 3: ~11-14 KB.
Backward: ``g_p`` reads grad 3 and values 3 (6) and writes 2; ``g_values`` reads the weights 2 and grad 3 (twice:
6) and writes 3; ``g_acc`` is ``grad`` itself: ~16-22 KB. About 75 against 30 KB per token, head and layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.nn import functional as F

from tvq.ops.kernels import kernel_op, register_flops
from tvq.ops.kernels.common import cdiv, dot_options, tile

# largest tiles of query rows (value rows in g_values), window columns and D_v (tests shrink them)
TILES = {"rows": 64, "window": 64, "dv": 64}

KEEP_MODES = {None: 0, "own": 1, "near": 2}  # which products give the values a gradient: all, w >= M, w >= a


@triton.jit
def _cast(x, like_ptr, UPCAST: tl.constexpr):
    """An operand of ``tl.dot`` in the product dtype, that of ``like_ptr`` (float32 under UPCAST: see
    ``dot_options``)."""
    if UPCAST:
        return x.to(tl.float32)
    return x.to(like_ptr.dtype.element_ty)


@triton.jit
def _gate_tile(gate_ptr, p, t, d, T, Dv, sg_p, sg_t):
    """The gate's pre-activation (BA, BD) at rows t (BA,) of row p and columns d (BD,), float32; rows t >= T (a
    padded last block) zero."""
    ok = (t < T)[:, None] & (d < Dv)[None, :]
    return tl.load(gate_ptr + p * sg_p + t[:, None] * sg_t + d[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _fwd_kernel(p_ptr, v_ptr, acc_ptr, cw_ptr, m_ptr, out_ptr, gate_ptr, y_ptr, nb, L, W, S, Dv, T, sv_p, sv_r, sv_d,
                m_rows, sm_p, sm_n, sg_p, sg_t, HAS_ACC: tl.constexpr, HAS_CACHE: tl.constexpr, GATE: tl.constexpr,
                BA: tl.constexpr, BW: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    """out tile (BA, BD) of one (p, n) = acc + sum over window tiles of p_win (BA, BW) @ values (BW, BD) [+ sum over
    code tiles of the cache's weights (BA, BS) @ means (BS, BD) (HAS_CACHE): means of row p and block n at
    (p % m_rows) sm_p + n sm_n, rows of D_v]; GATE: also y = out SiLU(gate) (out as written; gate (P, T, D_v) at
    row p, query n L + a)."""
    pid = tl.program_id(0).to(tl.int64)
    n_d, n_a = tl.cdiv(Dv, BD), tl.cdiv(L, BA)
    td, ta, pn = pid % n_d, (pid // n_d) % n_a, pid // (n_d * n_a)
    p, n = pn // nb, pn % nb
    a = ta * BA + tl.arange(0, BA)  # (BA,)
    d = td * BD + tl.arange(0, BD)  # (BD,)
    a_ok, d_ok = a < L, d < Dv
    tile = (pn * L + a[:, None]) * Dv + d[None, :]  # (BA, BD) offsets in (P, nb, L, D_v)
    tile_ok = a_ok[:, None] & d_ok[None, :]
    if HAS_ACC:
        acc = tl.load(acc_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BA, BD), dtype=tl.float32)
    v_row = v_ptr + p * sv_p
    for w0 in range(0, W, BW):
        w = w0 + tl.arange(0, BW)  # (BW,)
        w_ok = w < W
        pt = tl.load(p_ptr + (pn * L + a[:, None]) * W + w[None, :], mask=a_ok[:, None] & w_ok[None, :], other=0.0)
        v = tl.load(v_row + (n * L + w[:, None]) * sv_r + d[None, :] * sv_d, mask=w_ok[:, None] & d_ok[None, :],
                    other=0.0)  # (BW, BD)
        acc = tl.dot(_cast(pt, out_ptr, UPCAST), _cast(v, out_ptr, UPCAST), acc, input_precision=PRECISION)
    if HAS_CACHE:
        for s0 in range(0, S, BS):
            s = s0 + tl.arange(0, BS)  # (BS,)
            s_ok = s < S
            cw = tl.load(cw_ptr + (pn * L + a[:, None]) * S + s[None, :], mask=a_ok[:, None] & s_ok[None, :],
                         other=0.0)  # (BA, BS)
            m = tl.load(m_ptr + (p % m_rows) * sm_p + n * sm_n + s[:, None] * Dv + d[None, :],
                        mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # (BS, BD)
            acc = tl.dot(_cast(cw, out_ptr, UPCAST), _cast(m, out_ptr, UPCAST), acc, input_precision=PRECISION)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + tile, out, mask=tile_ok)
    if GATE:
        g = _gate_tile(gate_ptr, p, n * L + a, d, T, Dv, sg_p, sg_t)  # (BA, BD)
        y = out.to(tl.float32) * g * tl.sigmoid(g)
        tl.store(y_ptr + tile, y.to(y_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _ungated(dy, gate_ptr, p, n, a, d, L, T, Dv, sg_p, sg_t, like_ptr):
    """The gated output's gradient dy (BA, BD) -> the output's, dy SiLU(gate), in like_ptr's dtype (as the gate's own
    backward writes it)."""
    gt = _gate_tile(gate_ptr, p, n * L + a, d, T, Dv, sg_p, sg_t)  # (BA, BD)
    return (dy.to(tl.float32) * gt * tl.sigmoid(gt)).to(like_ptr.dtype.element_ty)


@triton.jit
def _ungate_tile(tid, g_ptr, gate_ptr, o_ptr, do_ptr, dgate_ptr, nb, L, Dv, T, sg_p, sg_t, sdg_p, sdg_t,
                 BA: tl.constexpr, BD: tl.constexpr):
    """One (BA, BD) tile (number tid, D_v tiles fastest; BA a quarter of the weight tiles' rows, so that this
    elementwise branch holds no more registers than theirs) of the gate's backward: d_o = dy SiLU(gate) (what the
    launches after this one read) and d_gate = dy o SiLU'(gate) (rows past T: none)."""
    n_d, n_a = tl.cdiv(Dv, BD), tl.cdiv(L, BA)
    td, ta, pn = tid % n_d, (tid // n_d) % n_a, tid // (n_d * n_a)
    p, n = pn // nb, pn % nb
    a = ta * BA + tl.arange(0, BA)  # (BA,)
    d = td * BD + tl.arange(0, BD)  # (BD,)
    ok = (a < L)[:, None] & (d < Dv)[None, :]
    tile = (pn * L + a[:, None]) * Dv + d[None, :]
    dy = tl.load(g_ptr + tile, mask=ok, other=0.0).to(tl.float32)
    gt = _gate_tile(gate_ptr, p, n * L + a, d, T, Dv, sg_p, sg_t)
    sig = tl.sigmoid(gt)
    tl.store(do_ptr + tile, (dy * gt * sig).to(do_ptr.dtype.element_ty), mask=ok)
    o = tl.load(o_ptr + tile, mask=ok, other=0.0).to(tl.float32)
    t = n * L + a
    tl.store(dgate_ptr + p * sdg_p + t[:, None] * sdg_t + d[None, :],
             (dy * o * sig * (1.0 + gt * (1.0 - sig))).to(dgate_ptr.dtype.element_ty), mask=ok & (t < T)[:, None])


@triton.jit
def _grad_p_tile(pid, g_ptr, v_ptr, m_ptr, gp_ptr, gw_ptr, gate_ptr, do_ptr, nb, L, W, S, Dv, T, sv_p, sv_r, sv_d,
                 sg_p, sg_t, GATE: tl.constexpr, BA: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """g_p tile (BA, BW) number pid of one (p, n) = sum over D_v tiles of grad (BA, BD) @ values^T (BD, BW); the
    column tiles after the window's (S > 0) the cache's, g_w (BA, BW) = grad @ means[p, n]^T (the means (P, nb, S,
    D_v)). GATE: grad is the gated output's gradient, ungated as it is loaded (:func:`_ungated`)."""
    n_w, n_a = tl.cdiv(W, BW) + tl.cdiv(S, BW), tl.cdiv(L, BA)
    tw, ta, pn = pid % n_w, (pid // n_w) % n_a, pid // (n_w * n_a)
    p, n = pn // nb, pn % nb
    a = ta * BA + tl.arange(0, BA)  # (BA,)
    a_ok = a < L
    cache = tw >= tl.cdiv(W, BW)
    if cache:  # columns of the cache's codes
        w = (tw - tl.cdiv(W, BW)) * BW + tl.arange(0, BW)  # (BW,) codes
        w_ok = w < S
        src = m_ptr + pn * S * Dv
        s_col, s_d = Dv, 1
    else:
        w = tw * BW + tl.arange(0, BW)  # (BW,) window slots
        w_ok = w < W
        src = v_ptr + p * sv_p + n * L * sv_r
        s_col, s_d = sv_r, sv_d
    acc = tl.zeros((BA, BW), dtype=tl.float32)
    for d0 in range(0, Dv, BD):
        d = d0 + tl.arange(0, BD)  # (BD,)
        d_ok = d < Dv
        g = tl.load(g_ptr + (pn * L + a[:, None]) * Dv + d[None, :], mask=a_ok[:, None] & d_ok[None, :], other=0.0)
        if GATE:
            g = _ungated(g, gate_ptr, p, n, a, d, L, T, Dv, sg_p, sg_t, do_ptr)
        v = tl.load(src + w[None, :] * s_col + d[:, None] * s_d, mask=d_ok[:, None] & w_ok[None, :],
                    other=0.0)  # (BD, BW)
        acc = tl.dot(_cast(g, g_ptr, UPCAST), _cast(v, g_ptr, UPCAST), acc, input_precision=PRECISION)
    ok = a_ok[:, None] & w_ok[None, :]
    if cache:
        tl.store(gw_ptr + (pn * L + a[:, None]) * S + w[None, :], acc.to(gw_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(gp_ptr + (pn * L + a[:, None]) * W + w[None, :], acc.to(gp_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_p_kernel(g_ptr, v_ptr, m_ptr, gp_ptr, gw_ptr, gate_ptr, o_ptr, do_ptr, dgate_ptr, nb, L, W, S, Dv, T,
                   sv_p, sv_r, sv_d, sg_p, sg_t, sdg_p, sdg_t, n_main, GATE: tl.constexpr, BA: tl.constexpr,
                   BW: tl.constexpr, BD: tl.constexpr, BU: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr):
    """The first n_main programs: :func:`_grad_p_tile`; GATE: the rest write the output's gradient and the gate's
    (:func:`_ungate_tile`, elementwise), so that no weight tile's program holds them (their stores would double its
    registers)."""
    pid = tl.program_id(0).to(tl.int64)
    if GATE:
        if pid < n_main:
            _grad_p_tile(pid, g_ptr, v_ptr, m_ptr, gp_ptr, gw_ptr, gate_ptr, do_ptr, nb, L, W, S, Dv, T, sv_p, sv_r,
                         sv_d, sg_p, sg_t, GATE, BA, BW, BD, UPCAST, PRECISION)
        else:
            _ungate_tile(pid - n_main, g_ptr, gate_ptr, o_ptr, do_ptr, dgate_ptr, nb, L, Dv, T, sg_p, sg_t, sdg_p,
                         sdg_t, BU, BD)
    else:
        _grad_p_tile(pid, g_ptr, v_ptr, m_ptr, gp_ptr, gw_ptr, gate_ptr, do_ptr, nb, L, W, S, Dv, T, sv_p, sv_r,
                     sv_d, sg_p, sg_t, GATE, BA, BW, BD, UPCAST, PRECISION)


@triton.jit
def _grad_values_kernel(p_ptr, g_ptr, add_ptr, gv_ptr, codes_ptr, first_ptr, first_int, nb, L, M, W, N, S, Dv,
                        KEEP: tl.constexpr, HAS_ADD: tl.constexpr, GATHER: tl.constexpr, PER_ROW: tl.constexpr,
                        BR: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr):
    """g_values tile (BR, BD) of one row p: for each block n whose window holds one of the rows r, w = r - n L,
    sum over query tiles of keep(a, w) p[n]^T (BR, BA) @ grad[n] (BA, BD), started from ``add``'s tile (HAS_ADD:
    the values' gradient from the cache read), or (GATHER) from the cache's reverse scan G (P, nb, S, D_v) at each
    key's block and code (rows r < nb L at or after the first valid key, first_ptr[p] or first_int: what block
    r // L's keys get from the caches after it), or zeros; written once."""
    pid = tl.program_id(0).to(tl.int64)
    n_d, n_r = tl.cdiv(Dv, BD), tl.cdiv(N, BR)
    td, tr, p = pid % n_d, (pid // n_d) % n_r, pid // (n_d * n_r)
    r0 = tr * BR
    r = r0 + tl.arange(0, BR)  # (BR,) key-list rows
    d = td * BD + tl.arange(0, BD)  # (BD,)
    r_ok, d_ok = r < N, d < Dv
    if HAS_ADD:
        acc = tl.load(add_ptr + (p * N + r[:, None]) * Dv + d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                      other=0.0).to(tl.float32)
    elif GATHER:
        first = tl.load(first_ptr + p) if PER_ROW else first_int
        cached = (r < nb * L) & (r >= first)  # (BR,) keys that reach a later block's cache
        code = tl.load(codes_ptr + p * nb * L + r, mask=cached, other=0).to(tl.int64)  # (BR,)
        acc = tl.load(add_ptr + ((p * nb + r // L) * S + code)[:, None] * Dv + d[None, :],
                      mask=cached[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BR, BD), dtype=tl.float32)
    n_lo = tl.maximum(r0 + L - W, 0) // L  # first block whose window reaches row r0: ceil((r0 - W + 1) / L)
    n_hi = tl.minimum((r0 + BR - 1) // L, nb - 1)  # last block whose window starts at or before the tile's last row
    for n in range(n_lo, n_hi + 1):
        pn = p * nb + n
        w = r - n * L  # (BR,) slot of row r in block n's window
        w_ok = r_ok & (w >= 0) & (w < W)
        for a0 in range(0, L, BA):
            a = a0 + tl.arange(0, BA)  # (BA,)
            a_ok = a < L
            keep = w_ok[:, None] & a_ok[None, :]  # (BR, BA)
            if KEEP == 1:  # the block's own slots only: the carried window is stop-gradient
                keep = keep & (w[:, None] >= M)
            if KEEP == 2:  # the near slots only: old slots are codewords
                keep = keep & (w[:, None] >= a[None, :])
            pt = tl.load(p_ptr + (pn * L + a[None, :]) * W + w[:, None], mask=keep, other=0.0)  # (BR, BA)
            g = tl.load(g_ptr + (pn * L + a[:, None]) * Dv + d[None, :], mask=a_ok[:, None] & d_ok[None, :],
                        other=0.0)  # (BA, BD)
            acc = tl.dot(_cast(pt, g_ptr, UPCAST), _cast(g, g_ptr, UPCAST), acc, input_precision=PRECISION)
    tl.store(gv_ptr + (p * N + r[:, None]) * Dv + d[None, :], acc.to(gv_ptr.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])


def _check(p_win: Tensor, values: Tensor) -> tuple[int, int, int, int, int, int]:
    """P, nb, L, W, M, D_v of p_win (P, nb, L, W) and values (P, M + nb L, D_v)."""
    P, nb, L, W = p_win.shape
    M, Dv = W - L, values.shape[-1]
    if values.dim() != 3 or values.shape[:2] != (P, M + nb * L):
        raise ValueError(f"window_values: p_win (P, nb, L, W) and values (P, W - L + nb L, D_v) expected, got "
                         f"{tuple(p_win.shape)} and {tuple(values.shape)}")
    return P, nb, L, W, M, Dv


def _gate_args(gate: Tensor | None, P: int, T: int, Dv: int, name: str) -> tuple:
    """The gate's (P, T, D_v) pointer and row strides (its last dim dense), checked; None: a dummy and zeros."""
    if gate is None:
        return None, 0, 0
    if gate.shape != (P, T, Dv) or gate.stride(-1) != 1:
        raise ValueError(f"{name}: gate (P, T, D_v) = {(P, T, Dv)} with a dense last dim expected, got "
                         f"{tuple(gate.shape)} strides {gate.stride()}")
    return gate, *gate.stride()[:2]


def _forward(p_win: Tensor, values: Tensor, acc: Tensor | None, dtype: torch.dtype, cache_w: Tensor | None,
             means: Tensor | None, gate: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The forward launch of :func:`window_values` (with ``gate``, of :func:`window_values_gated`): (out, y or None)."""
    P, nb, L, W, M, Dv = _check(p_win, values)
    out = values.new_empty(P, nb, L, Dv, dtype=dtype)
    T = gate.shape[1] if gate is not None else nb * L
    gate, sg_p, sg_t = _gate_args(gate, P, T, Dv, "window_values_gated")
    y = torch.empty_like(out) if gate is not None else None
    if not out.numel():
        return out, y
    S = cache_w.shape[-1] if cache_w is not None else 16
    BA, BW, BD = tile(L, TILES["rows"]), tile(W, TILES["window"]), tile(Dv, TILES["dv"])
    BS = tile(S, TILES["window"])
    grid = (P * nb * cdiv(L, BA) * cdiv(Dv, BD),)
    has_cache = cache_w is not None
    if has_cache:
        shared = means.dim() == 3  # (H, S, D_v) for every block
        if shared and means.shape[0] > 1 and means.stride(0) == 0:  # one head's expanded over all (mqa): read once
            means = means[:1]
        means = means.contiguous()
        m_rows, sm_p, sm_n = (means.shape[0], S * Dv, 0) if shared else (P, nb * S * Dv, S * Dv)
    else:
        m_rows, sm_p, sm_n = 1, 0, 0
    _fwd_kernel[grid](p_win.contiguous(), values, acc.contiguous() if acc is not None else out,
                      cache_w.contiguous() if has_cache else out, means if has_cache else out, out,
                      out if gate is None else gate, out if y is None else y, nb, L, W, S, Dv, T, *values.stride(),
                      m_rows, sm_p, sm_n, sg_p, sg_t, HAS_ACC=acc is not None, HAS_CACHE=has_cache,
                      GATE=gate is not None, BA=BA, BW=BW, BS=BS, BD=BD, **dot_options(dtype))
    return out, y


@kernel_op("tvq_kernels::window_values")
def window_values(p_win: Tensor, values: Tensor, acc: Tensor | None, dtype: torch.dtype,
                  cache_w: Tensor | None = None, means: Tensor | None = None) -> Tensor:
    """(P, nb, L, D_v) in ``dtype``: out[p, n, a] = acc[p, n, a] + sum_w p_win[p, n, a, w] values[p, n L + w]
    [+ sum_s cache_w[p, n, a, s] means[p, n, s]: the cache read's product, whose output then never goes through
    HBM; or with means (H, S, D_v), the same for every block, means[p % H, s]: the cache's share of the queries'
    gradient, ds_cache @ codebook].

    p_win (P, nb, L, W), values (P, M + nb L, D_v) with M = W - L (any strides), acc (P, nb, L, D_v) or None,
    cache_w (P, nb, L, S) and means (P, nb, S, D_v) or (H, S, D_v) (P a multiple of H) both or neither; products in
    ``dtype``, sums in float32."""
    return _forward(p_win, values, acc, dtype, cache_w, means, None)[0]


@window_values.register_fake
def _(p_win, values, acc, dtype, cache_w=None, means=None):
    P, nb, L, _ = p_win.shape
    return values.new_empty(P, nb, L, values.shape[-1], dtype=dtype)


@kernel_op("tvq_kernels::window_values_gated")
def window_values_gated(p_win: Tensor, values: Tensor, acc: Tensor | None, dtype: torch.dtype,
                        cache_w: Tensor | None, means: Tensor | None, gate: Tensor) -> tuple[Tensor, Tensor]:
    """(out, y), both (P, nb, L, D_v) in ``dtype``: out as :func:`window_values` writes it and y = out SiLU(gate)
    from the same launch (the GAU's output gate, float32 math on out as written, as
    :func:`tvq.ops.kernels.gate.silu_gate` computes it); gate (P, T, D_v) the gate's pre-activation of the T
    queries (T <= nb L: the rest of a padded last block get y = 0), any row strides, its last dim dense."""
    return _forward(p_win, values, acc, dtype, cache_w, means, gate)


@window_values_gated.register_fake
def _(p_win, values, acc, dtype, cache_w, means, gate):
    P, nb, L, _ = p_win.shape
    out = values.new_empty(P, nb, L, values.shape[-1], dtype=dtype)
    return out, torch.empty_like(out)


def _grad_weights(grad: Tensor, values: Tensor, W: int, dtype: torch.dtype, means: Tensor | None,
                  gated: tuple[Tensor, Tensor] | None) -> tuple[Tensor, ...]:
    """The launch of :func:`window_values_grad_weights` (``gated`` None) and :func:`window_values_grad_weights_gated`
    (``gated`` = (out, gate)): (g_p, g_w[, d_out, d_gate])."""
    P, nb, L, Dv = grad.shape
    S = means.shape[2] if means is not None else 0
    g_p = grad.new_empty(P, nb, L, W, dtype=dtype)
    g_w = grad.new_empty((P, nb, L, S) if means is not None else (0,), dtype=dtype)
    o, gate = gated if gated is not None else (None, None)
    T = gate.shape[1] if gate is not None else nb * L
    gate, sg_p, sg_t = _gate_args(gate, P, T, Dv, "window_values_grad_weights_gated")
    d_o = torch.empty_like(grad) if gate is not None else None
    d_gate = gate.new_empty(P, T, Dv) if gate is not None else None
    extra = () if gate is None else (d_o, d_gate)
    if not g_p.numel() and not g_w.numel() and not (d_o is not None and d_o.numel()):
        return (g_p, g_w, *(t.zero_() for t in extra))
    BA, BW, BD = tile(L, TILES["rows"]), tile(W, TILES["window"]), tile(Dv, TILES["dv"])
    n_main = P * nb * cdiv(L, BA) * (cdiv(W, BW) + cdiv(S, BW))
    BU = max(BA // 4, 1)  # rows of the gate's elementwise tiles
    n_gate = P * nb * cdiv(L, BU) * cdiv(Dv, BD) if gate is not None else 0
    dummy = grad
    _grad_p_kernel[(n_main + n_gate,)](grad.contiguous(), values, means.contiguous() if means is not None else dummy,
                                       g_p, g_w if means is not None else g_p,
                                       *((dummy,) * 4 if gate is None else (gate, o.contiguous(), d_o, d_gate)),
                                       nb, L, W, S, Dv, T, *values.stride(), sg_p, sg_t, T * Dv, Dv, n_main,
                                       GATE=gate is not None, BA=BA, BW=BW, BD=BD, BU=BU, **dot_options(grad.dtype))
    return (g_p, g_w, *extra)


@kernel_op("tvq_kernels::window_values_grad_weights")
def window_values_grad_weights(grad: Tensor, values: Tensor, W: int, dtype: torch.dtype,
                               means: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(g_p (P, nb, L, W), g_w) in ``dtype``: g_p[p, n, a, w] = grad[p, n, a] . values[p, n L + w]; with the cache's
    per-block means (P, nb, S, D_v) also its weights' gradient g_w (P, nb, L, S) = grad[p, n] @ means[p, n]^T in the
    same launch (else g_w is empty (0,)); grad (P, nb, L, D_v), products in its dtype."""
    return _grad_weights(grad, values, W, dtype, means, None)


@window_values_grad_weights.register_fake
def _(grad, values, W, dtype, means=None):
    g_w = grad.new_empty((*grad.shape[:3], means.shape[2]) if means is not None else (0,), dtype=dtype)
    return grad.new_empty(*grad.shape[:3], W, dtype=dtype), g_w


@kernel_op("tvq_kernels::window_values_grad_weights_gated")
def window_values_grad_weights_gated(grad: Tensor, values: Tensor, W: int, dtype: torch.dtype, means: Tensor | None,
                                     out: Tensor, gate: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`window_values_grad_weights` behind the gate of :func:`window_values_gated`: ``grad`` is y's gradient,
    made out's (d_out = grad SiLU(gate)) as each tile is read, -> (g_p, g_w, d_out (P, nb, L, D_v) in grad's dtype,
    d_gate (P, T, D_v) = grad out SiLU'(gate) in the gate's dtype, contiguous), one launch: the gate's backward
    needs none of its own."""
    return _grad_weights(grad, values, W, dtype, means, (out, gate))


@window_values_grad_weights_gated.register_fake
def _(grad, values, W, dtype, means, out, gate):
    g_w = grad.new_empty((*grad.shape[:3], means.shape[2]) if means is not None else (0,), dtype=dtype)
    return (grad.new_empty(*grad.shape[:3], W, dtype=dtype), g_w, torch.empty_like(grad),
            gate.new_empty(gate.shape))


@kernel_op("tvq_kernels::window_values_grad_values")
def window_values_grad_values(p_win: Tensor, grad: Tensor, keep: int, dtype: torch.dtype,
                              add: Tensor | None = None, g_next: Tensor | None = None, codes: Tensor | None = None,
                              first_valid: Tensor | None = None, first: int = 0) -> Tensor:
    """(P, M + nb L, D_v) in ``dtype``: g_values[p, r] = add[p, r] + the sum over the blocks n whose window holds
    row r of sum_a keep(a, w) p_win[p, n, a, w] grad[p, n, a], w = r - n L; ``keep`` 0: all, 1: w >= M, 2: w >= a.
    p_win (P, nb, L, W), grad (P, nb, L, D_v), add (P, M + nb L, D_v) or None; products in grad's dtype. Or, in
    place of ``add``, the cache's reverse scan g_next (P, nb, S, D_v) (:func:`tvq.ops.kernels.cache_scan.
    cache_scan_backward` with ``gather=False``) with the blocks' codes (P, nb, L) and the first valid key
    (first_valid (P,) int32, or ``first``): row r < nb L at or after it starts from g_next[p, r // L, codes[r]]."""
    P, nb, L, W = p_win.shape
    M, Dv = W - L, grad.shape[-1]
    N = M + nb * L
    g_v = grad.new_empty(P, N, Dv, dtype=dtype)
    if not g_v.numel():
        return g_v
    if add is not None and g_next is not None:
        raise ValueError("window_values_grad_values: add and g_next are exclusive")
    S = g_next.shape[2] if g_next is not None else 1
    BR, BA, BD = tile(L, TILES["rows"]), tile(L, TILES["rows"]), tile(Dv, TILES["dv"])
    grid = (P * cdiv(N, BR) * cdiv(Dv, BD),)
    src = add.contiguous() if add is not None else g_next.contiguous() if g_next is not None else g_v
    _grad_values_kernel[grid](p_win.contiguous(), grad.contiguous(), src, g_v,
                              codes.contiguous() if codes is not None else g_v,
                              first_valid if first_valid is not None else g_v, first, nb, L, M, W, N, S, Dv,
                              KEEP=keep, HAS_ADD=add is not None, GATHER=g_next is not None,
                              PER_ROW=first_valid is not None, BR=BR, BA=BA, BD=BD, **dot_options(grad.dtype))
    return g_v


@window_values_grad_values.register_fake
def _(p_win, grad, keep, dtype, add=None, g_next=None, codes=None, first_valid=None, first=0):
    P, nb, L, W = p_win.shape
    return grad.new_empty(P, W - L + nb * L, grad.shape[-1], dtype=dtype)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@register_flops("tvq_kernels::window_values")
@register_flops("tvq_kernels::window_values_gated")
def _(p_win, values, acc, dtype, cache_w=None, means=None, gate=None):
    """(L, W) @ (W, D_v) per block [and (L, S) @ (S, D_v)], in ``dtype``."""
    return _name(dtype), 2 * (p_win.numel() + (cache_w.numel() if cache_w is not None else 0)) * values.shape[-1]


@register_flops("tvq_kernels::window_values_grad_weights")
@register_flops("tvq_kernels::window_values_grad_weights_gated")
def _(grad, values, W, dtype, means=None, out=None, gate=None):
    """(L, D_v) @ (D_v, W [+ S]) per block, in grad's dtype."""
    return _name(grad.dtype), 2 * grad.numel() * (W + (means.shape[2] if means is not None else 0))


@register_flops("tvq_kernels::window_values_grad_values")
def _(p_win, grad, keep, dtype, add=None, g_next=None, codes=None, first_valid=None, first=0):
    """(W, L) @ (L, D_v) per block, in grad's dtype (the kernel's masked edge tiles not counted)."""
    return _name(grad.dtype), 2 * p_win.numel() * grad.shape[-1]


def _gated_forward(p_win: Tensor, values: Tensor, acc: Tensor | None, dtype: torch.dtype, cache_w: Tensor | None,
                   means: Tensor | None, gate: Tensor | None) -> tuple[Tensor, Tensor]:
    """(out, what the node returns): out itself, or with ``gate`` y = out SiLU(gate) from the same launch."""
    if gate is None:
        out = window_values(p_win, values, acc, dtype, cache_w, means)
        return out, out
    return window_values_gated(p_win, values, acc, dtype, cache_w, means, gate)


def _weights_and_gate_grads(grad: Tensor, values: Tensor, W: int, dtype: torch.dtype, means: Tensor | None,
                            gated: tuple[Tensor, Tensor] | None, need_p: bool) -> tuple:
    """(g_p or None, g_w, the output's gradient, the gate's or None) from the node's output gradient ``grad``: behind a
    gate (``gated`` = (out, gate)) the weights' launch ungates it as it reads it; without the weights' gradient the
    gate's own backward kernel does (:func:`tvq.ops.kernels.gate.silu_gate_backward`)."""
    if need_p and gated is None:
        return (*window_values_grad_weights(grad, values, W, dtype, means), grad, None)
    if need_p:
        return window_values_grad_weights_gated(grad, values, W, dtype, means, *gated)
    if gated is None:
        return None, None, grad, None
    from tvq.ops.kernels.gate import silu_gate_backward

    out, gate = gated
    P, nb, L, Dv = grad.shape
    T = gate.shape[1]
    d_out, d_gate = silu_gate_backward(grad.flatten(1, 2)[:, :T], out.flatten(1, 2)[:, :T], gate)  # (P, T, D_v)
    d_out = F.pad(d_out, (0, 0, 0, nb * L - T)).view(P, nb, L, Dv) if nb * L > T else d_out.view(P, nb, L, Dv)
    return None, None, d_out, d_gate


class _WindowValues(torch.autograd.Function):
    """out = acc + the window product [times SiLU(gate)]; gradients: g_p and g_values by the kernels (g_values after
    the keep rule), g_acc the output's gradient, the gate's from the weights' launch. Saves only p_win and the
    values (no window copy), and behind a gate the ungated output and the gate."""

    @staticmethod
    def forward(ctx, p_win, values, acc, keep, dtype, gate):
        out, y = _gated_forward(p_win, values, acc, dtype, None, None, gate)
        ctx.save_for_backward(p_win, values, *((out, gate) if gate is not None else ()))
        ctx.keep, ctx.dtype, ctx.acc_dtype = keep, dtype, acc.dtype if acc is not None else None
        return y

    @staticmethod
    def backward(ctx, grad):
        p_win, values, *gated = ctx.saved_tensors
        grad = grad.to(ctx.dtype)  # (P, nb, L, D_v)
        # (P, nb, L, W), -, the output's gradient (P, nb, L, D_v) behind the gate, the gate's
        g_p, _, grad, g_gate = _weights_and_gate_grads(grad, values, p_win.shape[-1], p_win.dtype, None,
                                                       gated or None, ctx.needs_input_grad[0])
        g_v = g_acc = None
        if ctx.needs_input_grad[1]:
            g_v = window_values_grad_values(p_win, grad, ctx.keep, values.dtype)  # (P, M + nb L, D_v)
        if ctx.needs_input_grad[2]:
            g_acc = grad.to(ctx.acc_dtype)
        return g_p, g_v, g_acc, None, None, g_gate


class _BlockValues(torch.autograd.Function):
    """out = the cache read (:mod:`tvq.ops.kernels.cache_scan`) + the window product over the same values [times
    SiLU(gate)], as one autograd node, so that the values' two gradients (through the cache and through the windows)
    are written by one kernel (the window's ``g_values`` started from the cache's) instead of two tensors that
    autograd adds. With ``fold`` also the cache after the chunk (count', mean'), from the scan's launch; mean''s
    gradient joins the reverse scan's."""

    @staticmethod
    def forward(ctx, p_win, values, weights, codes, mean0, count, first_valid, first, keep, dtype, cache_grad, gate,
                fold):
        from tvq.ops.kernels.cache_scan import cache_means, join, keep_means

        ctx.set_materialize_grads(False)
        outs, ys, states, means = [], [], [], None
        for r, means, *state in cache_means(weights, codes, values, mean0, count, first_valid, first, fold):
            out, y = _gated_forward(p_win[r], values[r], None, dtype, weights[r], means,  # the scan, then one
                                    gate[r] if gate is not None else None)  # kernel for both
            outs.append(out)
            ys.append(y)
            states += state
        saved = means if ctx.needs_input_grad[2] and keep_means(weights, values) else None
        new_count, new_mean = (join([c for c, _ in states]), join([m for _, m in states])) if fold else (None, None)
        ctx.save_for_backward(p_win, values, weights, codes, mean0, count, first_valid, saved, new_count,
                              *((join(outs), gate) if gate is not None else ()))
        ctx.first, ctx.keep, ctx.dtype, ctx.cache_grad = first, keep, dtype, cache_grad
        if not fold:
            return join(ys)
        ctx.mark_non_differentiable(new_count)
        return join(ys), new_count, new_mean

    @staticmethod
    def backward(ctx, grad, *fold_grads):
        from tvq.ops.kernels.cache_scan import cache_read_backward

        p_win, values, weights, codes, mean0, count, first_valid, means, new_count, *gated = ctx.saved_tensors
        need_p, need_v, need_w, _, need_m = ctx.needs_input_grad[:5]
        g_fold = fold_grads[1] if fold_grads else None  # the state's mean's, None where it reached no loss
        none = (None,) * 10
        if grad is None and g_fold is None:
            return (None, None, None, None, None, *none[:8])
        # (P, nb, L, D_v); zeros where only the state's mean reached a loss
        grad = p_win.new_zeros(*p_win.shape[:3], values.shape[-1], dtype=ctx.dtype) if grad is None \
            else grad.to(ctx.dtype)
        # the saved means: the cache weights' gradient grad @ means^T in the window's launch (more column tiles)
        joint = need_p and need_w and means is not None and weights.dtype == p_win.dtype == grad.dtype
        # (P, nb, L, W), (P, nb, L, S) or (0,), then the output's gradient behind the gate, and the gate's
        g_p, g_w, grad, g_gate = _weights_and_gate_grads(grad, values, p_win.shape[-1], p_win.dtype,
                                                         means if joint else None, gated or None, need_p)
        # the cache's reverse scan G_{n+1} (P, nb, S, D_v), gathered at each key's code by the window's kernel
        g_w2, g_next, g_m = cache_read_backward(grad, weights, codes, values, mean0, count, first_valid, ctx.first,
                                                means, need_w and not joint, need_m or (need_v and ctx.cache_grad),
                                                gather=False, fold=None if g_fold is None else (g_fold, new_count))
        g_w = g_w if joint else g_w2
        g_v = None
        if need_v:  # (P, M + nb L, D_v): the window's gradient added to the cache's in the kernel
            cache = (g_next, codes, first_valid, ctx.first) if ctx.cache_grad else (None, None, None, 0)
            g_v = window_values_grad_values(p_win, grad, ctx.keep, values.dtype, None, *cache)
        return g_p, g_v, g_w, None, g_m if need_m else None, None, None, None, None, None, None, g_gate, None


def _gate_rows(gate: Tensor | None, p_win: Tensor, values: Tensor) -> Tensor | None:
    """The gate as (P, T, D_v) (T <= nb L queries), checked: a view where its strides allow."""
    if gate is None:
        return None
    P, nb, L, _ = p_win.shape
    if gate.dim() != 3 or gate.shape[0] != P or not 0 < gate.shape[1] <= nb * L or gate.shape[2] != values.shape[-1]:
        raise ValueError(f"window_values: gate (P, T <= nb L, D_v) = ({P}, <= {nb * L}, {values.shape[-1]}) expected, "
                         f"got {tuple(gate.shape)}")
    return gate if gate.stride(-1) == 1 else gate.contiguous()


def window_values_kernel(p_win: Tensor, values: Tensor, acc: Tensor | None = None, *, keep: str | None = None,
                         dtype: torch.dtype | None = None, gate: Tensor | None = None) -> Tensor:
    """The window's share of each block's output plus ``acc``: (P, nb, L, D_v) in ``dtype`` (default values'),
    out[p, n, a] = acc[p, n, a] + sum_w p_win[p, n, a, w] values[p, n L + w] (products in ``dtype``, sums in
    float32).

    p_win (P, nb, L, W) the window's softmax weights, values (P, M + nb L, D_v) the key list's values (M = W - L
    carried slots first; the windows are read in place), acc (P, nb, L, D_v) or None (the cache read's output).
    Gradients reach p_win, values and acc; ``keep`` is the straight-through rule for the values' gradient:
    None (every product), "own" (the block's own slots, w >= M) or "near" (w >= a: no old slot). ``gate`` (P, T,
    D_v), T <= nb L, the GAU's gate before its SiLU: the result is then out SiLU(gate) (rows past T zero), the gate
    applied as the output is written and its gradient taken by the weights' backward launch (no kernel of its own
    either way).
    """
    _check(p_win, values)
    if acc is not None and acc.shape != (*p_win.shape[:3], values.shape[-1]):
        raise ValueError(f"window_values_kernel: acc (P, nb, L, D_v) expected, got {tuple(acc.shape)}")
    return _WindowValues.apply(p_win, values, acc, KEEP_MODES[keep], dtype or values.dtype,
                               _gate_rows(gate, p_win, values))


def block_values_kernel(p_win: Tensor, values: Tensor, cache: tuple, *, keep: str | None = None,
                        dtype: torch.dtype | None = None, cache_grad: bool = True, gate: Tensor | None = None,
                        fold: bool = False) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
    """Each block's whole output, (P, nb, L, D_v) in ``dtype``: the cache read
    (:func:`tvq.ops.kernels.cache_scan.cache_read_kernel` of ``cache`` = (weights, codes, mean0, count, first_valid)
    over ``values``) plus the window product (:func:`window_values_kernel`), in one autograd node: the values get
    one gradient tensor, written by one kernel. ``cache_grad`` False: the values get no gradient through the cache
    (``grad_thru_cache`` off; the window's still follows ``keep``). ``gate`` as in :func:`window_values_kernel`.
    ``fold``: (out, (count' (P, S), mean' (P, S, D_v))), the cache with every block's keys folded in, float32, from
    the scan's launch (:func:`tvq.ops.kernels.cache_scan.cache_scan_fold`; mean' has a gradient, through the cache
    to the values only with ``cache_grad``)."""
    from tvq.ops.kernels.cache_scan import cache_read_args

    _check(p_win, values)
    weights, codes, mean0, count, first_valid = cache
    weights, codes, _, mean0, count, first_valid, first = cache_read_args(weights, codes, values, mean0, count,
                                                                          first_valid)
    out = _BlockValues.apply(p_win, values, weights, codes, mean0, count, first_valid, first, KEEP_MODES[keep],
                             dtype or values.dtype, cache_grad, _gate_rows(gate, p_win, values), fold)
    return (out[0], out[1:]) if fold else out
