"""The residual add fused with the next sublayer's RMSNorm (tvq.ops.kernels.residual_norm): y = x + res * m with m the
kernel's multipliers (read back from y with x = 0, res = 1), h the norm of y; outputs and every gradient against
float64 with that m, in float32 and with a float16 branch (autocast's layout), affine or not, odd widths, several
programs; the mask's rate, LayerDrop's whole rows, the same draws in backward; registrations. On a CPU through
Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
from conftest import close_to_reference as close

pytest.importorskip("triton")

from tvq.layers.norm import rms_norm  # noqa: E402
from tvq.ops.kernels import KERNEL_LAUNCHES  # noqa: E402
from tvq.ops.kernels import residual_norm as krn  # noqa: E402
from tvq.ops.kernels import rms_norm as krms  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 1e-6
F64 = torch.float64


def multipliers(shape, p, layerdrop, seed):
    """The kernel's m for rows of ``shape``: y with x = 0, res = 1."""
    y, _ = krn.residual_norm_kernel(torch.zeros(shape), torch.ones(shape), None, None, EPS, p, layerdrop, seed)
    return y.double()


@pytest.mark.parametrize("res_dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("shape, affine, p, layerdrop", [((2, 7, 24), True, 0.3, 0.5), ((3, 5, 22), False, 0.5, 0.0),
                                                         ((1, 9, 16), True, 0.0, 0.0)])
def test_outputs_and_gradients_match_the_reference(monkeypatch, res_dtype, tol, shape, affine, p, layerdrop):
    monkeypatch.setattr(krms, "TILES", dict(elements=64, programs=3))  # several row tiles and persistent programs
    gen = torch.Generator().manual_seed(sum(shape))
    D, seed = shape[-1], 11
    x64, res64 = torch.randn(shape, generator=gen, dtype=F64), torch.randn(shape, generator=gen, dtype=F64)
    w64 = 1 + torch.randn(D, generator=gen, dtype=F64) / 2 if affine else None
    b64 = torch.randn(D, generator=gen, dtype=F64) / 2 if affine else None
    g_y, g_h = torch.randn(shape, generator=gen, dtype=F64), torch.randn(shape, generator=gen, dtype=F64)
    m = multipliers(shape, p, layerdrop, seed)
    if 0 < p < 1:
        assert 0 < (m == 0).sum() < m.numel()

    x, res = x64.float().requires_grad_(), res64.to(res_dtype).requires_grad_()
    params = [t.float().requires_grad_() for t in (w64, b64)] if affine else [None, None]
    y, h = krn.residual_norm_kernel(x, res, *params, EPS, p, layerdrop, seed, out_dtype=res_dtype)
    assert y.dtype == torch.float32 and h.dtype == res_dtype
    leaves = [x, res] + ([*params] if affine else [])
    got = torch.autograd.grad((y, h), leaves, (g_y.float(), g_h.to(res_dtype)))

    ref = [x64.clone().requires_grad_(), res.detach().double().requires_grad_()]
    ref += [t.clone().requires_grad_() for t in (w64, b64)] if affine else []
    y_ref = ref[0] + ref[1] * m
    h_ref = rms_norm(y_ref, EPS, *(ref[2:] if affine else (None, None)))
    want = torch.autograd.grad((y_ref, h_ref), ref, (g_y, g_h.to(res_dtype).double()))
    close(y, y_ref, 1e-6)
    close(h, h_ref, tol)
    for a, b in zip(got, want):
        close(a, b, tol)
    assert got[1].dtype == res_dtype


def test_the_draws():
    """Dropped at rate p (0.3: within 4 sigma over 40k elements), every kept element scaled 1/(1-p); LayerDrop zeros
    whole batch entries; the same seed the same draws, another seed others."""
    m = multipliers((4, 100, 100), 0.3, 0.0, 5)
    rate = (m == 0).double().mean().item()
    assert abs(rate - 0.3) < 4 * (0.3 * 0.7 / m.numel()) ** 0.5
    assert torch.allclose(m[m != 0], torch.full_like(m[m != 0], 1 / 0.7))
    rows = multipliers((16, 3, 8), 0.0, 0.5, 6)
    per_entry = rows.flatten(1)
    assert all(len(set(r.tolist())) == 1 for r in per_entry)  # one factor per batch entry
    assert 0 < (per_entry[:, 0] == 0).sum() < 16
    assert torch.equal(multipliers((2, 5, 12), 0.4, 0.3, 7), multipliers((2, 5, 12), 0.4, 0.3, 7))
    assert not torch.equal(multipliers((2, 5, 12), 0.4, 0.3, 7), multipliers((2, 5, 12), 0.4, 0.3, 8))


@pytest.mark.parametrize("used", ["y", "h"])
def test_one_output_unused(used):
    """Only y or only h reaches the loss: the gradients of the reference with the other's left out (the norm's
    parameters get zeros from y alone)."""
    gen = torch.Generator().manual_seed(3)
    shape = (2, 4, 12)
    x, res = torch.randn(shape, generator=gen).requires_grad_(), torch.randn(shape, generator=gen).requires_grad_()
    w, b = (1 + torch.randn(12, generator=gen)).requires_grad_(), torch.randn(12, generator=gen).requires_grad_()
    m = multipliers(shape, 0.2, 0.0, 4).float()
    y, h = krn.residual_norm_kernel(x, res, w, b, EPS, 0.2, 0.0, 4)
    g = torch.randn(shape, generator=gen)
    got = torch.autograd.grad(y if used == "y" else h, (x, res, w, b), g)
    leaves = [t.detach().clone().requires_grad_() for t in (x, res, w, b)]
    y_ref = leaves[0] + leaves[1] * m
    out = y_ref if used == "y" else rms_norm(y_ref, EPS, leaves[2], leaves[3])
    want = torch.autograd.grad(out, leaves, g, allow_unused=True)
    for a, w_ in zip(got, want):
        close(a, torch.zeros_like(a) if w_ is None else w_, 1e-5)


def test_registrations_and_refusals():
    x, res, w = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(8)
    torch.library.opcheck(krn.residual_norm.op, (x, res, w, w, EPS, 0.3, 0.2, 9, torch.float32))
    torch.library.opcheck(krn.residual_norm_backward.op,
                          (x, w, torch.randn_like(x), torch.randn_like(x), EPS, 0.3, 0.2, 9, torch.float32,
                           torch.float32, True, True, True))
    launches = KERNEL_LAUNCHES["tvq_kernels::residual_norm_backward"]
    args = (x, w, x, x, EPS, 0.3, 0.2, 9, torch.float32, torch.float32, True, True)
    assert launches(*args, True)[0] == 1 and launches(*args, True)[1] > 0 and launches(*args, False) == (1, 0)
    with pytest.raises(ValueError, match="one shape"):
        krn.residual_norm_kernel(x, res[:, :2], w, w, EPS)
    with pytest.raises(ValueError, match="both or neither"):
        krn.residual_norm_kernel(x, res, w, None, EPS)
    with pytest.raises(ValueError, match="p must be"):
        krn.residual_norm_kernel(x, res, w, w, EPS, p=1.5)
