"""The GAU's pointwise activation and output gate as Triton kernels (forward and backward).

The GAU's joint projection ``z = w_kvg(h)`` is (..., n_k + n_v + n_g): raw keys k, then the values and the gate,
both through SiLU; after attention ``out = attn_out * SiLU(g_pre)``. In PyTorch
(:meth:`tvq.layers.attention.Attention.forward`) that is ``split`` -> ``F.silu`` over the (n_v + n_g) part ->
``split`` -> ``attn_out * g``, and autograd's backward is MulBackward (two products: ``grad * g``,
``grad * attn_out``), the split's ``cat`` of dv and dg, silu_backward over (n_v + n_g), and the first split's ``cat``
of dk and that: each its own pass over memory. Here:

* :func:`gau_activation` returns k and g_pre as VIEWS of z (no copy; the gate's SiLU moves into the gate) and
  v = SiLU(z_v) from one kernel; its backward is ONE kernel writing dz (z's shape, contiguous) from (dk, dv, dg):
  dk and dg copied into place, dv * SiLU'(z_v) between them, zeros for a gradient autograd did not produce (None:
  an unused output; a constexpr ``HAS_*`` flag, no zero tensor is made or read). Its two custom ops take z's v
  part (a view), not z: all that their kernels read of z, and what the cost model (:mod:`tvq.bench.cost`, which
  counts an op's operand bytes) then counts.
* With ``head_dim`` (the Triton path of :meth:`tvq.layers.attention.Attention._projections`, where k is the query
  and key heads side by side) the same forward launch also writes those heads through the query/key RMS norm (no
  affine) times D_k^-1/4: programs past the v tiles own BH head rows of head_dim each, the whole row on chip, as
  :mod:`tvq.ops.kernels.rms_norm`'s. The backward launch's extra programs recompute each head row's statistics from
  z and write its part of dz from the two parts' gradients (queries, keys: read where they are). One launch each
  way instead of two (the norm's own kernel and its backward): the gau_activation -> rms_norm chain read and wrote
  the normalized heads' input in between.
* :func:`silu_gate` (where the attention is not the blockwise path's, whose value kernels apply the gate as they
  write the output: :mod:`tvq.ops.kernels.window_values`) is ``a * SiLU(g_pre)`` in one kernel (g_pre read in
  place through its row stride, e.g. the view above), and its backward ONE kernel writing
  ``da = grad * SiLU(g_pre)`` and ``dg_pre = grad * a * SiLU'(g_pre)``. It saves a and g_pre (the view: z's
  storage, which the activation's backward keeps anyway); the gate SiLU(g) is never materialised or saved.

SiLU(x) = x s(x), SiLU'(x) = s(x) (1 + x (1 - s(x))), s the sigmoid. All math in float32 on chip; results in the
inputs' dtype (the gate's output in the promoted dtype of a and g_pre, as ``a * F.silu(g_pre)``; its gradients in
their input's dtype). Pure elementwise kernels: a program owns a (rows x columns) tile, the leading dims flattened
to rows (a reshape, a view where the strides allow), any row and column strides; one grid axis (CUDA caps the
others at 65535), column tiles fastest.

Elements moved per token (each read or write of one element; bf16: 2 bytes each), widths n_k, n_v, n_g; rough,
from the shapes, not measured (no GPU was at hand). Today, forward: SiLU 2 (n_v + n_g), the gate's product 3 n_g;
backward: MulBackward 6 n_g (two products, each reads two and writes one), the inner split's cat 2 (n_v + n_g),
silu_backward 3 (n_v + n_g), the outer split's cat 2 (n_k + n_v + n_g): 2 n_k + 9 n_v + 18 n_g in all, and SiLU(g)
(n_g) is kept alive for backward. Here, forward: v 2 n_v, the gate 3 n_g; backward: the gate 5 n_g (grad, a and
g_pre read; da and dg_pre written), dz 2 n_k + 3 n_v + 2 n_g (dk, dv, z_v, dg read; dz written): 2 n_k + 5 n_v +
10 n_g. enwik8 (n_k 128, n_v = n_g 1536, bf16): ~83 KB against ~47 KB per token and layer, and 3 KB less kept.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from tvq.ops.kernels import kernel_op
from tvq.ops.kernels.common import cdiv, next_power_of_2

# largest tile: columns, and elements in all (rows = elements // columns); tests shrink them
TILES = {"cols": 512, "elements": 4096}


def _tiles(rows: int, cols: int) -> tuple[int, int]:
    """(BR, BC) powers of two for a (rows, cols) elementwise pass."""
    bc = min(TILES["cols"], next_power_of_2(max(cols, 1)))
    br = min(max(1, TILES["elements"] // bc), next_power_of_2(max(rows, 1)))
    return br, bc


def _grid(rows: int, cols: int, br: int, bc: int) -> tuple[int]:
    return (cdiv(rows, br) * cdiv(cols, bc),)


def _rows(x: Tensor) -> Tensor:
    """x (..., n) as (rows, n): a view where the leading dims merge, else a copy."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


@triton.jit
def _tile(pid, n_rows, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    """Rows (BR,), columns (BC,) of tile ``pid`` (int64) and their masks; column tiles fastest."""
    n_c = tl.cdiv(n_cols, BC)
    r = (pid // n_c) * BR + tl.arange(0, BR).to(tl.int64)
    c = (pid % n_c) * BC + tl.arange(0, BC)
    return r, c, r < n_rows, c < n_cols


@triton.jit
def _head_rows(pid, n_rows, n_heads, D, BH: tl.constexpr, BD: tl.constexpr):
    """Head rows (BH,) of tile ``pid`` (row r n_heads + j: token row r, head j), as (token row, head), columns (BD,)
    and the mask."""
    hr = pid * BH + tl.arange(0, BH).to(tl.int64)  # (BH,)
    d = tl.arange(0, BD)  # (BD,)
    ok = (hr < n_rows * n_heads)[:, None] & (d < D)[None, :]
    return hr // n_heads, hr % n_heads, d, ok


@triton.jit
def _silu_tile(pid, z_ptr, v_ptr, n_rows, n_v, sz_r, sz_c, BR: tl.constexpr, BC: tl.constexpr):
    """v tile ``pid``: v[r, c] = SiLU(z_v[r, c]), v contiguous (rows, n_v)."""
    r, c, r_ok, c_ok = _tile(pid, n_rows, n_v, BR, BC)
    ok = r_ok[:, None] & c_ok[None, :]
    x = tl.load(z_ptr + r[:, None] * sz_r + c[None, :] * sz_c, mask=ok, other=0.0).to(tl.float32)
    v = x * tl.sigmoid(x)
    tl.store(v_ptr + r[:, None] * n_v + c[None, :], v.to(v_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _norm_tile(pid, zq_ptr, h_ptr, n_rows, sq_r, sq_c, n_heads, D, eps, scale, BH: tl.constexpr, BD: tl.constexpr):
    """Head-row tile ``pid``: h[r, j] = z_qk[r, jD:(j+1)D] / rms * scale, h contiguous (rows, n_heads, D)."""
    tok, j, d, ok = _head_rows(pid, n_rows, n_heads, D, BH, BD)
    cols = j[:, None] * D + d[None, :]  # (BH, BD) columns of z_qk
    x = tl.load(zq_ptr + tok[:, None] * sq_r + cols * sq_c, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)  # (BH,)
    h = x * (rstd * scale)[:, None]
    tl.store(h_ptr + tok[:, None] * (n_heads * D) + cols, h.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_fwd_kernel(z_ptr, v_ptr, n_rows, n_v, sz_r, sz_c, zq_ptr, h_ptr, sq_r, sq_c, n_heads, D, eps, scale,
                     v_tiles, NORM: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr,
                     BD: tl.constexpr):
    """v = SiLU(z_v) by the first ``v_tiles`` programs (:func:`_silu_tile`); with NORM the rest write the
    normalized heads, BH head rows each (:func:`_norm_tile`). (Each branch's body is a function of its own: Triton
    wants a variable assigned in both branches of an ``if`` to have one type, and the tiles differ.)"""
    pid = tl.program_id(0).to(tl.int64)
    if pid < v_tiles:
        _silu_tile(pid, z_ptr, v_ptr, n_rows, n_v, sz_r, sz_c, BR, BC)
    elif NORM:
        _norm_tile(pid - v_tiles, zq_ptr, h_ptr, n_rows, sq_r, sq_c, n_heads, D, eps, scale, BH, BD)


@triton.jit
def _dz_tile(pid, z_ptr, dk_ptr, dv_ptr, dg_ptr, dz_ptr, n_rows, n_k, n_v, n_cols, sz_r, sz_c, sk_r, sk_c, sv_r,
             sv_c, sg_r, sg_c, c0, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr, HAS_DG: tl.constexpr,
             BR: tl.constexpr, BC: tl.constexpr):
    """dz tile ``pid`` of columns c0..n_cols: dk[r, c] for c < n_k, dv[r, c'] SiLU'(z_v[r, c']) for the next n_v
    columns (c' = c - n_k), dg[r, c - n_k - n_v] after them; zeros where a gradient is absent (HAS_* False)."""
    r, c, r_ok, c_ok = _tile(pid, n_rows, n_cols - c0, BR, BC)
    ok = r_ok[:, None] & c_ok[None, :]
    cc = c[None, :] + c0
    dz = tl.zeros((BR, BC), dtype=tl.float32)
    if HAS_DK:
        k_ok = ok & (cc < n_k)
        dz += tl.load(dk_ptr + r[:, None] * sk_r + cc * sk_c, mask=k_ok, other=0.0).to(tl.float32)
    if HAS_DV:
        cv = cc - n_k
        v_ok = ok & (cv >= 0) & (cv < n_v)
        dv = tl.load(dv_ptr + r[:, None] * sv_r + cv * sv_c, mask=v_ok, other=0.0).to(tl.float32)
        x = tl.load(z_ptr + r[:, None] * sz_r + cv * sz_c, mask=v_ok, other=0.0).to(tl.float32)
        s = tl.sigmoid(x)
        dz += dv * (s * (1.0 + x * (1.0 - s)))
    if HAS_DG:
        cg = cc - (n_k + n_v)
        g_ok = ok & (cg >= 0)
        dz += tl.load(dg_ptr + r[:, None] * sg_r + cg * sg_c, mask=g_ok, other=0.0).to(tl.float32)
    tl.store(dz_ptr + r[:, None] * n_cols + cc, dz.to(dz_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dnorm_tile(pid, zq_ptr, d1_ptr, d2_ptr, dz_ptr, n_rows, n_cols, sq_r, sq_c, R1, s1_o, s1_r, s1_h, s1_c, s2_o,
                s2_r, s2_h, s2_c, n_heads, H1, D, eps, scale, HAS_D1: tl.constexpr, HAS_D2: tl.constexpr,
                BH: tl.constexpr, BD: tl.constexpr):
    """Head-row tile ``pid`` of dz's first n_heads D columns: statistics recomputed from z_qk, h = x / rms,
    dh = grad scale, dx = (dh - h mean(dh h)) / rms; head j < H1 reads d1[r, j], the others d2[r, j - H1], token
    row r of a gradient at (r // R1) s_o + (r % R1) s_r (rows in R1-row groups: a (B, T, ...) view whose B and T do
    not merge, read in place)."""
    tok, j, d, ok = _head_rows(pid, n_rows, n_heads, D, BH, BD)
    grp, sub = tok // R1, tok % R1
    cols = j[:, None] * D + d[None, :]  # (BH, BD) columns of z_qk and dz
    x = tl.load(zq_ptr + tok[:, None] * sq_r + cols * sq_c, mask=ok, other=0.0).to(tl.float32)
    first = (j < H1)[:, None]
    g = tl.zeros((BH, BD), dtype=tl.float32)
    if HAS_D1:
        g += tl.load(d1_ptr + (grp * s1_o + sub * s1_r)[:, None] + j[:, None] * s1_h + d[None, :] * s1_c,
                     mask=ok & first, other=0.0).to(tl.float32)
    if HAS_D2:
        g += tl.load(d2_ptr + (grp * s2_o + sub * s2_r)[:, None] + (j - H1)[:, None] * s2_h + d[None, :] * s2_c,
                     mask=ok & ~first, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)  # (BH,)
    h = x * rstd[:, None]
    dh = g * scale
    mean = tl.sum(dh * h, axis=1) / D  # (BH,)
    dx = (dh - h * mean[:, None]) * rstd[:, None]
    tl.store(dz_ptr + tok[:, None] * n_cols + cols, dx.to(dz_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _activation_bwd_kernel(z_ptr, dk_ptr, dv_ptr, dg_ptr, dz_ptr, n_rows, n_k, n_v, n_cols,
                           sz_r, sz_c, sk_r, sk_c, sv_r, sv_c, sg_r, sg_c,
                           zq_ptr, d1_ptr, d2_ptr, sq_r, sq_c, R1, s1_o, s1_r, s1_h, s1_c, s2_o, s2_r, s2_h, s2_c,
                           n_heads, H1, D,
                           eps, scale, main_tiles, c0,
                           HAS_DK: tl.constexpr, HAS_DV: tl.constexpr, HAS_DG: tl.constexpr, NORM: tl.constexpr,
                           HAS_D1: tl.constexpr, HAS_D2: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                           BH: tl.constexpr, BD: tl.constexpr):
    """dz (contiguous (rows, n_k + n_v + n_g)): the first ``main_tiles`` programs write columns c0..n_cols
    (:func:`_dz_tile`); with NORM (c0 = n_k) the rest write the first n_k columns from the normalized heads'
    gradients, BH head rows each (:func:`_dnorm_tile`)."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < main_tiles:
        _dz_tile(pid, z_ptr, dk_ptr, dv_ptr, dg_ptr, dz_ptr, n_rows, n_k, n_v, n_cols, sz_r, sz_c, sk_r, sk_c, sv_r,
                 sv_c, sg_r, sg_c, c0, HAS_DK, HAS_DV, HAS_DG, BR, BC)
    elif NORM:
        _dnorm_tile(pid - main_tiles, zq_ptr, d1_ptr, d2_ptr, dz_ptr, n_rows, n_cols, sq_r, sq_c, R1, s1_o, s1_r,
                    s1_h, s1_c, s2_o, s2_r, s2_h, s2_c, n_heads, H1, D, eps, scale, HAS_D1, HAS_D2, BH, BD)


@triton.jit
def _gate_fwd_kernel(a_ptr, g_ptr, out_ptr, n_rows, n, sa_r, sa_c, sg_r, sg_c,
                     BR: tl.constexpr, BC: tl.constexpr):
    """out[r, c] = a[r, c] SiLU(g[r, c]); out contiguous (rows, n)."""
    r, c, r_ok, c_ok = _tile(tl.program_id(0).to(tl.int64), n_rows, n, BR, BC)
    ok = r_ok[:, None] & c_ok[None, :]
    a = tl.load(a_ptr + r[:, None] * sa_r + c[None, :] * sa_c, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(g_ptr + r[:, None] * sg_r + c[None, :] * sg_c, mask=ok, other=0.0).to(tl.float32)
    out = a * (x * tl.sigmoid(x))
    tl.store(out_ptr + r[:, None] * n + c[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gate_bwd_kernel(grad_ptr, a_ptr, g_ptr, da_ptr, dg_ptr, n_rows, n, so_r, so_c, sa_r, sa_c, sg_r, sg_c,
                     BR: tl.constexpr, BC: tl.constexpr):
    """da = grad SiLU(g), dg = grad a SiLU'(g); both contiguous (rows, n)."""
    r, c, r_ok, c_ok = _tile(tl.program_id(0).to(tl.int64), n_rows, n, BR, BC)
    ok = r_ok[:, None] & c_ok[None, :]
    grad = tl.load(grad_ptr + r[:, None] * so_r + c[None, :] * so_c, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + r[:, None] * sa_r + c[None, :] * sa_c, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(g_ptr + r[:, None] * sg_r + c[None, :] * sg_c, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(x)
    out = r[:, None] * n + c[None, :]
    tl.store(da_ptr + out, (grad * x * s).to(da_ptr.dtype.element_ty), mask=ok)
    tl.store(dg_ptr + out, (grad * a * (s * (1.0 + x * (1.0 - s)))).to(dg_ptr.dtype.element_ty), mask=ok)


def _check_widths(z: Tensor, n_k: int, n_v: int) -> int:
    """n_g of z (..., n_k + n_v + n_g)."""
    n_g = z.shape[-1] - n_k - n_v if z.dim() else -1
    if n_k < 0 or n_v < 0 or n_g < 0:
        raise ValueError(f"gau_activation: z (..., n_k + n_v + n_g) with n_k={n_k}, n_v={n_v} expected, got "
                         f"{tuple(z.shape)}")
    return n_g


# ---- the activation: v = SiLU(z_v); backward dz from (dk, dv, dg) ------------------------------------------------
# The ops take z's v part z_v (a view of z), not z: what the kernels read, and what the cost model counts.

def _forward(z_v: Tensor, z_qk: Tensor | None = None, head_dim: int = 1, eps: float = 0.0,
             scale: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Launch the forward kernel: v = SiLU(z_v) and, with z_qk, its heads normalized (one launch for both)."""
    v = torch.empty(z_v.shape, dtype=z_v.dtype, device=z_v.device)
    heads = None if z_qk is None else torch.empty(z_qk.shape, dtype=z_qk.dtype, device=z_qk.device)
    if not (v.numel() or (heads is not None and heads.numel())):
        return v, heads
    z2 = _rows(z_v)
    rows, n_v = z2.shape
    br, bc = _tiles(rows, n_v)
    v_tiles = _grid(rows, n_v, br, bc)[0] if n_v else 0
    q2, n_heads, bh, bd = (z2, 0, 1, 1) if z_qk is None else _head_args(z_qk, head_dim)
    h_tiles = cdiv(rows * n_heads, bh)
    _silu_fwd_kernel[(v_tiles + h_tiles,)](
        z2, v, rows, n_v, *z2.stride(), q2, q2 if heads is None else heads, *q2.stride(), n_heads, head_dim, eps,
        scale, v_tiles, NORM=z_qk is not None, BR=br, BC=bc, BH=bh, BD=bd)
    return v, heads


def _head_args(z_qk: Tensor, head_dim: int) -> tuple[Tensor, int, int, int]:
    """z_qk as rows, its heads per row, and the head tiles (BH head rows of BD columns)."""
    q2 = _rows(z_qk)
    bd = next_power_of_2(head_dim)
    n_heads = q2.shape[1] // head_dim
    bh = min(max(1, TILES["elements"] // bd), next_power_of_2(max(q2.shape[0] * n_heads, 1)))
    return q2, n_heads, bh, bd


@kernel_op("tvq_kernels::gau_activation")
def gau_activation_values(z_v: Tensor) -> Tensor:
    """v = SiLU(z_v): contiguous, z_v's dtype (float32 math); z_v (..., n_v) any strides (the v part of z, read in
    place)."""
    return _forward(z_v)[0]


@gau_activation_values.register_fake
def _(z_v):
    return torch.empty(z_v.shape, dtype=z_v.dtype, device=z_v.device)


@kernel_op("tvq_kernels::gau_activation_norm")
def gau_activation_norm(z_qk: Tensor, z_v: Tensor, head_dim: int, eps: float, scale: float) -> tuple[Tensor, Tensor]:
    """(heads, v) from one launch: heads (..., n_k) contiguous in z_qk's dtype, each ``head_dim`` columns of z_qk
    divided by their root mean square (+ eps) and times ``scale`` (the query/key norms, no affine), v = SiLU(z_v)
    contiguous; float32 math. z_qk (..., n_k) and z_v (..., n_v) any strides (parts of z, read in place)."""
    v, heads = _forward(z_v, z_qk, head_dim, eps, scale)
    return heads, v


@gau_activation_norm.register_fake
def _(z_qk, z_v, head_dim, eps, scale):
    return torch.empty_like(z_qk, memory_format=torch.contiguous_format), torch.empty_like(
        z_v, memory_format=torch.contiguous_format)


def _dz_shape(z_v: Tensor, n_k: int, n_g: int) -> tuple[int, ...]:
    if not z_v.dim() or n_k < 0 or n_g < 0:
        raise ValueError(f"gau_activation_backward: z_v (..., n_v) and n_k, n_g >= 0 expected, got "
                         f"{tuple(z_v.shape)}, n_k={n_k}, n_g={n_g}")
    return (*z_v.shape[:-1], n_k + z_v.shape[-1] + n_g)


def _heads_grad(d: Tensor | None, lead: tuple, n: int, head_dim: int, name: str, dummy: Tensor) -> tuple:
    """A normalized part's gradient (..., n, head_dim) as (groups, R1, n, head_dim), R1 = :func:`_row_group`'s, and its
    four strides (a dummy pointer where absent, never read): a (B, T, n, head_dim) view is read in place, whatever its
    strides (the queries' gradient of several heads comes as a transpose of (B, n, T, head_dim))."""
    if d is None or n == 0:
        return dummy, 0, 0, 0, 0
    if d.shape != (*lead, n, head_dim):
        raise ValueError(f"gau_activation_backward: {name} {(*lead, n, head_dim)} expected, got {tuple(d.shape)}")
    d4 = d.reshape(-1, _row_group(lead), n, head_dim)  # a view for (B, T) leading dims; else a copy, if needed
    return d4, *d4.stride()


def _row_group(lead: tuple) -> int:
    """R1, the rows per group of :func:`_heads_grad`: T of (B, T) leading dims, else all rows."""
    return lead[-1] if len(lead) == 2 else math.prod(lead)


@kernel_op("tvq_kernels::gau_activation_backward")
def gau_activation_backward(z_v: Tensor, dk: Tensor | None, dv: Tensor | None, dg: Tensor | None, n_k: int,
                            n_g: int, z_qk: Tensor | None = None, d1: Tensor | None = None, d2: Tensor | None = None,
                            head_dim: int = 1, eps: float = 0.0, scale: float = 1.0) -> Tensor:
    """dz (..., n_k + n_v + n_g), contiguous, z_v's dtype: [dk, dv * SiLU'(z_v), dg] along the last dim; a None
    gradient is zeros. z_v (..., n_v), dk (..., n_k), dv (..., n_v), dg (..., n_g): any strides.

    With ``z_qk`` (..., n_k) (:func:`gau_activation_norm`'s input; dk then None) the first n_k columns are the
    gradient of its normalized heads instead, from d1 (..., H1, head_dim) for the first H1 heads and d2 (...,
    n_k / head_dim - H1, head_dim) for the rest (either None: zeros), in the same launch."""
    dz = z_v.new_empty(_dz_shape(z_v, n_k, n_g))
    if not dz.numel():
        return dz
    n_v = z_v.shape[-1]
    z2 = _rows(z_v)
    norm = z_qk is not None
    if norm and (dk is not None or z_qk.shape != (*z_v.shape[:-1], n_k) or head_dim < 1 or n_k % head_dim):
        raise ValueError(f"gau_activation_backward: z_qk {(*z_v.shape[:-1], n_k)} in heads of {head_dim} and no dk "
                         f"expected, got {tuple(z_qk.shape)} and dk {None if dk is None else tuple(dk.shape)}")
    grads, has = [], []
    for name, d, width in (("dk", dk, n_k), ("dv", dv, n_v), ("dg", dg, n_g)):
        if d is not None and d.shape != (*z_v.shape[:-1], width):
            raise ValueError(f"gau_activation_backward: {name} {tuple(z_v.shape[:-1]) + (width,)} expected, got "
                             f"{tuple(d.shape)}")
        has.append(d is not None and width > 0)
        d_rows = _rows(d) if has[-1] else z2  # a dummy pointer for an absent gradient, never read
        grads += [d_rows, *d_rows.stride()]
    rows, n = z2.shape[0], dz.shape[-1]
    c0 = n_k if norm else 0
    br, bc = _tiles(rows, n - c0)
    main_tiles = _grid(rows, n - c0, br, bc)[0] if n > c0 else 0
    q2, n_heads, bh, bd = _head_args(z_qk, head_dim) if norm else (z2, 0, 1, 1)
    H1 = (d1.shape[-2] if d1 is not None else n_heads - d2.shape[-2] if d2 is not None else n_heads) if norm else 0
    lead = tuple(z_v.shape[:-1])
    p1 = _heads_grad(d1, lead, H1, head_dim, "d1", z2) if norm else (z2, 0, 0, 0, 0)
    p2 = _heads_grad(d2, lead, n_heads - H1, head_dim, "d2", z2) if norm else (z2, 0, 0, 0, 0)
    h_tiles = cdiv(rows * n_heads, bh)
    _activation_bwd_kernel[(main_tiles + h_tiles,)](
        z2, grads[0], grads[3], grads[6], dz, rows, n_k, n_v, n, *z2.stride(), *grads[1:3], *grads[4:6],
        *grads[7:9], q2, p1[0], p2[0], *q2.stride(), max(_row_group(lead), 1), *p1[1:], *p2[1:], n_heads, H1,
        head_dim, eps, scale,
        main_tiles, c0, HAS_DK=has[0], HAS_DV=has[1], HAS_DG=has[2], NORM=norm,
        HAS_D1=norm and d1 is not None and H1 > 0, HAS_D2=norm and d2 is not None and n_heads > H1,
        BR=br, BC=bc, BH=bh, BD=bd)
    return dz


@gau_activation_backward.register_fake
def _(z_v, dk, dv, dg, n_k, n_g, z_qk=None, d1=None, d2=None, head_dim=1, eps=0.0, scale=1.0):
    return z_v.new_empty(_dz_shape(z_v, n_k, n_g))


class _GauActivation(torch.autograd.Function):
    """(k, v, g_pre): k and g_pre views of z, v by the kernel; backward one kernel writing dz. Saves z's v part
    (a view). With ``head_dim`` k's heads are normalized by the same launch, k a new tensor returned as one part
    (..., H, head_dim) or two (split at head ``split``), and z's k part is saved too."""

    @staticmethod
    def forward(ctx, z, n_k, n_v, head_dim, eps, scale, split):
        ctx.set_materialize_grads(False)  # unused outputs' gradients stay None: no zeros made or read
        z_qk, z_v = z[..., :n_k], z[..., n_k:n_k + n_v]
        ctx.n_k, ctx.n_g, ctx.norm = n_k, z.shape[-1] - n_k - n_v, (head_dim, eps, scale, split)
        g_pre = z[..., n_k + n_v:]
        if not head_dim:
            ctx.save_for_backward(z_v)
            return z_qk, gau_activation_values(z_v), g_pre
        ctx.save_for_backward(z_v, z_qk)
        heads, v = gau_activation_norm(z_qk, z_v, head_dim, eps, scale)
        n_h = n_k // head_dim
        heads = heads.view(*z.shape[:-1], n_h, head_dim)  # (..., H, head_dim)
        return (*(heads.split([split, n_h - split], -2) if split else (heads,)), v, g_pre)

    @staticmethod
    def backward(ctx, *grads):
        n_in = 7
        if not ctx.needs_input_grad[0]:
            return (None,) * n_in
        head_dim, eps, scale, split = ctx.norm
        if not head_dim:
            (z_v,) = ctx.saved_tensors
            dk, dv, dg = grads
            return (gau_activation_backward(z_v, dk, dv, dg, ctx.n_k, ctx.n_g), *(None,) * (n_in - 1))
        z_v, z_qk = ctx.saved_tensors
        d1, d2 = grads[0], grads[1] if split else None
        dz = gau_activation_backward(z_v, None, grads[-2], grads[-1], ctx.n_k, ctx.n_g, z_qk, d1, d2, head_dim, eps,
                                     scale)
        return (dz, *(None,) * (n_in - 1))


def gau_activation(z: Tensor, n_k: int, n_v: int, *, head_dim: int | None = None, eps: float = 1e-6,
                   scale: float = 1.0, split: int | None = None) -> tuple[Tensor, ...]:
    """(k, v, g_pre) of the GAU's joint projection z (..., n_k + n_v + n_g): k = z[..., :n_k] and
    g_pre = z[..., n_k + n_v:] are views of z (no copy: the gate's SiLU is :func:`silu_gate`'s), v =
    SiLU(z[..., n_k:n_k + n_v]) a new contiguous tensor in z's dtype (float32 math). Backward: one kernel writes
    z's gradient (contiguous) from those of k, v and g_pre (any of them unused: zeros).

    With ``head_dim``: the first n_k columns are heads of ``head_dim`` (the query and key heads), each divided by
    its root mean square (+ ``eps``) and times ``scale`` by the same launch as v (the query/key norms of
    :class:`tvq.layers.norm.RMSNorm` without affine): k is then a new tensor (..., n_k / head_dim, head_dim), or
    with ``split`` n its two parts (the first n heads, the rest: views, their gradients read apart): (q, k, v,
    g_pre). Backward is still one kernel."""
    _check_widths(z, n_k, n_v)
    if head_dim is not None:
        if head_dim < 1 or n_k % head_dim:
            raise ValueError(f"gau_activation: n_k ({n_k}) must be a multiple of head_dim, got {head_dim}")
        if split is not None and not 0 < split < n_k // head_dim:
            raise ValueError(f"gau_activation: split must be in (0, {n_k // head_dim}), got {split}")
    elif split is not None:
        raise ValueError("gau_activation: split needs head_dim")
    return _GauActivation.apply(z, n_k, n_v, head_dim or 0, float(eps), float(scale), split or 0)


# ---- the gate: a * SiLU(g_pre) -------------------------------------------------------------------------------------

def _check_gate(a: Tensor, g_pre: Tensor) -> None:
    if a.shape != g_pre.shape or not a.dim():
        raise ValueError(f"silu_gate: a and g_pre of one shape (..., n) expected, got {tuple(a.shape)} and "
                         f"{tuple(g_pre.shape)}")


@kernel_op("tvq_kernels::silu_gate")
def silu_gate_forward(a: Tensor, g_pre: Tensor) -> Tensor:
    """a * SiLU(g_pre) (contiguous, a's and g_pre's promoted dtype, float32 math); a and g_pre (..., n), any
    strides."""
    _check_gate(a, g_pre)
    out = a.new_empty(a.shape, dtype=torch.result_type(a, g_pre))
    if not out.numel():
        return out
    a2, g2 = _rows(a), _rows(g_pre)
    rows, n = a2.shape
    br, bc = _tiles(rows, n)
    _gate_fwd_kernel[_grid(rows, n, br, bc)](a2, g2, out, rows, n, *a2.stride(), *g2.stride(), BR=br, BC=bc)
    return out


@silu_gate_forward.register_fake
def _(a, g_pre):
    _check_gate(a, g_pre)
    return a.new_empty(a.shape, dtype=torch.result_type(a, g_pre))


@kernel_op("tvq_kernels::silu_gate_backward")
def silu_gate_backward(grad: Tensor, a: Tensor, g_pre: Tensor) -> tuple[Tensor, Tensor]:
    """(da, dg_pre) = (grad SiLU(g_pre), grad a SiLU'(g_pre)), contiguous, in a's and g_pre's dtypes (float32
    math); grad, a and g_pre (..., n), any strides."""
    _check_gate(a, g_pre)
    if grad.shape != a.shape:
        raise ValueError(f"silu_gate_backward: grad {tuple(a.shape)} expected, got {tuple(grad.shape)}")
    da, dg = a.new_empty(a.shape), g_pre.new_empty(g_pre.shape)
    if not da.numel():
        return da, dg
    o2, a2, g2 = _rows(grad), _rows(a), _rows(g_pre)
    rows, n = a2.shape
    br, bc = _tiles(rows, n)
    _gate_bwd_kernel[_grid(rows, n, br, bc)](o2, a2, g2, da, dg, rows, n, *o2.stride(), *a2.stride(),
                                             *g2.stride(), BR=br, BC=bc)
    return da, dg


@silu_gate_backward.register_fake
def _(grad, a, g_pre):
    return a.new_empty(a.shape), g_pre.new_empty(g_pre.shape)


class _SiluGate(torch.autograd.Function):
    """out = a * SiLU(g_pre); backward one kernel writing both gradients. Saves a and g_pre as given (views
    stay views)."""

    @staticmethod
    def forward(ctx, a, g_pre):
        ctx.save_for_backward(a, g_pre)
        return silu_gate_forward(a, g_pre)

    @staticmethod
    def backward(ctx, grad):
        a, g_pre = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None
        da, dg = silu_gate_backward(grad, a, g_pre)
        return (da if ctx.needs_input_grad[0] else None), (dg if ctx.needs_input_grad[1] else None)


def silu_gate(a: Tensor, g_pre: Tensor) -> Tensor:
    """a * SiLU(g_pre) in one kernel, a and g_pre (..., n) of one shape (g_pre may be a strided view, e.g.
    :func:`gau_activation`'s, read in place); the result contiguous in their promoted dtype (as
    ``a * F.silu(g_pre)``), float32 math. Backward: one kernel writes both gradients (in a's and g_pre's
    dtypes)."""
    _check_gate(a, g_pre)
    return _SiluGate.apply(a, g_pre)
