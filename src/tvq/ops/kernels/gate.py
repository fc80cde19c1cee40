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
* :func:`silu_gate` is ``a * SiLU(g_pre)`` in one kernel (g_pre read in place through its row stride, e.g. the
  view above), and its backward ONE kernel writing ``da = grad * SiLU(g_pre)`` and
  ``dg_pre = grad * a * SiLU'(g_pre)``. It saves a and g_pre (the view: z's storage, which the activation's
  backward keeps anyway); the gate SiLU(g) is never materialised or saved.

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
def _tile(n_rows, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    """Rows (BR,), columns (BC,) of this program's tile and their masks; column tiles fastest."""
    pid = tl.program_id(0).to(tl.int64)
    n_c = tl.cdiv(n_cols, BC)
    r = (pid // n_c) * BR + tl.arange(0, BR).to(tl.int64)
    c = (pid % n_c) * BC + tl.arange(0, BC)
    return r, c, r < n_rows, c < n_cols


@triton.jit
def _silu_fwd_kernel(z_ptr, v_ptr, n_rows, n_v, sz_r, sz_c,
                     BR: tl.constexpr, BC: tl.constexpr):
    """v[r, c] = SiLU(z_v[r, c]); v contiguous (rows, n_v)."""
    r, c, r_ok, c_ok = _tile(n_rows, n_v, BR, BC)
    ok = r_ok[:, None] & c_ok[None, :]
    x = tl.load(z_ptr + r[:, None] * sz_r + c[None, :] * sz_c, mask=ok, other=0.0).to(tl.float32)
    v = x * tl.sigmoid(x)
    tl.store(v_ptr + r[:, None] * n_v + c[None, :], v.to(v_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _activation_bwd_kernel(z_ptr, dk_ptr, dv_ptr, dg_ptr, dz_ptr, n_rows, n_k, n_v, n_cols,
                           sz_r, sz_c, sk_r, sk_c, sv_r, sv_c, sg_r, sg_c,
                           HAS_DK: tl.constexpr, HAS_DV: tl.constexpr, HAS_DG: tl.constexpr,
                           BR: tl.constexpr, BC: tl.constexpr):
    """dz[r, c] (contiguous (rows, n_k + n_v + n_g)): dk[r, c] for c < n_k, dv[r, c'] SiLU'(z_v[r, c']) for the
    next n_v columns (c' = c - n_k), dg[r, c - n_k - n_v] after them; zeros where a gradient is absent (HAS_*
    False)."""
    r, c, r_ok, c_ok = _tile(n_rows, n_cols, BR, BC)
    ok = r_ok[:, None] & c_ok[None, :]
    cc = c[None, :]
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
def _gate_fwd_kernel(a_ptr, g_ptr, out_ptr, n_rows, n, sa_r, sa_c, sg_r, sg_c,
                     BR: tl.constexpr, BC: tl.constexpr):
    """out[r, c] = a[r, c] SiLU(g[r, c]); out contiguous (rows, n)."""
    r, c, r_ok, c_ok = _tile(n_rows, n, BR, BC)
    ok = r_ok[:, None] & c_ok[None, :]
    a = tl.load(a_ptr + r[:, None] * sa_r + c[None, :] * sa_c, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(g_ptr + r[:, None] * sg_r + c[None, :] * sg_c, mask=ok, other=0.0).to(tl.float32)
    out = a * (x * tl.sigmoid(x))
    tl.store(out_ptr + r[:, None] * n + c[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gate_bwd_kernel(grad_ptr, a_ptr, g_ptr, da_ptr, dg_ptr, n_rows, n, so_r, so_c, sa_r, sa_c, sg_r, sg_c,
                     BR: tl.constexpr, BC: tl.constexpr):
    """da = grad SiLU(g), dg = grad a SiLU'(g); both contiguous (rows, n)."""
    r, c, r_ok, c_ok = _tile(n_rows, n, BR, BC)
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

@kernel_op("tvq_kernels::gau_activation")
def gau_activation_values(z_v: Tensor) -> Tensor:
    """v = SiLU(z_v): contiguous, z_v's dtype (float32 math); z_v (..., n_v) any strides (the v part of z, read in
    place)."""
    v = torch.empty(z_v.shape, dtype=z_v.dtype, device=z_v.device)
    if not v.numel():
        return v
    z2 = _rows(z_v)
    rows, n_v = z2.shape
    br, bc = _tiles(rows, n_v)
    _silu_fwd_kernel[_grid(rows, n_v, br, bc)](z2, v, rows, n_v, *z2.stride(), BR=br, BC=bc)
    return v


@gau_activation_values.register_fake
def _(z_v):
    return torch.empty(z_v.shape, dtype=z_v.dtype, device=z_v.device)


def _dz_shape(z_v: Tensor, n_k: int, n_g: int) -> tuple[int, ...]:
    if not z_v.dim() or n_k < 0 or n_g < 0:
        raise ValueError(f"gau_activation_backward: z_v (..., n_v) and n_k, n_g >= 0 expected, got "
                         f"{tuple(z_v.shape)}, n_k={n_k}, n_g={n_g}")
    return (*z_v.shape[:-1], n_k + z_v.shape[-1] + n_g)


@kernel_op("tvq_kernels::gau_activation_backward")
def gau_activation_backward(z_v: Tensor, dk: Tensor | None, dv: Tensor | None, dg: Tensor | None, n_k: int,
                            n_g: int) -> Tensor:
    """dz (..., n_k + n_v + n_g), contiguous, z_v's dtype: [dk, dv * SiLU'(z_v), dg] along the last dim; a None
    gradient is zeros. z_v (..., n_v), dk (..., n_k), dv (..., n_v), dg (..., n_g): any strides."""
    dz = z_v.new_empty(_dz_shape(z_v, n_k, n_g))
    if not dz.numel():
        return dz
    n_v = z_v.shape[-1]
    z2 = _rows(z_v)
    grads, has = [], []
    for name, d, width in (("dk", dk, n_k), ("dv", dv, n_v), ("dg", dg, n_g)):
        if d is not None and d.shape != (*z_v.shape[:-1], width):
            raise ValueError(f"gau_activation_backward: {name} {tuple(z_v.shape[:-1]) + (width,)} expected, got "
                             f"{tuple(d.shape)}")
        has.append(d is not None and width > 0)
        d2 = _rows(d) if has[-1] else z2  # a dummy pointer for an absent gradient, never read
        grads += [d2, *d2.stride()]
    rows, n = z2.shape[0], dz.shape[-1]
    br, bc = _tiles(rows, n)
    _activation_bwd_kernel[_grid(rows, n, br, bc)](
        z2, grads[0], grads[3], grads[6], dz, rows, n_k, n_v, n, *z2.stride(), *grads[1:3], *grads[4:6],
        *grads[7:9], HAS_DK=has[0], HAS_DV=has[1], HAS_DG=has[2], BR=br, BC=bc)
    return dz


@gau_activation_backward.register_fake
def _(z_v, dk, dv, dg, n_k, n_g):
    return z_v.new_empty(_dz_shape(z_v, n_k, n_g))


class _GauActivation(torch.autograd.Function):
    """(k, v, g_pre): k and g_pre views of z, v by the kernel; backward one kernel writing dz. Saves z's v part
    (a view)."""

    @staticmethod
    def forward(ctx, z, n_k, n_v):
        ctx.set_materialize_grads(False)  # unused outputs' gradients stay None: no zeros made or read
        z_v = z[..., n_k:n_k + n_v]
        ctx.save_for_backward(z_v)
        ctx.n_k, ctx.n_g = n_k, z.shape[-1] - n_k - n_v
        return z[..., :n_k], gau_activation_values(z_v), z[..., n_k + n_v:]

    @staticmethod
    def backward(ctx, dk, dv, dg):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (z_v,) = ctx.saved_tensors
        return gau_activation_backward(z_v, dk, dv, dg, ctx.n_k, ctx.n_g), None, None


def gau_activation(z: Tensor, n_k: int, n_v: int) -> tuple[Tensor, Tensor, Tensor]:
    """(k, v, g_pre) of the GAU's joint projection z (..., n_k + n_v + n_g): k = z[..., :n_k] and
    g_pre = z[..., n_k + n_v:] are views of z (no copy: the gate's SiLU is :func:`silu_gate`'s), v =
    SiLU(z[..., n_k:n_k + n_v]) a new contiguous tensor in z's dtype (float32 math). Backward: one kernel writes
    z's gradient (contiguous) from those of k, v and g_pre (any of them unused: zeros)."""
    _check_widths(z, n_k, n_v)
    return _GauActivation.apply(z, n_k, n_v)


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
