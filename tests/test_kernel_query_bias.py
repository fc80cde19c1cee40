"""The query-bias kernel (tvq.ops.kernels.query_bias) against PyTorch: q + s u and q + s v, and the gradients of
q (d_qu + d_qv), u and v (s times the sums over every row of each head), against a float64 reference in float32
and float16, with non-contiguous q and gradients, rows not a multiple of the tile, several tiles and heads, one
gradient missing; the custom ops' registrations; and blockwise_attention's use of it (kernels on = PyTorch path).
On a CPU through Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch
from conftest import close_to_reference as close

pytest.importorskip("triton")

from tvq.ops.kernels import query_bias as kqb  # noqa: E402
from tvq.ops.kernels.query_bias import query_biases_kernel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def reference(q, u, v, s):
    return q + s * u[:, None], q + s * v[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, transposed", [((2, 3, 37, 16), True), ((1, 1, 130, 24), False),
                                               ((3, 2, 5, 8), False)])
def test_outputs_and_gradients_match_the_reference(monkeypatch, dtype, shape, transposed):
    monkeypatch.setattr(kqb, "ROWS", 16)  # several row tiles, a partial last one
    B, H, T, D = shape
    s = D**-0.25
    q64 = randn(B, T, H, D, seed=0).transpose(1, 2) if transposed else randn(*shape, seed=0)  # (B, H, T, D)
    u64, v64 = randn(H, D, seed=1), randn(H, D, seed=2)
    g_qu, g_qv = randn(*shape, seed=3), randn(B, H, D, T, seed=4).transpose(-1, -2)  # the second non-contiguous
    leaves64 = [x.clone().requires_grad_() for x in (q64, u64, v64)]
    want = reference(*leaves64, s)
    want_grads = torch.autograd.grad(want, leaves64, (g_qu, g_qv))

    q = q64.to(dtype).requires_grad_()  # non-contiguous when transposed
    u, v = u64.float().requires_grad_(), v64.float().requires_grad_()  # the parameters: float32
    got = query_biases_kernel(q, u, v, s)
    assert all(t.dtype == dtype and t.shape == shape for t in got)
    for g, w in zip(got, want):
        close(g, w, TOL[dtype])
    got_grads = torch.autograd.grad(got, (q, u, v), (g_qu.to(dtype), g_qv.to(dtype)))
    assert got_grads[0].dtype == dtype and got_grads[1].dtype == got_grads[2].dtype == torch.float32
    assert got_grads[1].is_contiguous() and got_grads[2].is_contiguous()
    for g, w in zip(got_grads, want_grads):
        close(g, w, TOL[dtype])


def test_one_output_unused():
    """Only qu reaches the loss: v gets a zero gradient, q and u the reference's."""
    q, u, v = (x.float().requires_grad_() for x in (randn(1, 2, 9, 8, seed=5), randn(2, 8, seed=6),
                                                   randn(2, 8, seed=7)))
    qu, _ = query_biases_kernel(q, u, v, 0.5)
    g = randn(1, 2, 9, 8, seed=8).float()
    d_q, d_u, d_v = torch.autograd.grad(qu, (q, u, v), g)
    close(d_q, g, 1e-6)
    close(d_u, 0.5 * g.sum((0, 2)), 1e-5)
    assert torch.equal(d_v, torch.zeros_like(v))


def test_the_ops_register_and_bad_shapes():
    q, u = randn(2, 2, 7, 8, seed=9).float(), randn(2, 8, seed=10).float()
    torch.library.opcheck(kqb.query_biases, (q, u, u, 0.3))
    torch.library.opcheck(kqb.query_biases_backward, (q, q, 0.3))
    with pytest.raises(ValueError, match="u, v"):
        query_biases_kernel(q, u[:1], u)


@pytest.mark.parametrize("uv_scale", [1.0, 0.7])
def test_blockwise_attention_kernels_equal_the_pytorch_path(uv_scale):
    """blockwise_attention adds (u * uv_scale) to q on both paths: the same output and gradients of u and v."""
    from tvq.ops import blockwise_attention
    from tvq.ops.kernels import use_kernels

    B, H, T, M, L, S, DK, DV = 1, 2, 24, 8, 8, 8, 8, 12
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, keys, values = r(B, H, T, DK), r(B, H, M + T, DK), r(B, H, M + T, DV)
    codes = torch.randint(0, S, (B, H, M + T), generator=gen)
    cache = (r(H, S, DK), torch.zeros(B, H, S), torch.zeros(B, H, S, DV))
    rel, u0, v0 = r(H, M + 1, DK), r(H, DK), r(H, DK)
    results = []
    for on in (False, True):
        u, v = u0.clone().requires_grad_(), v0.clone().requires_grad_()
        with use_kernels(on):
            out = blockwise_attention(q, keys, values, codes, n_invalid=M, rel=rel, u=u, v=v, mem_len=M, block_len=L,
                                      agg_cache=True, grad_thru_cache=True, cache=cache, uv_scale=uv_scale)
        results.append((out, *torch.autograd.grad(out.square().sum(), (u, v))))
    for got, want in zip(results[1], results[0]):
        close(got, want, 1e-5)
