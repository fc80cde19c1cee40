"""The GAU's activation and gate kernels (tvq.ops.kernels.gate) against PyTorch: outputs and gradients against a
float64 reference (split, SiLU, product) in float32 and float16 (and bfloat16 in the chain: the interpreter runs
these elementwise kernels in it), k and g_pre views of z, gradients that autograd leaves None, the chained use
(activation -> attention stand-in -> gate) giving z's reference gradient, strided and non-contiguous inputs, widths
not powers of two, several leading shapes, the custom ops' registrations and fake tensors. On a CPU through Triton's
interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import close_to_reference as close

pytest.importorskip("triton")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from tvq.ops.kernels import gate as kg  # noqa: E402

F64 = torch.float64
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
LEAD = [(5,), (2, 3), (2, 1, 3), (1, 1)]  # rows 5, 6 (in two dims), 6 (in three), 1 (a decode step)
SMALL_TILES = {"cols": 16, "elements": 32}  # several row and column tiles, edge tiles across the k/v/g borders


def small_tiles(monkeypatch):
    monkeypatch.setattr(kg, "TILES", SMALL_TILES)


def randn(*shape, seed, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def reference_activation(z, n_k, n_v):
    """k, SiLU(z_v), g_pre of the PyTorch path (split, SiLU of the v part, split)."""
    k, v, g_pre = z.split([n_k, n_v, z.shape[-1] - n_k - n_v], -1)
    return k, F.silu(v), g_pre


def ref_grads(fn, inputs, grads):
    """The float64 reference's outputs and input gradients."""
    leaves = [x.detach().to(F64).requires_grad_() for x in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    used = [(o, g) for o, g in zip(outs, grads) if g is not None]
    got = torch.autograd.grad([o for o, _ in used], leaves, [g for _, g in used], allow_unused=True)
    return outs, got


# ---- gau_activation ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lead", LEAD)
@pytest.mark.parametrize("n_k, n_v, n_g", [(4, 24, 24), (16, 20, 40), (3, 5, 0)])  # gated, GQA-like, no gate
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_activation_matches_the_reference(monkeypatch, lead, n_k, n_v, n_g, dtype):
    small_tiles(monkeypatch)
    seed = n_k + n_v + len(lead)
    z64 = randn(*lead, n_k + n_v + n_g, seed=seed) * 3
    grads = [randn(*lead, n, seed=seed + i + 1) for i, n in enumerate((n_k, n_v, n_g))]
    want, (want_dz,) = ref_grads(lambda z: reference_activation(z, n_k, n_v), [z64], grads)
    z = z64.to(dtype).requires_grad_()
    k, v, g_pre = kg.gau_activation(z, n_k, n_v)
    # k and g_pre are views of z (its storage, no copy); v a new contiguous tensor in z's dtype
    for view, start in ((k, 0), (g_pre, n_k + n_v)):
        assert view._base is z and view.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()
        assert view.storage_offset() == z.storage_offset() + start and view.stride() == z.stride()
    assert v.is_contiguous() and v.dtype == dtype and v.shape == (*lead, n_v)
    for got, w in zip((k, v, g_pre), want):
        assert got.shape == w.shape
        close(got, w, TOL[dtype])
    (dz,) = torch.autograd.grad((k, v, g_pre), z, [g.to(dtype) for g in grads])
    assert dz.dtype == dtype and dz.shape == z.shape
    close(dz, want_dz, TOL[dtype])


@pytest.mark.parametrize("unused", ["k", "v", "g", "kg"])
def test_activation_with_unused_outputs(monkeypatch, unused):
    """Autograd gives None for an unused output: the backward kernel reads nothing for it and writes zeros."""
    small_tiles(monkeypatch)
    calls, real = [], kg.gau_activation_backward
    monkeypatch.setattr(kg, "gau_activation_backward",
                        lambda z, *d: calls.append([x is None for x in d[:3]]) or real(z, *d))
    n_k, n_v, n_g = 4, 24, 24
    z64 = randn(2, 5, n_k + n_v + n_g, seed=1)
    grads = [None if name in unused else randn(2, 5, n, seed=i + 2)
             for i, (name, n) in enumerate(zip("kvg", (n_k, n_v, n_g)))]
    _, (want_dz,) = ref_grads(lambda z: reference_activation(z, n_k, n_v), [z64], grads)
    z = z64.float().requires_grad_()
    outs = kg.gau_activation(z, n_k, n_v)
    used = [(o, g.float()) for o, g in zip(outs, grads) if g is not None]
    (dz,) = torch.autograd.grad([o for o, _ in used], z, [g for _, g in used])
    assert calls == [[name in unused for name in "kvg"]]
    close(dz, want_dz, 1e-5)
    for name, part in zip("kvg", dz.split([n_k, n_v, n_g], -1)):
        if name in unused:
            assert not part.any()


def test_activation_of_a_strided_z(monkeypatch):
    """z non-contiguous in its leading dims (a transposed view): the views are of z itself, dz has z's shape."""
    small_tiles(monkeypatch)
    n_k, n_v, n_g = 4, 12, 12
    z64 = randn(3, 2, n_k + n_v + n_g, seed=7).transpose(0, 1)  # (2, 3, n)
    grads = [randn(2, 3, n, seed=8 + i) for i, n in enumerate((n_k, n_v, n_g))]
    want, (want_dz,) = ref_grads(lambda z: reference_activation(z, n_k, n_v), [z64], grads)
    z = z64.float().requires_grad_()
    assert not z.is_contiguous()
    k, v, g_pre = kg.gau_activation(z, n_k, n_v)
    assert k._base is z and g_pre._base is z
    for got, w in zip((k, v, g_pre), want):
        close(got, w, 1e-5)
    (dz,) = torch.autograd.grad((k, v, g_pre), z, [g.float() for g in grads])
    close(dz, want_dz, 1e-5)


def test_activation_rejects_bad_widths():
    with pytest.raises(ValueError, match="n_k"):
        kg.gau_activation(torch.zeros(2, 10), 6, 5)


# ---- gau_activation with the query/key norms -----------------------------------------------------------------------

def reference_normed(z, n_k, n_v, head_dim, eps, scale, split):
    """The PyTorch path: split, the RMS norm of each head (tvq.layers.norm.rms_norm) times scale, SiLU of v."""
    from tvq.layers.norm import rms_norm

    qk, v, g_pre = z.split([n_k, n_v, z.shape[-1] - n_k - n_v], -1)
    heads = rms_norm(qk.reshape(*z.shape[:-1], n_k // head_dim, head_dim), eps, scale=scale)
    parts = heads.split([split, n_k // head_dim - split], -2) if split else (heads,)
    return (*parts, F.silu(v), g_pre)


@pytest.mark.parametrize("lead", LEAD)
@pytest.mark.parametrize("H1, H2, D, n_v, n_g", [(1, 1, 8, 24, 24), (2, 1, 6, 5, 0), (3, 0, 4, 12, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_normed_heads_match_the_reference(monkeypatch, lead, H1, H2, D, n_v, n_g, dtype):
    """One launch writes v and the normalized query/key heads (split in two parts or one), one writes dz: outputs and
    z's gradient against the float64 PyTorch path; head rows not a power of two, several head-row tiles."""
    small_tiles(monkeypatch)
    split, n_k, seed = H1 if H2 else None, (H1 + H2) * D, H1 + D + n_v + len(lead)
    z64 = randn(*lead, n_k + n_v + n_g, seed=seed) * 3
    args = (n_k, n_v, D, 1e-6, 0.7, split)
    outs64 = reference_normed(z64, *args)
    grads = [randn(*o.shape, seed=seed + i + 1) for i, o in enumerate(outs64)]
    want, (want_dz,) = ref_grads(lambda z: reference_normed(z, *args), [z64], grads)
    z = z64.to(dtype).requires_grad_()
    got = kg.gau_activation(z, n_k, n_v, head_dim=D, eps=1e-6, scale=0.7, split=split)
    assert len(got) == len(want)
    assert got[-1]._base is z and got[-2].is_contiguous()  # g_pre a view of z, v written
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == dtype
        close(g, w, TOL[dtype])
    (dz,) = torch.autograd.grad(got, z, [g.to(dtype) for g in grads])
    assert dz.dtype == dtype and dz.shape == z.shape
    close(dz, want_dz, TOL[dtype])


@pytest.mark.parametrize("unused", ["q", "k", "qk", "v", "g"])
def test_normed_heads_with_unused_outputs(monkeypatch, unused):
    """An unused part's gradient is None: the kernel reads nothing for it, and that part of dz is zero."""
    small_tiles(monkeypatch)
    n_k, n_v, n_g, D = 12, 8, 8, 4  # heads: 2 queries, 1 key
    args = (n_k, n_v, D, 1e-6, 1.0, 2)
    z64 = randn(3, n_k + n_v + n_g, seed=4)
    names = "qkvg"
    grads = [None if name in unused else randn(*o.shape, seed=i + 5)
             for i, (name, o) in enumerate(zip(names, reference_normed(z64, *args)))]
    _, (want_dz,) = ref_grads(lambda z: reference_normed(z, *args), [z64], grads)
    z = z64.float().requires_grad_()
    outs = kg.gau_activation(z, n_k, n_v, head_dim=D, split=2)
    used = [(o, g.float()) for o, g in zip(outs, grads) if g is not None]
    (dz,) = torch.autograd.grad([o for o, _ in used], z, [g for _, g in used])
    close(dz, want_dz, 1e-5)
    for name, part in zip(names, dz.split([2 * D, D, n_v, n_g], -1)):
        assert (not part.any()) == (name in unused)


def test_normed_heads_of_a_strided_z(monkeypatch):
    """z non-contiguous in its leading dims, gradients arriving transposed (as attention's (B, H, T, D_k) views)."""
    small_tiles(monkeypatch)
    n_k, n_v, n_g, D = 8, 12, 12, 4
    z64 = randn(3, 2, n_k + n_v + n_g, seed=9).transpose(0, 1)  # (2, 3, n)
    args = (n_k, n_v, D, 1e-5, 0.5, None)
    grads = [randn(*o.transpose(1, 2).shape, seed=10 + i).transpose(1, 2) if o.dim() == 4
             else randn(*o.shape, seed=10 + i) for i, o in enumerate(reference_normed(z64, *args))]
    want, (want_dz,) = ref_grads(lambda z: reference_normed(z, *args), [z64], grads)
    z = z64.float().requires_grad_()
    got = kg.gau_activation(z, n_k, n_v, head_dim=D, eps=1e-5, scale=0.5)
    for g, w in zip(got, want):
        close(g, w, 1e-5)
    assert not grads[0].is_contiguous()
    (dz,) = torch.autograd.grad(got, z, [g.float() for g in grads])
    close(dz, want_dz, 1e-5)


@pytest.mark.parametrize("kwargs, match", [(dict(head_dim=5), "multiple of head_dim"),
                                           (dict(head_dim=0), "multiple of head_dim"),
                                           (dict(head_dim=4, split=2), "split must be in"),
                                           (dict(split=1), "split needs head_dim")])
def test_normed_heads_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kg.gau_activation(torch.zeros(2, 8 + 6 + 6), 8, 6, **kwargs)


# ---- silu_gate -----------------------------------------------------------------------------------------------------

def reference_gate(a, g_pre):
    return a * F.silu(g_pre)


@pytest.mark.parametrize("lead", LEAD)
@pytest.mark.parametrize("n", [24, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gate_matches_the_reference(monkeypatch, lead, n, dtype):
    """g_pre a strided view (a slice of a wider tensor, as gau_activation's), a contiguous."""
    small_tiles(monkeypatch)
    seed = n + len(lead)
    a64 = randn(*lead, n, seed=seed)
    wide = randn(*lead, n + 9, seed=seed + 1) * 3
    grad = randn(*lead, n, seed=seed + 2)
    (want,), (want_da, want_dg) = ref_grads(reference_gate, [a64, wide[..., 5:5 + n]], [grad])
    a = a64.to(dtype).requires_grad_()
    wide_k = wide.to(dtype).requires_grad_()
    g_pre = wide_k[..., 5:5 + n]
    assert g_pre.stride(-2) == n + 9  # read in place, rows n + 9 apart
    out = kg.silu_gate(a, g_pre)
    assert out.dtype == dtype and out.shape == a.shape and out.is_contiguous()
    close(out, want, TOL[dtype])
    da, dwide = torch.autograd.grad(out, (a, wide_k), grad.to(dtype))
    assert da.dtype == dtype and dwide.dtype == dtype
    close(da, want_da, TOL[dtype])
    close(dwide[..., 5:5 + n], want_dg, TOL[dtype])
    assert not dwide[..., :5].any() and not dwide[..., 5 + n:].any()


def test_gate_dtypes_and_one_sided_gradients(monkeypatch):
    """The output in the promoted dtype (as a * F.silu(g_pre)), each gradient in its input's dtype; a gradient for
    one input only; a strided incoming gradient."""
    small_tiles(monkeypatch)
    a64, g64 = randn(3, 10, seed=1), randn(3, 10, seed=2)
    grad = randn(10, 3, seed=3).t()  # (3, 10), non-contiguous
    (want,), (want_da, want_dg) = ref_grads(reference_gate, [a64, g64], [grad])
    a, g_pre = a64.half().requires_grad_(), g64.float().requires_grad_()
    out = kg.silu_gate(a, g_pre)
    assert out.dtype == (a.detach() * F.silu(g_pre.detach())).dtype == torch.float32
    close(out, want, 1e-2)
    da, dg = torch.autograd.grad(out, (a, g_pre), grad.float())
    assert da.dtype == torch.float16 and dg.dtype == torch.float32
    close(da, want_da, 1e-2)
    close(dg, want_dg, 1e-2)
    a, g_pre = a64.float(), g64.float().requires_grad_()  # a without a gradient
    (dg,) = torch.autograd.grad(kg.silu_gate(a, g_pre), g_pre, grad.float())
    close(dg, want_dg, 1e-5)
    with pytest.raises(ValueError, match="one shape"):
        kg.silu_gate(a, g_pre[:, :5])


# ---- the GAU's chain -----------------------------------------------------------------------------------------------

def attention_stand_in(k, v, n_g):
    """Something of k and v of the gate's width (n_g a multiple of n_v: query heads sharing a value head)."""
    mixed = v * torch.tanh(k).mean(-1, keepdim=True) + v * v
    return mixed.repeat_interleave(n_g // v.shape[-1], -1) if n_g != v.shape[-1] else mixed


def reference_chain(z, n_k, n_v):
    """The PyTorch GAU today: split, SiLU over (v, g) together, split, attention, out * g."""
    k, vg = z.split([n_k, z.shape[-1] - n_k], -1)
    v, g = F.silu(vg).split([n_v, vg.shape[-1] - n_v], -1)
    return attention_stand_in(k, v, g.shape[-1]) * g


def kernel_chain(z, n_k, n_v):
    k, v, g_pre = kg.gau_activation(z, n_k, n_v)
    return kg.silu_gate(attention_stand_in(k, v, g_pre.shape[-1]), g_pre)


@pytest.mark.parametrize("lead, n_k, n_v, n_g", [((2, 5), 4, 24, 24), ((7,), 6, 10, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # bfloat16: the GAU's autocast
def test_the_chain_gives_the_reference_gradient(monkeypatch, lead, n_k, n_v, n_g, dtype):
    small_tiles(monkeypatch)
    z64 = randn(*lead, n_k + n_v + n_g, seed=n_v) * 2
    grad = randn(*lead, n_g, seed=n_v + 1)
    (want,), (want_dz,) = ref_grads(lambda z: reference_chain(z, n_k, n_v), [z64], [grad])
    z = z64.to(dtype).requires_grad_()
    out = kernel_chain(z, n_k, n_v)
    assert out.dtype == dtype
    close(out, want, TOL[dtype])
    (dz,) = torch.autograd.grad(out, z, grad.to(dtype))
    assert dz.dtype == dtype
    close(dz, want_dz, TOL[dtype])


def test_the_chain_compiles_in_one_graph():
    """torch.compile traces the chain and its backward (the kernels through their fake registrations) whole."""
    n_k, n_v = 4, 8
    z = randn(2, 3, n_k + 2 * n_v, seed=3, dtype=torch.float32).requires_grad_()
    compiled = torch.compile(kernel_chain, backend="aot_eager", fullgraph=True)
    got = compiled(z, n_k, n_v)
    want = kernel_chain(z, n_k, n_v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), z)[0], torch.autograd.grad(want.sum(), z)[0],
                               rtol=0, atol=0)


def test_the_chain_on_fake_tensors():
    """Forward and backward without running (the cost model, torch.compile): shapes and dtypes in bfloat16."""
    with FakeTensorMode():
        z = torch.empty(2, 8, 4 + 24 + 24, dtype=torch.bfloat16, requires_grad=True)
        k, v, g_pre = kg.gau_activation(z, 4, 24)
        out = kg.silu_gate(v * k.sum(-1, keepdim=True), g_pre)
        (dz,) = torch.autograd.grad(out.float().sum(), z)
        assert (k.shape, v.shape, g_pre.shape) == ((2, 8, 4), (2, 8, 24), (2, 8, 24))
        assert out.dtype == v.dtype == dz.dtype == torch.bfloat16 and dz.shape == z.shape


def test_the_ops_trace():
    """Schema and fake (shape-only) registrations of the four launches, with strided inputs and None gradients."""
    utils = ("test_schema", "test_faketensor")
    n_k, n_v, n_g = 4, 12, 12
    z = randn(2, 3, n_k + n_v + n_g, seed=1, dtype=torch.float32)
    dk, dv, dg = (randn(2, 3, n, seed=i, dtype=torch.float32) for i, n in enumerate((n_k, n_v, n_g)))
    z_v = z[..., n_k:n_k + n_v]  # the ops take z's v part, a strided view
    torch.library.opcheck(kg.gau_activation_values.op, (z_v,), test_utils=utils)
    torch.library.opcheck(kg.gau_activation_values.op, (z_v.half(),), test_utils=utils)
    for grads in ((dk, dv, dg), (None, dv, dg), (dk, None, dg), (dk, dv, None), (None, None, None)):
        torch.library.opcheck(kg.gau_activation_backward.op, (z_v, *grads, n_k, n_g), test_utils=utils)
    torch.library.opcheck(kg.gau_activation_backward.op, (z_v, dk, dv, None, n_k, 0), test_utils=utils)  # no gate
    z_qk, D = z[..., :n_k], 2  # the normalized heads' ops: two heads of 2, split 1 + 1
    torch.library.opcheck(kg.gau_activation_norm.op, (z_qk, z_v, D, 1e-6, 0.5), test_utils=utils)
    d1, d2 = randn(2, 3, 1, D, seed=7, dtype=torch.float32), randn(2, 3, 1, D, seed=8, dtype=torch.float32)
    for parts in ((d1, d2), (d1, None), (None, d2), (None, None)):
        torch.library.opcheck(kg.gau_activation_backward.op, (z_v, None, dv, dg, n_k, n_g, z_qk, *parts, D, 1e-6, 0.5),
                              test_utils=utils)
    a, g_pre = randn(2, 3, n_g, seed=5, dtype=torch.float32), z[..., n_k + n_v:]
    for args in ((a, g_pre), (a.half(), g_pre), (a.half(), g_pre.half())):
        torch.library.opcheck(kg.silu_gate_forward.op, args, test_utils=utils)
        torch.library.opcheck(kg.silu_gate_backward.op, (torch.ones_like(kg.silu_gate_forward(*args)), *args),
                              test_utils=utils)
