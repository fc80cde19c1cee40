"""The query-bias kernel (tvq.ops.kernels.query_bias) against PyTorch: qu = q + s u and the positional scores
pos = (q + s v) @ rel^T, and the gradients of q (d_qu + d_pos @ rel), u and v (s times the sums over every row of
each head of d_qu and d_pos @ rel) and rel (d_pos^T @ qv over all rows), against a float64 reference in float32 and
float16, with non-contiguous q and gradients, an expanded (mqa) rel, rows and distances not a multiple of the tile,
several tiles and heads, one gradient missing; the custom ops' registrations; and blockwise_attention's use of it
(kernels on = PyTorch path). On a CPU through Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

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


def reference(q, u, v, rel, s):
    return q + s * u[:, None], (q + s * v[:, None]) @ rel.transpose(-1, -2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, R, transposed, shared", [((2, 3, 37, 16), 21, True, False),
                                                          ((1, 1, 130, 24), 40, False, False),
                                                          ((3, 2, 5, 8), 9, False, True),
                                                          ((3, 2, 100, 8), 13, True, False)])
def test_outputs_and_gradients_match_the_reference(monkeypatch, dtype, shape, R, transposed, shared):
    """Outputs and every gradient against float64; u's and v's are summed by the launch's last program (the last
    shape: 21 partial sums per head, added 8 at a time), which leaves the ticket counter at zero."""
    from tvq.ops.kernels.common import tickets

    monkeypatch.setattr(kqb, "ROWS", 16)  # several row tiles, a partial last one
    monkeypatch.setattr(kqb, "DISTANCES", 16)  # several tiles of distances, a partial last one
    monkeypatch.setattr(kqb, "PARTS", 8)
    B, H, T, D = shape
    s = D**-0.25
    q64 = randn(B, T, H, D, seed=0).transpose(1, 2) if transposed else randn(*shape, seed=0)  # (B, H, T, D)
    u64, v64 = randn(H, D, seed=1), randn(H, D, seed=2)
    rel64 = randn(1, R, D, seed=5) if shared else randn(H, R, D, seed=5)  # shared: one key/value head (mqa)
    g_qu, g_pos = randn(*shape, seed=3), randn(B, H, R, T, seed=4).transpose(-1, -2)  # the second non-contiguous
    leaves64 = [x.clone().requires_grad_() for x in (q64, u64, v64, rel64)]
    want = reference(*leaves64[:3], leaves64[3].expand(H, R, D), s)
    want_grads = torch.autograd.grad(want, leaves64, (g_qu, g_pos))

    q = q64.to(dtype).requires_grad_()  # non-contiguous when transposed
    u, v = u64.float().requires_grad_(), v64.float().requires_grad_()  # the parameters: float32
    rel = rel64.to(dtype).requires_grad_()
    got = query_biases_kernel(q, u, v, rel.expand(H, R, D), s)  # expanded: a stride-0 head axis, not copied
    assert all(t.dtype == dtype for t in got) and got[0].shape == shape and got[1].shape == (B, H, T, R)
    for g, w in zip(got, want):
        close(g, w, TOL[dtype])
    got_grads = torch.autograd.grad(got, (q, u, v, rel), (g_qu.to(dtype), g_pos.to(dtype)))
    assert got_grads[0].dtype == got_grads[3].dtype == dtype
    assert got_grads[1].dtype == got_grads[2].dtype == torch.float32
    assert got_grads[1].is_contiguous() and got_grads[2].is_contiguous()
    for g, w in zip(got_grads, want_grads):
        close(g, w, TOL[dtype])
    assert not tickets(q.device).any()


@pytest.mark.parametrize("used", ["qu", "pos"])
def test_one_output_unused(used):
    """Only one output reaches the loss: the other's parameters get zero gradients, the rest the reference's."""
    leaves64 = [randn(1, 2, 9, 8, seed=5), randn(2, 8, seed=6), randn(2, 8, seed=7), randn(2, 5, 8, seed=8)]
    leaves64 = [x.requires_grad_() for x in leaves64]
    leaves = [x.detach().float().requires_grad_() for x in leaves64]
    k = 0 if used == "qu" else 1
    want = reference(*leaves64, 0.5)[k]
    got = query_biases_kernel(*leaves, 0.5)[k]
    g = randn(*want.shape, seed=9)
    want_grads = torch.autograd.grad(want, leaves64, g, allow_unused=True)  # None: u (pos) or v and rel (qu)
    got_grads = torch.autograd.grad(got, leaves, g.float())
    assert sum(w is None for w in want_grads) == (2 if used == "qu" else 1)
    for got_g, want_g in zip(got_grads, want_grads):
        if want_g is None:
            assert torch.equal(got_g, torch.zeros_like(got_g))
        else:
            close(got_g, want_g, 1e-5)


def test_the_ops_register_and_bad_shapes():
    q, u = randn(2, 2, 7, 8, seed=9).float(), randn(2, 8, seed=10).float()
    rel = randn(2, 5, 8, seed=11).float()
    torch.library.opcheck(kqb.query_biases.op, (q, u, u, rel, 0.3))
    torch.library.opcheck(kqb.query_biases_backward.op, (q, randn(2, 2, 7, 5, seed=12).float(), rel, 0.3))
    with pytest.raises(ValueError, match="u, v"):
        query_biases_kernel(q, u[:1], u, rel)
    with pytest.raises(ValueError, match="rel"):
        query_biases_kernel(q, u, u, rel[..., :4])


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
