"""The fused residual dropout kernel (tvq.ops.kernels.residual): out - x is res times a mask in {0, 1/(1-p)} times
LayerDrop's row scale, the mask drawn with probability p, fixed by the seed, and drawn again in backward (d_res =
grad * the same mask * row_scale, d_x = grad); p = 0 exact; float16; odd widths and several programs per row; the
custom ops' registrations, fake tensors, torch.compile. On a CPU through Triton's interpreter (conftest sets
TRITON_INTERPRET=1)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from tvq.layers.residual import layer_drop  # noqa: E402
from tvq.ops.kernels import residual as kres  # noqa: E402
from tvq.ops.kernels.residual import draw_seed, layer_drop_scale, residual_dropout  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(shape, seed=0, x_dtype=torch.float32, res_dtype=torch.float32):
    """x and res with |res| >= 0.5 (a kept element's out - x is never 0, a dropped one's always is)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(x_dtype)
    r = torch.randn(shape, generator=gen)
    res = (r + 0.5 * r.sign() + (r == 0)).to(res_dtype)
    return x, res


def row_scale_for(B, gen_seed=1):
    """Some rows dropped (0), the rest kept (1 / (1 - 0.25)), as LayerDrop gives."""
    keep = torch.rand(B, generator=torch.Generator().manual_seed(gen_seed)) >= 0.25
    keep[0], keep[-1] = True, False
    return keep.float() / 0.75


def rows(t, scale):
    """row_scale (B,) broadcast over t's other dims."""
    return scale.view(-1, *[1] * (t.dim() - 1))


def deduced_mask(out, x, res, scale):
    """The multiplier m in {0, 1/(1-p)} of each element, read off the forward (rows that LayerDrop kept)."""
    diff = out.double() - x.double()
    s = rows(diff, scale) if scale is not None else 1.0
    return torch.where(diff != 0, 1.0, 0.0), diff / (res.double() * s)


@pytest.mark.parametrize("shape, block", [((3, 10, 37), None), ((4, 7, 5, 6), 8), ((2, 3), None), ((5, 130), 8)])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("with_scale", [False, True])
def test_forward_and_backward_apply_one_mask(monkeypatch, shape, block, p, with_scale):
    """out - x = res * m * row_scale, m elementwise 0 or 1/(1-p); d_res = grad * the same m * row_scale, d_x = grad.
    Widths not powers of two, rows not multiples of 4, several programs per row (a small BLOCK)."""
    if block:
        monkeypatch.setattr(kres, "BLOCK", block)
    x, res = inputs(shape)
    scale = row_scale_for(shape[0]) if with_scale else None
    x.requires_grad_(), res.requires_grad_()
    out = residual_dropout(x, res, p, scale, seed=1234)
    assert out.shape == x.shape and out.dtype == torch.float32
    kept, m = deduced_mask(out.detach(), x.detach(), res.detach(), scale)
    s = rows(x, scale) if scale is not None else torch.ones(())
    live = (s != 0).expand(shape)  # rows LayerDrop kept: there the mask shows
    assert ((m[live] - 1 / (1 - p)).abs() < 1e-6).logical_or(m[live] == 0).all()
    mask = kept / (1 - p)
    want = res.detach().double() * mask * s.double()
    torch.testing.assert_close((out.detach() - x.detach()).double(), want, rtol=1e-6, atol=1e-6)
    if scale is not None:
        assert (out.detach() == x.detach())[~live].all()  # dropped rows: out is x exactly

    grad = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    d_x, d_res = torch.autograd.grad(out, (x, res), grad)
    assert d_x.dtype == d_res.dtype == torch.float32
    assert torch.equal(d_x, grad)
    if scale is None:  # every element's mask is known
        torch.testing.assert_close(d_res.double(), grad.double() * mask, rtol=1e-6, atol=1e-7)
    else:  # kept rows: the same mask; dropped rows: zero
        torch.testing.assert_close(d_res.double(), grad.double() * mask * s.double(), rtol=1e-6, atol=1e-7)


def test_drop_fraction_is_p():
    """About a fraction p of ~1e5 elements dropped (within 5 sigma), for several p; the kept ones scaled by
    1 / (1 - p)."""
    shape = (4, 100, 250)
    n = math.prod(shape)
    x, res = torch.zeros(shape), torch.ones(shape)
    for p in (0.05, 0.3, 0.5, 0.9):
        out = residual_dropout(x, res, p, seed=77)
        dropped = (out == 0).double().mean().item()
        assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n), (p, dropped)
        assert torch.allclose(out[out != 0], torch.tensor(1 / (1 - p)), rtol=1e-6)
        # each row and each lane of a Philox call drops about p too (no lane or row left out)
        per_row = (out == 0).double().flatten(1).mean(1)
        assert (per_row - p).abs().max() < 5 * math.sqrt(p * (1 - p) / (n / shape[0]))
        per_lane = (out == 0).double().view(-1, 4).mean(0)
        assert (per_lane - p).abs().max() < 5 * math.sqrt(p * (1 - p) / (n / 4))


def test_the_seed_fixes_the_mask():
    """The same seed and shape: the same mask (also with a LayerDrop scale, also for other inputs); another seed:
    another mask."""
    shape = (3, 20, 24)
    x, res = inputs(shape)
    a = residual_dropout(x, res, 0.4, seed=5)
    assert torch.equal(a, residual_dropout(x, res, 0.4, seed=5))
    assert not torch.equal(a == x, residual_dropout(x, res, 0.4, seed=6) == x)
    x2, res2 = inputs(shape, seed=3)
    assert torch.equal(a == x, residual_dropout(x2, res2, 0.4, seed=5) == x2)
    scale = torch.full((3,), 2.0)
    assert torch.equal(a == x, residual_dropout(x, res, 0.4, scale, seed=5) == x)


def test_p_zero_is_exact_and_p_one_drops_everything():
    shape = (3, 5, 19)
    x, res = inputs(shape)
    scale = row_scale_for(3)
    assert torch.equal(residual_dropout(x, res, 0.0, scale), x + res * rows(res, scale))
    assert torch.equal(residual_dropout(x, res), x + res)
    assert torch.equal(residual_dropout(x, res, 1.0, scale), x)
    res.requires_grad_()
    d_res, = torch.autograd.grad(residual_dropout(x, res, 0.0, scale), res, torch.ones(shape))
    assert torch.equal(d_res, rows(res, scale).expand(shape))


def test_half_precision():
    """float16 res with float32 x: out float32, d_res float16, d_x float32; both float16: out float16. The mask is
    the float32 run's (it depends on the seed and shape only); math in float32, rounded once."""
    shape = (2, 9, 40)
    x, res = inputs(shape)
    scale = row_scale_for(2)
    ref = residual_dropout(x, res, 0.3, scale, seed=42)
    mask = (ref != x).double() / 0.7 * rows(x, scale).double()  # m * row_scale

    x16, res16 = x.clone().requires_grad_(), res.half().requires_grad_()
    out = residual_dropout(x16, res16, 0.3, scale, seed=42)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), x.double() + res16.detach().double() * mask, rtol=1e-6, atol=1e-6)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    d_x, d_res = torch.autograd.grad(out, (x16, res16), grad)
    assert d_x.dtype == torch.float32 and d_res.dtype == torch.float16
    assert torch.equal(d_x, grad)
    torch.testing.assert_close(d_res, (grad.double() * mask).half(), rtol=1e-3, atol=1e-6)

    xh = x.half().requires_grad_()
    out = residual_dropout(xh, res16, 0.3, scale, seed=42)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, (xh.detach().double() + res16.detach().double() * mask).half(), rtol=1e-3,
                               atol=1e-3)
    gh = grad.half()
    d_x, d_res = torch.autograd.grad(out, (xh, res16), gh)
    assert d_x.dtype == d_res.dtype == torch.float16 and torch.equal(d_x, gh)
    torch.testing.assert_close(d_res, (gh.double() * mask).half(), rtol=1e-3, atol=1e-3)


def test_gradcheck():
    """Numerical gradients (the mask fixed by the seed) match backward's (float64 in and out, float32 inside)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([1.5, 0.0])
    assert torch.autograd.gradcheck(lambda a, b: residual_dropout(a, b, 0.4, scale, seed=3), (x, res), eps=1e-2,
                                    atol=1e-4, rtol=1e-4, fast_mode=True)


def test_layer_drop_scale_draws_as_layer_drop():
    """layer_drop_scale reads the generator as layer_drop does: the same rows dropped, the same result."""
    x, res = inputs((6, 4, 8))
    torch.manual_seed(11)
    want = x + layer_drop(res, 0.5, True)
    torch.manual_seed(11)
    got = residual_dropout(x, res, 0.0, layer_drop_scale(6, 0.5))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert layer_drop_scale(6, 0.0) is None


def test_draw_seed():
    """Reproducible under torch.manual_seed, an int32 value, and real even under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(3)
    a = [draw_seed() for _ in range(3)]
    torch.manual_seed(3)
    assert a == [draw_seed() for _ in range(3)] and len(set(a)) == 3
    assert all(isinstance(s, int) and 0 <= s < 2**31 - 1 for s in a)
    with FakeTensorMode():
        assert isinstance(draw_seed(), int)


def test_the_ops_trace():
    """Both ops' registrations (opcheck: schema, fake, AOT dispatch); the wrapper and its backward under
    FakeTensorMode (as the cost model runs it), the seed drawn there too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, res = inputs((2, 3, 20), res_dtype=torch.float16)
    scale = row_scale_for(2)
    for rs in (scale, None):
        for p in (0.0, 0.3):
            torch.library.opcheck(kres.residual_dropout_op, (x, res, rs, p, 7))
            torch.library.opcheck(kres.residual_dropout_backward_op, (x, rs, p, 7, torch.float16))
    with FakeTensorMode():
        fx = torch.empty(2, 3, 20).requires_grad_()
        fr = torch.empty(2, 3, 20, dtype=torch.bfloat16).requires_grad_()
        out = residual_dropout(fx, fr, 0.1, torch.ones(2))
        assert out.dtype == torch.float32 and out.shape == (2, 3, 20)
        d_x, d_res = torch.autograd.grad(out, (fx, fr), torch.empty_like(out))
        assert d_x.dtype == torch.float32 and d_res.dtype == torch.bfloat16


def test_compiles_in_one_graph():
    """torch.compile traces the op and its backward (through the fake registrations) whole, for a given seed."""
    x, res = inputs((2, 4, 12))
    scale = row_scale_for(2)
    leaves = [x.requires_grad_(), res.requires_grad_()]
    compiled = torch.compile(residual_dropout, backend="aot_eager", fullgraph=True)
    got = compiled(x, res, 0.3, scale, 21)
    want = residual_dropout(x, res, 0.3, scale, 21)
    for a, b in zip((got, *torch.autograd.grad(got.sum(), leaves)), (want, *torch.autograd.grad(want.sum(), leaves))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_empty_and_bad_inputs():
    x = torch.empty(0, 4)
    assert residual_dropout(x, x, 0.5, seed=1).shape == (0, 4)
    x, res = inputs((2, 3))
    with pytest.raises(ValueError, match="one shape"):
        residual_dropout(x, res[:, :2], 0.1)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        residual_dropout(x, res, 1.5)
    with pytest.raises(ValueError, match="row_scale"):
        residual_dropout(x, res, 0.1, torch.ones(3))
