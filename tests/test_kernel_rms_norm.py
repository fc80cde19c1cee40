"""The RMSNorm kernels (tvq.ops.kernels.rms_norm) against tvq.layers.norm.rms_norm in float64 (times the scale):
outputs and the gradients of x, weight and bias, with and without the affine part, D not a power of two, several
leading shapes, row counts that are not multiples of the row tile and persistent backward programs that walk
several tiles, float16 output from float32 input, float16 input, non-contiguous inputs and gradients, gradients
for only some inputs; the custom ops' registrations. On a CPU through Triton's interpreter (conftest sets
TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch
from conftest import close_to_reference as close

pytest.importorskip("triton")

from tvq.layers.norm import rms_norm  # noqa: E402
from tvq.ops.kernels import KERNEL_LAUNCHES  # noqa: E402
from tvq.ops.kernels import rms_norm as krms  # noqa: E402

F64 = torch.float64
EPS = 1e-6


def reference(x, weight, bias, scale):
    """tvq's rms_norm times scale (float64 in: float64 statistics)."""
    return rms_norm(x, EPS, weight, bias) * scale


def leaves_for(shape, affine, gen):
    """x (shape), weight and bias (D,) or None, float64; x has a spread of row magnitudes."""
    D = shape[-1]
    x = torch.randn(shape, generator=gen, dtype=F64) * (0.5 + torch.rand(*shape[:-1], 1, generator=gen, dtype=F64))
    if not affine:
        return x, None, None
    return x, 1 + torch.randn(D, generator=gen, dtype=F64) / 2, torch.randn(D, generator=gen, dtype=F64) / 2


def compare(x, weight, bias, scale, grad, dtype, tol, out_dtype=None, need=(True, True, True)):
    """The kernel in ``dtype`` (output in ``out_dtype``) against the float64 reference: output and the gradients
    of the inputs flagged in ``need`` (None where not needed); the reference's cotangent is the one the kernel
    got (rounded to the output's dtype)."""
    inputs = [t for t in (x, weight, bias)]
    flags = [t is not None and n for t, n in zip(inputs, need)]
    kin = [t.to(dtype).requires_grad_(f) if t is not None else None for t, f in zip(inputs, flags)]
    got = krms.rms_norm_kernel(kin[0], EPS, kin[1], kin[2], scale=scale, out_dtype=out_dtype)
    out_dtype = out_dtype or dtype
    assert got.shape == x.shape and got.dtype == out_dtype and got.is_contiguous()
    g = grad.to(out_dtype)
    ref = [t.detach().clone().requires_grad_(f) if t is not None else None for t, f in zip(inputs, flags)]
    want = reference(*ref, scale)
    close(got, want, tol)
    wanted = [t for t, f in zip(ref, flags) if f]
    if not wanted:
        return
    want_grads = iter(torch.autograd.grad(want, wanted, g.to(F64)))
    got.backward(g)
    for t, w, f in zip(kin, ref, flags):
        if t is None:
            continue
        if not f:
            assert t.grad is None
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape
        close(t.grad, next(want_grads), tol)


# shape, affine, scale, tiles (elements per row tile, backward programs); D 24, 100, 1000 are not powers of two;
# with the shrunk tiles the rows (37, 35) are no multiple of the row tile (2) and each backward program walks
# several tiles, one ending half empty
CASES = [
    ((4, 24), True, 1.0, None),
    ((2, 3, 100), False, 0.5, None),
    ((100,), True, 2.0, None),
    ((37, 24), True, 0.25, (64, 3)),
    ((5, 7, 100), False, 1.0, (256, 2)),
    ((3, 2, 5, 24), True, 0.7, (128, 2)),
    ((3, 1000), True, 1.0, None),
    ((2, 4096), True, 0.5, None),
]


@pytest.mark.parametrize("shape, affine, scale, tiles", CASES)
def test_kernel_matches_the_reference(monkeypatch, shape, affine, scale, tiles):
    if tiles:
        monkeypatch.setattr(krms, "TILES", dict(elements=tiles[0], programs=tiles[1]))
        N = torch.Size(shape[:-1]).numel()
        BR = krms._tile(N, shape[-1])[0]
        assert BR > 1 and N % BR and krms._programs(torch.device("cpu"), -(-N // BR)) < -(-N // BR)
    gen = torch.Generator().manual_seed(shape[-1] + len(shape))
    x, weight, bias = leaves_for(shape, affine, gen)
    compare(x, weight, bias, scale, torch.randn(shape, generator=gen, dtype=F64), torch.float32, 1e-5)


@pytest.mark.parametrize("affine", [False, True])
def test_float16_output_from_float32_input(affine):
    """The output in float16 (rounded once); the gradients stay float32-exact given the float16 cotangent."""
    gen = torch.Generator().manual_seed(5)
    shape = (3, 5, 100)
    x, weight, bias = leaves_for(shape, affine, gen)
    grad = torch.randn(shape, generator=gen, dtype=F64)
    kin = [t.float().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    got = krms.rms_norm_kernel(kin[0], EPS, kin[1], kin[2], scale=0.5, out_dtype=torch.float16)
    assert got.dtype == torch.float16
    ref = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    want = reference(*ref, 0.5)
    close(got, want, 1e-3)  # float16 rounding: 2^-11 relative
    g = grad.half()
    got.backward(g)
    want.backward(g.double())
    for t, w in zip(kin, ref):
        if t is not None:
            assert t.grad.dtype == torch.float32
            close(t.grad, w.grad, 1e-5)


@pytest.mark.parametrize("affine", [False, True])
def test_float16_input(affine):
    gen = torch.Generator().manual_seed(6)
    shape = (2, 9, 24)
    x, weight, bias = leaves_for(shape, affine, gen)
    compare(x, weight, bias, 0.5, torch.randn(shape, generator=gen, dtype=F64), torch.float16, 1e-2)


def test_float32_parameters_with_float16_input():
    """Parameters may keep their own dtype (float32 master weights): their gradients come back in it."""
    gen = torch.Generator().manual_seed(7)
    x, weight, bias = leaves_for((6, 24), True, gen)
    kx = x.half().requires_grad_()
    kw, kb = weight.float().requires_grad_(), bias.float().requires_grad_()
    got = krms.rms_norm_kernel(kx, EPS, kw, kb)
    assert got.dtype == torch.float16
    grad = torch.randn(6, 24, generator=gen, dtype=F64).half()
    got.backward(grad)
    ref = [t.clone().requires_grad_() for t in (kx.detach().double(), weight, bias)]
    want = reference(*ref, 1.0)
    want.backward(grad.double())
    close(got, want, 1e-2)
    for t, w in zip((kx, kw, kb), ref):
        assert t.grad.dtype == t.dtype
        close(t.grad, w.grad, 1e-2)


@pytest.mark.parametrize("layout", ["transposed", "row_slice", "leading_permuted"])
def test_non_contiguous_input_and_gradient(layout):
    """A transposed view (copied), a slice of wider rows (read in place) and permuted leading dims (copied); the
    output's gradient as a transposed view."""
    gen = torch.Generator().manual_seed(8)
    D = 24
    if layout == "transposed":
        leaf = torch.randn(D, 13, generator=gen)
        view = lambda t: t.t()  # noqa: E731  (13, D), columns strided
    elif layout == "row_slice":
        leaf = torch.randn(13, 3 * D, generator=gen)
        view = lambda t: t[:, D:2 * D]  # noqa: E731  rows 3 D apart, unit column stride
    else:
        leaf = torch.randn(3, 5, D, generator=gen)
        view = lambda t: t.transpose(0, 1)  # noqa: E731  (5, 3, D)
    leaf.requires_grad_()
    kx = view(leaf)
    assert not kx.is_contiguous()
    if layout == "row_slice":
        assert kx.stride() == (3 * D, 1)
    weight, bias = 1 + torch.randn(D, generator=gen, dtype=F64) / 2, torch.randn(D, generator=gen, dtype=F64) / 2
    grad = torch.randn(tuple(reversed(kx.shape)), generator=gen, dtype=F64).permute(*reversed(range(kx.dim())))
    assert not grad.is_contiguous()
    kw, kb = weight.float().requires_grad_(), bias.float().requires_grad_()
    got = krms.rms_norm_kernel(kx, EPS, kw, kb, scale=0.5)
    got_grads = torch.autograd.grad(got, (kx, kw, kb), grad.float())
    ref = [t.clone().requires_grad_() for t in (view(leaf.detach().double()), weight, bias)]
    want = reference(*ref, 0.5)
    want_grads = torch.autograd.grad(want, ref, grad)
    close(got, want, 1e-5)
    for g, w in zip(got_grads, want_grads):
        close(g, w, 1e-5)


@pytest.mark.parametrize("programs", [1, 2, 5, 10, 17])
def test_parameter_gradients_summed_by_the_tree(monkeypatch, programs):
    """The weight's and bias's gradients: the programs' partial sums added up inside the launch by a two-level tree
    of last programs (groups of ceil(sqrt(n)) programs, the last group smaller where n is not a square), against
    float64; the ticket counters are left at zero."""
    from tvq.ops.kernels.common import tickets

    monkeypatch.setattr(krms, "TILES", dict(elements=32, programs=programs))  # 2 rows a tile: 30 tiles for 60 rows
    gen = torch.Generator().manual_seed(programs)
    x, weight, bias = leaves_for((4, 15, 16), True, gen)
    grad = torch.randn(4, 15, 16, generator=gen, dtype=F64)
    kx, kw, kb = (t.float().requires_grad_() for t in (x, weight, bias))
    got = torch.autograd.grad(krms.rms_norm_kernel(kx, EPS, kw, kb), (kw, kb), grad.float())
    ref = [t.clone().requires_grad_() for t in (x, weight, bias)]
    want = torch.autograd.grad(reference(*ref, 1.0), ref[1:], grad)
    for g, w in zip(got, want):
        close(g, w, 1e-5)
    assert not tickets(kx.device).any()


def test_a_transposed_heads_gradient_is_read_in_place(monkeypatch):  # (a model's step: test_kernel_launches)
    """The query/key norms' output (B, T, H, D) is used transposed, (B, H, T, D), so its gradient comes as a
    transpose whose B and T do not merge: read in place (three-level row addressing, no copy), the values the
    reference's."""
    monkeypatch.setattr(krms, "TILES", dict(elements=64, programs=3))  # tiles that straddle heads and tokens
    gen = torch.Generator().manual_seed(9)
    B, T, H, D = 2, 5, 3, 16
    x = torch.randn(B, T, H, D, generator=gen, dtype=F64)
    g = torch.randn(B, H, T, D, generator=gen, dtype=F64).transpose(1, 2)  # (B, T, H, D), B and T not mergeable
    kx = x.float().requires_grad_()
    got = krms.rms_norm_kernel(kx, EPS, scale=0.5)
    gf = g.float()
    rows = krms._grad_rows(gf, D)
    assert rows[0].data_ptr() == gf.data_ptr() and rows[3:5] == (T, H)  # read in place, as (B, T, H, D)
    (got_dx,) = torch.autograd.grad(got, kx, gf)
    ref = x.clone().requires_grad_()
    (want_dx,) = torch.autograd.grad(reference(ref, None, None, 0.5), ref, g)
    close(got_dx, want_dx, 1e-5)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (True, False, True), (False, True, True), (True, True, True)])
def test_gradients_of_only_some_inputs(monkeypatch, need):
    monkeypatch.setattr(krms, "TILES", dict(elements=64, programs=2))  # BR 2, 11 rows: a half tile
    gen = torch.Generator().manual_seed(9)
    shape = (11, 24)
    x, weight, bias = leaves_for(shape, True, gen)
    compare(x, weight, bias, 0.5, torch.randn(shape, generator=gen, dtype=F64), torch.float32, 1e-5, need=need)


def test_saves_only_x_and_weight_and_runs_without_grad():
    gen = torch.Generator().manual_seed(10)
    x, weight, bias = (t.float() for t in leaves_for((4, 24), True, gen))
    kx, kw, kb = (t.clone().requires_grad_() for t in (x, weight, bias))
    out = krms.rms_norm_kernel(kx, EPS, kw, kb)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 2 and saved[0].data_ptr() == kx.data_ptr() and saved[1].data_ptr() == kw.data_ptr()
    with torch.no_grad():
        plain = krms.rms_norm_kernel(x, EPS, weight, bias)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, out.detach(), rtol=0, atol=0)
    # empty inputs: no launch, empty results and zero parameter gradients
    e = torch.zeros(0, 24, requires_grad=True)
    out = krms.rms_norm_kernel(e, EPS, kw, kb)
    assert out.shape == (0, 24)
    out.sum().backward()
    assert e.grad.shape == (0, 24)


def test_rejects_bad_inputs():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="both"):
        krms.rms_norm_kernel(x, EPS, torch.ones(8))
    with pytest.raises(ValueError, match=r"\(8,\)"):
        krms.rms_norm_kernel(x, EPS, torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="at most"):
        krms.rms_norm_kernel(torch.randn(1, krms.MAX_D + 1), EPS)


def test_the_ops_check_and_fake_shapes():
    """Schema and fake (shape-only) registrations of the two launches, every flag; the fake results' shapes and
    dtypes under FakeTensorMode; the ops also trace under AOT dispatch with dynamic shapes."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 24, generator=gen)
    w, b = torch.randn(24, generator=gen), torch.randn(24, generator=gen)
    grad = torch.randn(2, 5, 24, generator=gen).half()
    utils = ("test_schema", "test_faketensor")
    for weight, bias in ((w, b), (None, None)):
        for out_dtype in (torch.float32, torch.float16):
            torch.library.opcheck(krms.rms_norm.op, (x, weight, bias, EPS, 0.5, out_dtype),
                                  test_utils=(*utils, "test_aot_dispatch_dynamic"))
    torch.library.opcheck(krms.rms_norm.op, (x.transpose(0, 1), w, b, EPS, 1.0, torch.float16), test_utils=utils)
    for x_grad, param_grad in ((True, True), (True, False), (False, True), (False, False)):
        torch.library.opcheck(krms.rms_norm_backward.op, (grad, x, w, EPS, 0.5, x_grad, param_grad),
                              test_utils=(*utils, "test_aot_dispatch_dynamic"))
    torch.library.opcheck(krms.rms_norm_backward.op, (grad, x, None, EPS, 0.5, True, False), test_utils=utils)

    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.empty(3, 7, 100))
        fw, fb = mode.from_tensor(torch.empty(100)), mode.from_tensor(torch.empty(100))
        out = krms.rms_norm(fx, fw, fb, EPS, 0.5, torch.bfloat16)
        assert out.shape == (3, 7, 100) and out.dtype == torch.bfloat16
        dx, dwb = krms.rms_norm_backward(out, fx, fw, EPS, 0.5, True, True)
        assert dx.shape == (3, 7, 100) and dx.dtype == torch.float32
        assert dwb.shape == (2, 100) and dwb.dtype == torch.float32
        dx, dwb = krms.rms_norm_backward(out, fx.half(), None, EPS, 0.5, True, False)
        assert dx.dtype == torch.float16 and dwb.shape == (0,)
        dx, _ = krms.rms_norm_backward(out, fx, fw, EPS, 0.5, False, True)
        assert dx.shape == (0,)
    # the cost model's count: one launch (the partial sums reduced inside it), their scratch only with parameters
    launches = KERNEL_LAUNCHES["tvq_kernels::rms_norm_backward"]
    assert launches(grad, x, w, EPS, 0.5, True, True)[0] == 1 and launches(grad, x, w, EPS, 0.5, True, True)[1] > 0
    assert launches(grad, x, w, EPS, 0.5, True, False) == (1, 0)


def test_compiles_in_one_graph():
    """torch.compile traces the norm and its backward (the kernels through their fake registrations) whole."""
    gen = torch.Generator().manual_seed(12)
    x, weight, bias = (t.float().requires_grad_() for t in leaves_for((3, 4, 24), True, gen))
    fn = lambda x, w, b: krms.rms_norm_kernel(x, EPS, w, b, scale=0.5, out_dtype=torch.float16)  # noqa: E731
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, weight, bias)
    want = fn(x, weight, bias)
    got_grads = torch.autograd.grad(got.float().sum(), (x, weight, bias))
    want_grads = torch.autograd.grad(want.float().sum(), (x, weight, bias))
    for a, b in zip((got, *got_grads), (want, *want_grads)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("affine", [False, True])
def test_residual_output_joins_the_gradients(affine):
    """residual=True returns x itself too; a pre-norm sublayer's x + f(out) gets x's whole gradient from the norm's
    one backward launch (the residual's gradient added in the kernel), as autograd's sum of the two."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 24, generator=gen, dtype=torch.float64)
    w, b = (torch.randn(24, generator=gen, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(3, 7, 24, generator=gen, dtype=torch.float64)
    params = (w, b) if affine else (None, None)
    ref = x.clone().requires_grad_()
    want = ref + reference(ref, *params, 0.5).sin()
    (want_g,) = torch.autograd.grad(want, ref, grad)
    got_x = x.float().requires_grad_()
    out, passed = krms.rms_norm_kernel(got_x, 1e-6, *(p.float() if p is not None else None for p in params),
                                       scale=0.5, residual=True)
    assert torch.equal(passed, got_x)
    (got_g,) = torch.autograd.grad(passed + out.sin(), got_x, grad.float())
    close(got_g, want_g, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_groups_of_rows_inside_a_wider_tensor_are_read_in_place(monkeypatch, dtype):
    """x a (B, T, G, D) view of G heads side by side inside a wider (B, T, n) tensor (the query and key heads of a
    projection): read where it is (no copy of x), the same output and gradient as the formula."""
    from tvq.ops.kernels import rms_norm as krn
    from tvq.ops.kernels.rms_norm import rms_norm_kernel

    B, T, G, D, n = 2, 5, 3, 16, 64
    z64 = torch.randn(B, T, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = []
    real = krn._rows
    monkeypatch.setattr(krn, "_rows", lambda t, d: calls.append(t.data_ptr()) or real(t, d))
    z = z64.to(dtype).requires_grad_()
    x = z[..., 8: 8 + G * D].view(B, T, G, D)
    got = rms_norm_kernel(x, 1e-6, scale=0.5)
    assert z.data_ptr() + 8 * z.element_size() not in calls  # x was not turned into rows (copied)
    x64 = z64[..., 8: 8 + G * D].view(B, T, G, D).clone().requires_grad_()
    want = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * 0.5
    tol = {torch.float32: 1e-5, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    g = torch.randn(B, T, G, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d_z, = torch.autograd.grad(got, z, g.to(dtype))
    d_x, = torch.autograd.grad(want, x64, g)
    torch.testing.assert_close(d_z[..., 8: 8 + G * D].double(), d_x.reshape(B, T, G * D), rtol=tol, atol=tol)
    assert (d_z[..., :8] == 0).all() and (d_z[..., 8 + G * D:] == 0).all()


@pytest.mark.parametrize("inside", [True, False], ids=["in-a-projection", "contiguous"])
@pytest.mark.parametrize("B, Hq, Hk", [(1, 1, 1), (2, 3, 1), (2, 2, 2)])
def test_split_output_reads_its_two_gradients_apart(inside, B, Hq, Hk):
    """split=n returns out.split([n, G - n], -2) (the query and key heads of one norm); their gradients, with the
    layouts the attention gives them (head-major, (B, H, T, D) contiguous, seen as (B, T, H, D)), reach x through
    the backward kernel without being joined (no cat), equal to the formula's and to the PyTorch path's split."""
    from tvq.ops.kernels import rms_norm as krn
    from tvq.ops.kernels import use_kernels

    T, D, pad = 5, 16, 8
    G = Hq + Hk
    gen = torch.Generator().manual_seed(B * 10 + Hq)
    z64 = torch.randn(B, T, 2 * pad + G * D, generator=gen, dtype=F64)
    g_q = torch.randn(B, Hq, T, D, generator=gen, dtype=F64)
    g_k = torch.randn(B, Hk, T, D, generator=gen, dtype=F64)

    def x_of(z):
        return z[..., pad: pad + G * D].view(B, T, G, D) if inside else z[..., pad: pad + G * D].reshape(B, T, G, D)

    z = z64.float().requires_grad_()
    q, k = krn.rms_norm_kernel(x_of(z), EPS, scale=0.5, split=Hq)
    assert q.shape == (B, T, Hq, D) and k.shape == (B, T, Hk, D)
    # outputs of the norm's node itself, not of a split after it (whose backward would cat the two gradients)
    assert q.grad_fn.name() == k.grad_fn.name() == "_RMSNormBackward"
    d_z, = torch.autograd.grad((q, k), z, (g_q.float().transpose(1, 2), g_k.float().transpose(1, 2)))
    ref = z64.clone().requires_grad_()
    want = reference(x_of(ref), None, None, 0.5)
    want_q, want_k = want.split([Hq, Hk], -2)
    close(q, want_q, 1e-5)
    close(k, want_k, 1e-5)
    d_ref, = torch.autograd.grad((want_q, want_k), ref, (g_q.transpose(1, 2), g_k.transpose(1, 2)))
    close(d_z, d_ref, 1e-5)
    with use_kernels(False):  # the PyTorch path's split: the same parts
        p_q, p_k = rms_norm(x_of(z64), EPS, scale=0.5, split=Hq)
    close(p_q, want_q, 1e-12)
    close(p_k, want_k, 1e-12)
    with pytest.raises(ValueError, match="split"):
        krn.rms_norm_kernel(x_of(z), EPS, split=G)
