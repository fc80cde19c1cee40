"""The fused residual dropout kernel (tvq.ops.kernels.residual): out - x is res times a mask in {0, 1/(1-p)} times
LayerDrop's row factor in {0, 1/(1-layerdrop)}, each drawn with its probability, fixed by the seed, the mask the
same with or without LayerDrop, and drawn again in backward (d_res = grad * the same mask * row factor, d_x = grad);
p = 0 exact; float16; odd widths and several programs per row; the custom ops' registrations, fake tensors,
torch.compile. On a CPU through Triton's interpreter (conftest sets
TRITON_INTERPRET=1)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from tvq.ops.kernels import residual as kres  # noqa: E402
from tvq.ops.kernels import use_kernels  # noqa: E402
from tvq.ops.kernels.residual import draw_seed, residual_dropout  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(shape, seed=0, x_dtype=torch.float32, res_dtype=torch.float32):
    """x and res with |res| >= 0.5 (a kept element's out - x is never 0, a dropped one's always is)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(x_dtype)
    r = torch.randn(shape, generator=gen)
    res = (r + 0.5 * r.sign() + (r == 0)).to(res_dtype)
    return x, res


def live_rows(out, x):
    """(B,) bool: the rows LayerDrop kept (out differs from x somewhere; inputs() keeps |res| >= 0.5)."""
    return (out != x).flatten(1).any(1)


def rows(t, v):
    """A (B,) vector broadcast over t's other dims."""
    return v.view(-1, *[1] * (t.dim() - 1))


@pytest.mark.parametrize("shape, block", [((3, 10, 37), None), ((4, 7, 5, 6), 8), ((2, 3), None), ((5, 130), 8)])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("layerdrop", [0.0, 0.5])
def test_forward_and_backward_apply_one_mask(monkeypatch, shape, block, p, layerdrop):
    """out - x = res * m * f_b, m elementwise 0 or 1/(1-p) (the mask without LayerDrop, same seed), f_b LayerDrop's
    0 or 1/(1-layerdrop) per row; d_res = grad * the same m * f_b, d_x = grad. Widths not powers of two, rows not
    multiples of 4, several programs per row (a small BLOCK)."""
    if block:
        monkeypatch.setattr(kres, "BLOCK", block)
    x, res = inputs(shape)
    x.requires_grad_(), res.requires_grad_()
    out = residual_dropout(x, res, p, layerdrop, seed=1234)
    assert out.shape == x.shape and out.dtype == torch.float32
    base = residual_dropout(x.detach(), res.detach(), p, 0.0, seed=1234)  # the mask alone
    mask = (base != x.detach()).double() / (1 - p)  # 0 or 1/(1-p)
    factor = rows(x, live_rows(out.detach(), x.detach()).double() / (1 - layerdrop))  # 0 or 1/(1-layerdrop)
    want = res.detach().double() * mask * factor
    torch.testing.assert_close((out.detach() - x.detach()).double(), want, rtol=1e-6, atol=1e-6)
    diff = (base.detach() - x.detach()).double() / res.detach().double()
    assert ((diff - 1 / (1 - p)).abs() < 1e-6).logical_or(diff == 0).all()

    grad = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    d_x, d_res = torch.autograd.grad(out, (x, res), grad)
    assert d_x.dtype == d_res.dtype == torch.float32
    assert torch.equal(d_x, grad)
    torch.testing.assert_close(d_res.double(), grad.double() * mask * factor, rtol=1e-6, atol=1e-7)


def test_layerdrop_drops_whole_rows_with_its_probability():
    """About a fraction layerdrop of 256 rows dropped whole (within 5 sigma), the others scaled by
    1 / (1 - layerdrop); with dropout too, a dropped row is x exactly. (A program per row: the interpreter's cost.)"""
    shape = (256, 6)
    x, res = torch.zeros(shape), torch.ones(shape)
    for ld in (0.2, 0.5):
        out = residual_dropout(x, res, 0.0, ld, seed=13)
        dropped = (out == 0).all(1)
        assert torch.equal(dropped, (out == 0).any(1))  # all or nothing per row
        frac = dropped.double().mean().item()
        assert abs(frac - ld) < 5 * math.sqrt(ld * (1 - ld) / shape[0]), (ld, frac)
        assert torch.allclose(out[~dropped], torch.tensor(1 / (1 - ld)), rtol=1e-6)
    with_dropout = residual_dropout(x, res, 0.3, 0.5, seed=13)
    assert (with_dropout[dropped] == 0).all()


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
    """The same seed and shape: the same mask (also with LayerDrop, in the rows it keeps; also for other inputs);
    another seed: another mask."""
    shape = (8, 20, 24)
    x, res = inputs(shape)
    a = residual_dropout(x, res, 0.4, seed=5)
    assert torch.equal(a, residual_dropout(x, res, 0.4, seed=5))
    assert not torch.equal(a == x, residual_dropout(x, res, 0.4, seed=6) == x)
    x2, res2 = inputs(shape, seed=3)
    assert torch.equal(a == x, residual_dropout(x2, res2, 0.4, seed=5) == x2)
    dropped = residual_dropout(x, res, 0.4, 0.5, seed=5)
    live = live_rows(dropped, x)
    assert live.any() and not live.all()  # a seed where LayerDrop keeps some rows and drops others
    assert torch.equal((a == x)[live], (dropped == x)[live])


def test_p_zero_is_exact_and_p_one_drops_everything():
    shape = (3, 5, 19)
    x, res = inputs(shape)
    assert torch.equal(residual_dropout(x, res), x + res)
    assert torch.equal(residual_dropout(x, res, 1.0, 0.3), x)
    assert torch.equal(residual_dropout(x, res, 0.0, 1.0), x)
    out = residual_dropout(x, res, 0.0, 0.5, seed=4)
    factor = rows(x, live_rows(out, x).float() * 2.0)
    assert torch.equal(out, x + res * factor)
    res.requires_grad_()
    d_res, = torch.autograd.grad(residual_dropout(x, res, 0.0, 0.5, seed=4), res, torch.ones(shape))
    assert torch.equal(d_res, factor.expand(shape))


def test_half_precision():
    """float16 res with float32 x: out float32, d_res float16, d_x float32; both float16: out float16. The mask is
    the float32 run's (it depends on the seed and shape only); math in float32, rounded once."""
    shape = (2, 9, 40)
    x, res = inputs(shape)
    ref = residual_dropout(x, res, 0.3, 0.5, seed=42)
    mask = (ref != x).double() / 0.7 * rows(x, live_rows(ref, x).double() * 2.0)  # m * row factor

    x16, res16 = x.clone().requires_grad_(), res.half().requires_grad_()
    out = residual_dropout(x16, res16, 0.3, 0.5, seed=42)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), x.double() + res16.detach().double() * mask, rtol=1e-6, atol=1e-6)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    d_x, d_res = torch.autograd.grad(out, (x16, res16), grad)
    assert d_x.dtype == torch.float32 and d_res.dtype == torch.float16
    assert torch.equal(d_x, grad)
    torch.testing.assert_close(d_res, (grad.double() * mask).half(), rtol=1e-3, atol=1e-6)

    xh = x.half().requires_grad_()
    out = residual_dropout(xh, res16, 0.3, 0.5, seed=42)
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
    assert torch.autograd.gradcheck(lambda a, b: residual_dropout(a, b, 0.4, 0.5, seed=3), (x, res), eps=1e-2,
                                    atol=1e-4, rtol=1e-4, fast_mode=True)


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
    for ld in (0.0, 0.5):
        for p in (0.0, 0.3):
            torch.library.opcheck(kres.residual_dropout_op.op, (x, res, p, ld, 7))
            torch.library.opcheck(kres.residual_dropout_backward_op.op, (x, p, ld, 7, torch.float16))
    with FakeTensorMode():
        fx = torch.empty(2, 3, 20).requires_grad_()
        fr = torch.empty(2, 3, 20, dtype=torch.bfloat16).requires_grad_()
        out = residual_dropout(fx, fr, 0.1, 0.3)
        assert out.dtype == torch.float32 and out.shape == (2, 3, 20)
        d_x, d_res = torch.autograd.grad(out, (fx, fr), torch.empty_like(out))
        assert d_x.dtype == torch.float32 and d_res.dtype == torch.bfloat16


def test_compiles_in_one_graph():
    """torch.compile traces the op and its backward (through the fake registrations) whole, for a given seed."""
    x, res = inputs((2, 4, 12))
    leaves = [x.requires_grad_(), res.requires_grad_()]
    compiled = torch.compile(residual_dropout, backend="aot_eager", fullgraph=True)
    got = compiled(x, res, 0.3, 0.5, 21)
    want = residual_dropout(x, res, 0.3, 0.5, 21)
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
    with pytest.raises(ValueError, match=r"layerdrop must be in \[0, 1\]"):
        residual_dropout(x, res, 0.1, -0.2)


def test_a_captured_training_step_draws_its_dropout_on_the_device(monkeypatch):
    """While a CUDA graph is captured, a training step's dropout and LayerDrop run op by op (PyTorch's draws are
    taken anew on each replay; the kernel's host-drawn seed would be frozen into the graph); without randomness
    (eval, or p = layerdrop = 0) the kernel still runs."""
    from tvq.layers import residual as layer
    from tvq.ops.kernels import residual as kernel

    calls = []
    real = kernel.residual_dropout
    monkeypatch.setattr(kernel, "residual_dropout", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(layer, "graph_capturing", lambda t: True)
    g = torch.Generator().manual_seed(0)
    x, res = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    with use_kernels(True):
        torch.manual_seed(1)
        got = layer.add_residual(x, res, 0.5, 0.3, True)
        assert not calls
        torch.manual_seed(1)
        want = x + layer.layer_drop(torch.nn.functional.dropout(res, 0.5, True), 0.3, True)
        assert torch.equal(got, want)
        layer.add_residual(x, res, 0.5, 0.3, False)
        layer.add_residual(x, res, 0.0, 0.0, True)
    assert len(calls) == 2
