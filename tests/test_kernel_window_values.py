"""The window value kernels (tvq.ops.kernels.window_values) against PyTorch: the op's output and gradients against a
float64 reference over copied windows, every straight-through rule, with and without the cache's output to add;
blockwise_attention with the kernels on (float32, float16) against the PyTorch path in float64; the custom ops'
registrations. On a CPU through Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch
from conftest import close_to_reference as close, grads_close

pytest.importorskip("triton")

from tvq.ops import blockwise_attention  # noqa: E402
from tvq.ops.kernels import KERNEL_FLOPS, use_kernels  # noqa: E402
from tvq.ops.kernels import window_values as kwv  # noqa: E402

F64 = torch.float64
P, NB, L = 3, 3, 8


def reference(p_win, values, acc, keep):
    """acc + p_win @ windows, the windows copied (unfold); the values' gradient only through the kept products."""
    _, _, Lq, W = p_win.shape
    M = W - Lq
    v_win = values.unfold(1, W, Lq).transpose(-1, -2)  # (P, nb, W, D_v)
    a, w = torch.arange(Lq)[:, None], torch.arange(W)[None, :]
    kept = {None: torch.ones(Lq, W, dtype=torch.bool), "own": (w >= M).expand(Lq, W), "near": w >= a}[keep]
    p_kept = torch.where(kept, p_win.detach(), 0.0)  # (P, nb, L, W)
    out = p_win @ v_win.detach() + p_kept @ v_win - p_kept @ v_win.detach()  # values: only the kept products
    return out if acc is None else out + acc


# M, L, D_v (not tile multiples), tiles: several window and D_v tiles, value-row tiles spanning two blocks, and
# L 20 (not a power of two: row tiles not aligned with the blocks)
@pytest.mark.parametrize("M, L, Dv, tiles", [(8, 8, 24, None), (16, 8, 72, None), (16, 8, 72, (16, 16, 16)),
                                             (12, 20, 24, (16, 16, 16))])
@pytest.mark.parametrize("keep", [None, "own", "near"])
@pytest.mark.parametrize("with_acc", [False, True])
def test_op_matches_the_reference(monkeypatch, M, L, Dv, tiles, keep, with_acc):
    if tiles:
        monkeypatch.setattr(kwv, "TILES", dict(zip(("rows", "window", "dv"), tiles)))
    gen = torch.Generator().manual_seed(M + Dv)
    W = M + L
    p_win = torch.rand(P, NB, L, W, generator=gen, dtype=F64)
    values = torch.randn(P, M + NB * L, Dv, generator=gen, dtype=F64)
    acc = torch.randn(P, NB, L, Dv, generator=gen, dtype=F64) if with_acc else None
    grad = torch.randn(P, NB, L, Dv, generator=gen, dtype=F64)
    leaves = [p_win, values] + ([acc] if with_acc else [])
    ref = [x.clone().requires_grad_() for x in leaves]
    want = reference(ref[0], ref[1], ref[2] if with_acc else None, keep)
    want_grads = torch.autograd.grad(want, ref, grad)
    f32 = [x.float().requires_grad_() for x in leaves]
    got = kwv.window_values_kernel(f32[0], f32[1], f32[2] if with_acc else None, keep=keep)
    got_grads = torch.autograd.grad(got, f32, grad.float())
    assert got.shape == want.shape and got.dtype == torch.float32
    close(got, want, 1e-5)
    for g, w in zip(got_grads, want_grads):  # p_win, values[, acc]
        assert g.dtype == torch.float32
        close(g, w, 1e-5)


@pytest.mark.parametrize("T, need_p, tiles", [(24, True, None), (21, True, (16, 16, 16)), (21, False, None)],
                         ids=["whole", "padded-tiled", "no-weights-grad"])
def test_gate_in_the_forward_and_weights_launches(monkeypatch, T, need_p, tiles):
    """With ``gate`` the result is out SiLU(gate) (the last block's rows past T zero), every gradient equal to the
    reference's, the gate's written by the weights' backward launch (or the gate's own kernel when p_win needs
    none); the gate a strided view, as the GAU's is (a slice of its projection)."""
    if tiles:
        monkeypatch.setattr(kwv, "TILES", dict(zip(("rows", "window", "dv"), tiles)))
    M, Dv = 8, 40
    gen = torch.Generator().manual_seed(T)
    W = M + L
    p_win = torch.rand(P, NB, L, W, generator=gen, dtype=F64)
    values = torch.randn(P, M + NB * L, Dv, generator=gen, dtype=F64)
    acc = torch.randn(P, NB, L, Dv, generator=gen, dtype=F64)
    z = torch.randn(P, T, 2 * Dv + 5, generator=gen, dtype=F64)
    grad = torch.randn(P, NB, L, Dv, generator=gen, dtype=F64)
    grad[:, :, :].flatten(1, 2)[:, T:] = 0.0  # rows past T reach nothing
    ref = [p_win.clone().requires_grad_(need_p), values.clone().requires_grad_(), acc.clone().requires_grad_(),
           z.clone().requires_grad_()]
    out = reference(ref[0], ref[1], ref[2], "near")
    want = torch.nn.functional.pad(out.flatten(1, 2)[:, :T] * torch.nn.functional.silu(ref[3][..., Dv + 3:2 * Dv + 3]),
                                   (0, 0, 0, NB * L - T)).view(out.shape)
    leaves = [r for r in ref if r.requires_grad]
    want_grads = torch.autograd.grad(want, leaves, grad)
    kin = [r.detach().float().requires_grad_(r.requires_grad) for r in ref]
    gate = kin[3][..., Dv + 3:2 * Dv + 3]  # (P, T, D_v), rows strided
    got = kwv.window_values_kernel(kin[0], kin[1], kin[2], keep="near", gate=gate)
    got_grads = torch.autograd.grad(got, [k for k in kin if k.requires_grad], grad.float())
    close(got, want, 1e-5)
    for g, w in zip(got_grads, want_grads):
        close(g, w, 1e-5)
    with pytest.raises(ValueError, match="gate"):
        kwv.window_values_kernel(kin[0], kin[1], gate=gate[:, :, :-1])


@pytest.mark.parametrize("H, expanded", [(1, False), (3, False), (3, True)], ids=["one-head", "per-head", "mqa"])
def test_cache_product_with_per_block_or_shared_means(H, expanded):
    """The op's cache product: per-block means (P, nb, S, D) or one (H, S, D) for every block, row p reading head
    p % H (the queries' gradient through the codebook; an mqa codebook expanded over heads read once), equal to the
    product done apart."""
    gen = torch.Generator().manual_seed(H)
    M, S, Dv, B = 8, 12, 24, 2
    Pr, W = B * H, M + L
    p_win = torch.rand(Pr, NB, L, W, generator=gen, dtype=F64)
    values = torch.randn(Pr, M + NB * L, Dv, generator=gen, dtype=F64)
    cache_w = torch.randn(Pr, NB, L, S, generator=gen, dtype=F64)
    shared = torch.randn(1 if expanded else H, S, Dv, generator=gen, dtype=F64).expand(H, S, Dv)
    per_block = torch.randn(Pr, NB, S, Dv, generator=gen, dtype=F64)
    base = reference(p_win, values, None, None)  # (P, nb, L, D)
    per_row = shared.repeat(B, 1, 1)[:, None]  # (P, 1, S, D): row p = (b, h) reads head h
    for means, m_rows in ((shared, per_row), (per_block, per_block)):
        got = kwv.window_values(p_win.float(), values.float(), None, torch.float32, cache_w.float(), means.float())
        close(got, base + cache_w @ m_rows, 1e-5)


def test_strided_values_and_half_precision():
    """values a non-contiguous view (read by its strides); float16 and bfloat16 products (bfloat16 upcast in the
    interpreter), float32 sums, results in the inputs' dtype."""
    M, Dv = 8, 24
    gen = torch.Generator().manual_seed(5)
    p_win = torch.rand(P, NB, L, M + L, generator=gen, dtype=F64)
    values = torch.randn(M + NB * L, P, Dv, generator=gen, dtype=F64).transpose(0, 1)  # (P, M + nb L, D_v)
    acc = torch.randn(P, NB, L, Dv, generator=gen, dtype=F64)
    grad = torch.randn(P, NB, L, Dv, generator=gen, dtype=F64)
    ref = [x.clone().requires_grad_() for x in (p_win, values, acc)]
    want = reference(*ref, "near")
    want_grads = torch.autograd.grad(want, ref, grad)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 2e-2)):
        kin = [x.to(dtype).requires_grad_() for x in (p_win, values, acc)]
        assert not kin[1].is_contiguous()
        got = kwv.window_values_kernel(*kin, keep="near")
        got_grads = torch.autograd.grad(got, kin, grad.to(dtype))
        assert got.dtype == dtype
        close(got, want, tol)
        for g, w in zip(got_grads, want_grads):
            assert g.dtype == dtype
            close(g, w, tol)


def test_the_ops_trace_and_count_their_flops():
    """Schema and fake (shape-only) registrations of the three launches; their GEMM FLOPs for the cost model."""
    M, Dv, W = 8, 24, 16
    gen = torch.Generator().manual_seed(3)
    p_win = torch.rand(P, NB, L, W, generator=gen)
    values = torch.randn(P, M + NB * L, Dv, generator=gen)
    acc = torch.randn(P, NB, L, Dv, generator=gen)
    grad = torch.randn(P, NB, L, Dv, generator=gen)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(kwv.window_values.op, (p_win, values, acc, torch.float32), test_utils=utils)
    torch.library.opcheck(kwv.window_values.op, (p_win, values, None, torch.float32), test_utils=utils)
    torch.library.opcheck(kwv.window_values_grad_weights.op, (grad, values, W, torch.float32), test_utils=utils)
    means = torch.randn(P, NB, 12, Dv, generator=gen)
    torch.library.opcheck(kwv.window_values_grad_weights.op, (grad, values, W, torch.float32, means), test_utils=utils)
    g_p, g_w = kwv.window_values_grad_weights(grad, values, W, torch.float32, means)
    torch.testing.assert_close(g_p, kwv.window_values_grad_weights(grad, values, W, torch.float32)[0])
    torch.testing.assert_close(g_w, grad @ means.transpose(-1, -2))  # the cache's columns: grad @ means^T
    for keep in (0, 1, 2):
        torch.library.opcheck(kwv.window_values_grad_values.op, (p_win, grad, keep, torch.float32), test_utils=utils)
    add = torch.randn(P, M + NB * L, Dv, generator=gen)  # the cache read's gradient of the values, added in the kernel
    torch.library.opcheck(kwv.window_values_grad_values.op, (p_win, grad, 2, torch.float32, add), test_utils=utils)
    torch.testing.assert_close(kwv.window_values_grad_values(p_win, grad, 2, torch.float32, add),
                               kwv.window_values_grad_values(p_win, grad, 2, torch.float32) + add)
    gate = torch.randn(P, NB * L - 2, Dv + 3, generator=gen)[..., 1:Dv + 1]  # (P, T, D_v), rows strided
    torch.library.opcheck(kwv.window_values_gated.op, (p_win, values, acc, torch.float32, None, None, gate),
                          test_utils=utils)
    out = kwv.window_values(p_win, values, acc, torch.float32)
    torch.library.opcheck(kwv.window_values_grad_weights_gated.op, (grad, values, W, torch.float32, means, out, gate),
                          test_utils=utils)
    flops = 2 * P * NB * L * W * Dv
    assert KERNEL_FLOPS["tvq_kernels::window_values_gated"](p_win, values, acc, torch.float32, None, None, gate) == (
        "float32", flops)
    assert KERNEL_FLOPS["tvq_kernels::window_values"](p_win, values, acc, torch.bfloat16) == ("bfloat16", flops)
    assert KERNEL_FLOPS["tvq_kernels::window_values_grad_weights"](grad, values, W, torch.float32) == ("float32", flops)
    assert KERNEL_FLOPS["tvq_kernels::window_values_grad_weights"](grad, values, W, torch.float32, means) == (
        "float32", flops * (W + 12) // W)
    assert KERNEL_FLOPS["tvq_kernels::window_values_grad_values"](p_win, grad, 1, torch.float32) == ("float32", flops)


def test_compiles_in_one_graph():
    """torch.compile traces the product and its backward (the kernels through their fake registrations) whole."""
    M, Dv = 8, 24
    gen = torch.Generator().manual_seed(4)
    kin = [torch.rand(P, NB, L, M + L, generator=gen).requires_grad_(),
           torch.randn(P, M + NB * L, Dv, generator=gen).requires_grad_(),
           torch.randn(P, NB, L, Dv, generator=gen).requires_grad_()]
    compiled = torch.compile(kwv.window_values_kernel, backend="aot_eager", fullgraph=True)
    got = compiled(*kin, keep="own")
    want = kwv.window_values_kernel(*kin, keep="own")
    for a, b in zip((got, *torch.autograd.grad(got.sum(), kin)), (want, *torch.autograd.grad(want.sum(), kin))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# blockwise_attention end to end: kernels on against off (float64)

B, H, S, DK, DV = 2, 2, 16, 16, 24


def attention_inputs(M, T, per_row, gen, S=S):
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=F64)  # noqa: E731
    inputs = dict(q=r(B, H, T, DK), keys=r(B, H, M + T, DK), values=r(B, H, M + T, DV), rel=r(H, M + 1, DK) / 4,
                  u=r(H, DK) / 4, v=r(H, DK) / 4, codebook=r(H, S, DK), mean=r(B, H, S, DV))
    codes = torch.randint(0, S, (B, H, M + T), generator=gen)
    count = torch.randint(0, 3, (B, H, S), generator=gen).double()
    return inputs, codes, count, torch.tensor([M + 3, 0]) if per_row else None


def run_attention(inputs, codes, count, n_invalid, dtype, M, kernels, **switches):
    leaves = {k: x.detach().to(dtype).requires_grad_() for k, x in inputs.items()}
    cache = (leaves["codebook"], count.to(dtype), leaves["mean"])
    if "z" in leaves:  # the gate: a strided view of a projection (B, T, H D_v + 3), as the GAU's
        Bz, T, _ = leaves["z"].shape
        switches["gate"] = leaves["z"][..., 3:].unflatten(-1, (H, DV)).transpose(1, 2)  # (B, H, T, D_v)
    with use_kernels(kernels):
        out = blockwise_attention(leaves["q"], leaves["keys"], leaves["values"], codes, n_invalid=n_invalid,
                                  rel=leaves["rel"], u=leaves["u"], v=leaves["v"], mem_len=M, block_len=L,
                                  cache=cache, **switches)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[k] for k in names], g, allow_unused=True)
    return out, dict(zip(names, grads))


def spy(monkeypatch) -> list:
    """Records each call of the window value kernel from blockwise_attention (alone, or with the cache read as
    block_values_kernel)."""
    calls = []
    for name in ("window_values_kernel", "block_values_kernel"):
        real = getattr(kwv, name)
        monkeypatch.setattr(kwv, name, lambda *a, real=real, **k: calls.append(k.get("keep")) or real(*a, **k))
    return calls


# every switch on and off in some case; n_invalid: 0, past one block, or one per row (left padding); T 21 is not a
# multiple of L
CASES = [
    # straight_through, agg_cache, grad_thru_cache, n_invalid, M, T, the keep rule the kernel gets
    ("window", True, True, 0, 8, 21, None),
    ("window", True, False, 12, 16, 24, "near"),
    ("window", False, True, 12, 16, 21, None),
    ("window", True, False, "rows", 16, 21, "near"),
    ("block", True, False, 0, 8, 24, "own"),
    ("block", True, True, "rows", 16, 21, None),
    ("block", False, False, 12, 16, 21, "own"),
    ("block", False, True, "rows", 8, 21, None),
]


@pytest.mark.parametrize("straight_through, agg_cache, grad_thru_cache, n_invalid, M, T, rule", CASES)
def test_blockwise_with_the_kernel_equals_pytorch(monkeypatch, straight_through, agg_cache, grad_thru_cache,
                                                  n_invalid, M, T, rule):
    calls = spy(monkeypatch)
    gen = torch.Generator().manual_seed(M + T)
    inputs, codes, count, ninv = attention_inputs(M, T, n_invalid == "rows", gen)
    if ninv is None:
        ninv = n_invalid
    switches = dict(straight_through=straight_through, agg_cache=agg_cache, grad_thru_cache=grad_thru_cache)
    want, want_grads = run_attention(inputs, codes, count, ninv, F64, M, False, **switches)
    assert calls == []
    got, got_grads = run_attention(inputs, codes, count, ninv, torch.float32, M, True, **switches)
    assert calls == [rule]  # the kernel ran once, with the straight-through rule, and only with the kernels on
    close(got, want, 1e-5)
    grads_close(got_grads, want_grads, 1e-5)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[5]], ids=["cache", "no-cache", "rows", "block"])
@pytest.mark.parametrize("groups", [1, 2])
def test_blockwise_with_the_gate_equals_pytorch(monkeypatch, case, groups):
    """``gate``: out * SiLU(gate), on the kernel path in the value kernels' launches (also over two row groups of the
    cache's scan, each its own gated launch), equal to the PyTorch path's, every gradient (the gate's too)."""
    from tvq.ops.kernels import cache_scan

    straight_through, agg_cache, grad_thru_cache, n_invalid, M, T, _ = case
    if groups > 1:  # the means of one row at a time
        monkeypatch.setattr(cache_scan, "_CHUNK_BYTES", 1)
    gen = torch.Generator().manual_seed(M + T + 1)
    inputs, codes, count, ninv = attention_inputs(M, T, n_invalid == "rows", gen)
    inputs["z"] = torch.randn(B, T, H * DV + 3, generator=gen, dtype=F64)
    if ninv is None:
        ninv = n_invalid
    switches = dict(straight_through=straight_through, agg_cache=agg_cache, grad_thru_cache=grad_thru_cache)
    want, want_grads = run_attention(inputs, codes, count, ninv, F64, M, False, **switches)
    got, got_grads = run_attention(inputs, codes, count, ninv, torch.float32, M, True, **switches)
    close(got, want, 1e-5)
    grads_close(got_grads, want_grads, 1e-5)
    assert want_grads["z"] is not None


@pytest.mark.parametrize("straight_through, agg_cache, grad_thru_cache, n_invalid",
                         [("window", True, False, "rows"), ("block", False, False, 0)])
def test_blockwise_with_the_kernel_in_float16(monkeypatch, straight_through, agg_cache, grad_thru_cache, n_invalid):
    calls = spy(monkeypatch)
    M, T = 16, 21
    inputs, codes, count, ninv = attention_inputs(M, T, n_invalid == "rows", torch.Generator().manual_seed(7))
    if ninv is None:
        ninv = n_invalid
    switches = dict(straight_through=straight_through, agg_cache=agg_cache, grad_thru_cache=grad_thru_cache)
    want, want_grads = run_attention(inputs, codes, count, ninv, F64, M, False, **switches)
    got, got_grads = run_attention(inputs, codes, count, ninv, torch.float16, M, True, **switches)
    assert len(calls) == 1 and got.dtype == torch.float16
    close(got, want, 1e-2)
    for name, w in want_grads.items():
        if w is not None:
            close(got_grads[name], w, 1e-2)


@pytest.mark.parametrize("grad_thru_cache", [True, False])
def test_saved_means_give_the_cache_weights_gradient_in_the_window_launch(monkeypatch, grad_thru_cache):
    """S <= L: backward has the forward's means, and the window's weight-gradient launch also writes the cache
    weights' (grad @ means^T, its extra column tiles; several of them with the tiles shrunk), equal to the PyTorch
    path's."""
    monkeypatch.setattr(kwv, "TILES", dict(kwv.TILES, window=16))
    seen = []
    real = kwv.window_values_grad_weights
    monkeypatch.setattr(kwv, "window_values_grad_weights",
                        lambda *a: seen.append(a[4] is not None if len(a) > 4 else False) or real(*a))
    M, T = 8, 24  # L 8: S 40 > L, the means are not saved (backward recomputes them); S 8, they are
    for n_code, saved in ((40, False), (8, True)):
        seen.clear()
        inputs, codes, count, _ = attention_inputs(M, T, False, torch.Generator().manual_seed(n_code), S=n_code)
        switches = dict(straight_through="window", agg_cache=True, grad_thru_cache=grad_thru_cache)
        want, want_grads = run_attention(inputs, codes, count, 3, F64, M, False, **switches)
        got, got_grads = run_attention(inputs, codes, count, 3, torch.float32, M, True, **switches)
        assert seen == [saved]
        close(got, want, 1e-5)
        grads_close(got_grads, want_grads, 1e-5)


def test_blockwise_with_the_kernel_without_grad(monkeypatch):
    """Inference (no autograd graph): the kernel adds the window's share to the cache read's output."""
    calls = spy(monkeypatch)
    M, T = 8, 21
    inputs, codes, count, ninv = attention_inputs(M, T, True, torch.Generator().manual_seed(T))
    outs = []
    for dtype, kernels in ((F64, False), (torch.float32, True)):
        x = {k: t.to(dtype) for k, t in inputs.items()}
        with torch.no_grad(), use_kernels(kernels):
            outs.append(blockwise_attention(
                x["q"], x["keys"], x["values"], codes, n_invalid=ninv, rel=x["rel"], u=x["u"], v=x["v"], mem_len=M,
                block_len=L, cache=(x["codebook"], count.to(dtype), x["mean"]), straight_through="window",
                agg_cache=True, grad_thru_cache=False))
    assert calls == [None]  # no gradient: no straight-through rule
    close(outs[1], outs[0], 1e-5)
