"""The fused score kernel (tvq.ops.kernels.scores) against PyTorch: the op's weights and gradients against a
float64 reference written from the spec's distances, and blockwise_attention's output and every gradient with
the kernels on (float32, float16) against the PyTorch path in float64. On a CPU through Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
from conftest import close_to_reference as close, grads_close

pytest.importorskip("triton")

from tvq.ops import blockwise_attention  # noqa: E402
from tvq.ops.kernels import use_kernels  # noqa: E402
from tvq.ops.kernels import scores as kscores  # noqa: E402
from tvq.ops.kernels import window_values as kwv  # noqa: E402
from tvq.ops.kernels.scores import window_softmax  # noqa: E402

B, H, L, S, DK, DV = 2, 2, 8, 16, 16, 24


def reference_softmax(qu, keys, pos, n_invalid, cache, cache_bias, divide, key_keep=None):
    """p_win, p_cache from the distances d = M + a - w directly (no skew), in the inputs' dtype; ``key_keep``
    (L, W) bool: the (query, slot) pairs whose content score's gradient reaches the key (None: all)."""
    Bq, Hq, nb, Lq, _ = qu.shape
    M = pos.shape[-1] - 1
    W = M + Lq
    k_win = keys.unfold(2, W, Lq).transpose(-1, -2)  # (B, H, nb, W, D_k)
    a = torch.arange(Lq)[:, None]
    w = torch.arange(W)[None, :]
    j = w - a  # (L, W)
    near = (j >= 0) & (j <= M)
    content = qu @ k_win.transpose(-1, -2)  # (B, H, nb, L, W)
    if key_keep is not None:  # the same scores; the dropped pairs' gradient reaches qu only
        content = torch.where(key_keep, content, qu @ k_win.detach().transpose(-1, -2))
    s = content + torch.where(near, pos.gather(-1, (M - j).clamp(0, M).expand(Bq, Hq, nb, Lq, W)), 0.0)  # distance
    bias = cache_bias.view(Hq, 1, 1, 1) if cache_bias is not None else 0.0
    if cache is not None:
        s = torch.where(j < 0, s + bias, s)
        seen = j <= M
    else:
        seen = near
    slot = torch.arange(nb)[:, None, None] * Lq + w  # (nb, 1, W)
    query = M + torch.arange(nb)[:, None, None] * Lq + a  # (nb, L, 1)
    if isinstance(n_invalid, torch.Tensor):
        ninv = n_invalid.view(Bq, 1, 1, 1)
        empty = (slot < ninv) & (query >= ninv)  # (B, nb, L, W)
    else:
        empty = (slot < n_invalid).expand(1, nb, Lq, W)
    s = torch.where(seen & ~empty[:, None], s, float("-inf"))
    if cache is None:
        return torch.softmax(s, -1), s.new_zeros(*s.shape[:-1], 0)
    codebook, count = cache
    sc = qu @ codebook[:, None].transpose(-1, -2) + bias
    sc = torch.where(count[..., None, :] > 0, sc + count.clamp_min(1).log()[..., None, :], float("-inf"))
    p_win, p_cache = torch.softmax(torch.cat([s, sc], -1), -1).split([W, sc.shape[-1]], -1)
    return p_win, (p_cache / count.clamp_min(1)[..., None, :] if divide else p_cache)


def op_inputs(M, nb, agg, bias, n_invalid, gen):
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    qu, keys, pos = r(B, H, nb, L, DK), r(B, H, M + nb * L, DK), r(B, H, nb, L, M + 1)
    cache = None
    if agg:
        count = torch.randint(0, 4, (B, H, nb, S), generator=gen).double()  # zeros: codes never seen
        cache = (r(H, S, DK), count)
    return qu, keys, pos, cache, r(H) if bias else None


@pytest.mark.parametrize("M, agg, bias, n_invalid, divide, tiles", [
    (8, True, True, 0, True, None),
    (16, True, False, 12, False, None),
    (16, False, False, 5, False, None),
    (8, True, True, "rows", False, (16, 16, 16)),
    (16, True, True, "rows", True, (16, 16, 16)),
])
def test_op_matches_the_reference(monkeypatch, M, agg, bias, n_invalid, divide, tiles):
    if tiles:  # several window and codeword tiles per row
        monkeypatch.setattr(kscores, "TILES", dict(zip(("rows", "window", "cache"), tiles)))
    gen = torch.Generator().manual_seed(M + 2 * agg)
    nb = 3
    if n_invalid == "rows":  # left padding reaching into the chunk
        n_invalid = torch.tensor([M + 3, 2])
    qu, keys, pos, cache, cache_bias = op_inputs(M, nb, agg, bias, n_invalid, gen)
    leaves = [qu, keys, pos] + ([cache[0]] if agg else []) + ([cache_bias] if bias else [])
    g_win = torch.randn(B, H, nb, L, M + L, generator=gen, dtype=torch.float64)
    g_cache = torch.randn(B, H, nb, L, S if agg else 0, generator=gen, dtype=torch.float64)

    want = reference_softmax(qu.requires_grad_(), keys.requires_grad_(), pos.requires_grad_(), n_invalid,
                             cache and (cache[0].requires_grad_(), cache[1]),
                             cache_bias.requires_grad_() if bias else None, divide)
    outs = 2 if agg else 1  # without the cache p_cache is empty
    want_grads = torch.autograd.grad(want[:outs], leaves, (g_win, g_cache)[:outs])

    f32 = [x.detach().float().requires_grad_() for x in leaves]
    qu32, keys32, pos32 = f32[:3]
    cache32 = (f32[3], cache[1].float()) if agg else None
    bias32 = f32[-1] if bias else None
    with use_kernels(True):
        got = kscores.window_softmax(qu32, keys32, pos32, n_invalid=n_invalid, key_keep=None, cache=cache32,
                                     cache_bias=bias32, out_dtype=torch.float32, divide=divide)
    got_grads = torch.autograd.grad(got[:outs], f32, (g_win.float(), g_cache.float())[:outs])
    for g, w in zip(got, want):  # p_win, p_cache
        assert g.shape == w.shape
        close(g, w, 1e-5)
    for g, w in zip(got_grads, want_grads):  # qu, keys, pos[, codebook][, cache_bias]
        close(g, w, 1e-5)


@pytest.mark.parametrize("key_keep", [None, "own", "near"])
def test_the_d_k_gradients_run_in_the_score_and_window_kernels(monkeypatch, key_keep):
    """Backward's g_qu comes from the score kernel's own launch and the keys' gradient (with the straight-through
    rule) from the window kernel of tvq.ops.kernels.window_values, which reads the keys in place: no ``unfold``,
    the float64 reference's gradients."""
    M, nb = 16, 3  # W = 24: three windows hold most keys
    gen = torch.Generator().manual_seed(5)
    n_invalid = torch.tensor([M + 3, 2])
    qu, keys, pos, cache, cache_bias = op_inputs(M, nb, True, True, n_invalid, gen)
    leaves = [qu, keys, pos, cache[0], cache_bias]
    g_win = torch.randn(B, H, nb, L, M + L, generator=gen, dtype=torch.float64)
    g_cache = torch.randn(B, H, nb, L, S, generator=gen, dtype=torch.float64)
    a, w = torch.arange(L)[:, None], torch.arange(M + L)[None, :]
    keep = {None: None, "own": (w >= M).expand(L, -1), "near": w >= a}[key_keep]  # (L, W)
    want = reference_softmax(*[x.requires_grad_() for x in leaves[:3]], n_invalid,
                             (leaves[3].requires_grad_(), cache[1]), leaves[4].requires_grad_(), False, keep)
    want_grads = torch.autograd.grad(want, leaves, (g_win, g_cache))

    calls, scores_backward = [], kscores.window_scores_backward
    for name in ("window_scores_backward", "window_values_grad_values"):  # spies on the ops the backward calls
        op = getattr(kscores, name)
        monkeypatch.setattr(kscores, name, lambda *args, op=op: calls.append((op, args)) or op(*args))

    def no_unfold(*args, **kwargs):
        raise AssertionError("a key window was copied")

    f32 = [x.detach().float().requires_grad_() for x in leaves]
    with use_kernels(True), monkeypatch.context() as m:
        m.setattr(torch.Tensor, "unfold", no_unfold)
        got = kscores.window_softmax(*f32[:3], n_invalid=n_invalid, key_keep=key_keep,
                                     cache=(f32[3], cache[1].float()), cache_bias=f32[4], out_dtype=torch.float32)
        got_grads = torch.autograd.grad(got, f32, (g_win.float(), g_cache.float()))
    assert [op for op, _ in calls] == [scores_backward, kwv.window_values_grad_values]
    assert calls[1][1][2] == kwv.KEEP_MODES[key_keep]
    for got_g, want_g in zip(got_grads, want_grads):  # qu, keys, pos, codebook, cache_bias
        close(got_g, want_g, 1e-5)


def attention_inputs(M, T, per_row, bias, dtype, gen):
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    inputs = dict(q=r(B, H, T, DK), keys=r(B, H, M + T, DK), values=r(B, H, M + T, DV), rel=r(H, M + 1, DK) / 4,
                  u=r(H, DK) / 4, v=r(H, DK) / 4, codebook=r(H, S, DK), mean=r(B, H, S, DV),
                  cache_bias=r(H) if bias else None)
    codes = torch.randint(0, S, (B, H, M + T), generator=gen)
    count = torch.randint(0, 3, (B, H, S), generator=gen).double()
    n_invalid = torch.tensor([M + 3, 0]) if per_row else per_row
    return {k: x for k, x in inputs.items() if x is not None}, codes, count, n_invalid


def run_attention(inputs, codes, count, n_invalid, dtype, M, kernels, **switches):
    leaves = {k: x.detach().to(dtype).requires_grad_() for k, x in inputs.items()}
    cache = (leaves["codebook"], count.to(dtype), leaves["mean"].detach())
    with use_kernels(kernels):
        out = blockwise_attention(leaves["q"], leaves["keys"], leaves["values"], codes, n_invalid=n_invalid,
                                  rel=leaves["rel"], u=leaves["u"], v=leaves["v"], mem_len=M, block_len=L,
                                  cache=cache, cache_bias=leaves.get("cache_bias"), **switches)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    names = [k for k in leaves if k != "mean"]
    grads = torch.autograd.grad(out, [leaves[k] for k in names], g, allow_unused=True)
    return out, dict(zip(names, grads))


# every switch is on and off in some case; n_invalid: an int (0 or past one block) or one per row (left padding)
CASES = [
    # straight_through, agg_cache, grad_thru_cache, cache_bias, n_invalid, M, T
    ("window", True, True, True, 0, 8, 21),
    ("window", True, False, False, 12, 16, 24),
    ("window", False, True, False, 12, 16, 21),
    ("window", True, True, True, True, 16, 21),
    ("block", True, False, True, 0, 8, 24),
    ("block", True, True, False, True, 16, 21),
    ("block", False, False, False, 0, 16, 21),
    ("block", False, True, True, True, 8, 21),
]


@pytest.mark.parametrize("straight_through, agg_cache, grad_thru_cache, bias, n_invalid, M, T", CASES)
def test_blockwise_with_the_kernel_equals_pytorch(monkeypatch, straight_through, agg_cache, grad_thru_cache, bias,
                                                  n_invalid, M, T):
    calls = []
    monkeypatch.setattr(kscores, "window_softmax", lambda *a, **k: calls.append(1) or window_softmax(*a, **k))
    gen = torch.Generator().manual_seed(M + T)
    per_row = n_invalid is True
    inputs, codes, count, ninv = attention_inputs(M, T, per_row, bias, torch.float64, gen)
    if not per_row:
        ninv = n_invalid
    switches = dict(straight_through=straight_through, agg_cache=agg_cache, grad_thru_cache=grad_thru_cache)
    want, want_grads = run_attention(inputs, codes, count, ninv, torch.float64, M, False, **switches)
    got, got_grads = run_attention(inputs, codes, count, ninv, torch.float32, M, True, **switches)
    assert calls == [1]  # the kernel ran, and only with the kernels on
    close(got, want, 1e-5)
    grads_close(got_grads, want_grads, 1e-5)


@pytest.mark.parametrize("straight_through, agg_cache, n_invalid", [("window", True, True), ("block", False, 0)])
def test_blockwise_with_the_kernel_in_float16(straight_through, agg_cache, n_invalid):
    M, T = 16, 21
    gen = torch.Generator().manual_seed(7)
    inputs, codes, count, ninv = attention_inputs(M, T, n_invalid is True, True, torch.float64, gen)
    if n_invalid is not True:
        ninv = n_invalid
    switches = dict(straight_through=straight_through, agg_cache=agg_cache, grad_thru_cache=True)
    want, want_grads = run_attention(inputs, codes, count, ninv, torch.float64, M, False, **switches)
    got, got_grads = run_attention(inputs, codes, count, ninv, torch.float16, M, True, **switches)
    assert got.dtype == torch.float16
    close(got, want, 1e-2)
    for name, w in want_grads.items():
        if w is not None:
            close(got_grads[name], w, 1e-2)


@pytest.mark.parametrize("per_row", [False, True])
def test_the_ops_trace(per_row):
    """Schema, fake (shape-only) registrations and AOT tracing of both launches (torch.compile, the cost model)."""
    M, nb = 8, 2
    gen = torch.Generator().manual_seed(3)
    qu, keys, pos, (codebook, count), cache_bias = (
        x.float() if isinstance(x, torch.Tensor) else (x[0].float(), x[1].float())
        for x in op_inputs(M, nb, True, True, 0, gen))
    ninv = torch.tensor([M + 3, 0]) if per_row else None
    args = (qu, keys, pos, codebook, count, cache_bias, ninv, 0 if per_row else 3, per_row, torch.float32)
    torch.library.opcheck(kscores.window_scores.op, args)
    p_win, p_cache, lse = kscores.window_scores(*args)
    torch.library.opcheck(kscores.window_scores_backward.op,
                          args[:-1] + (lse, torch.randn_like(p_win), torch.randn_like(p_cache)))


@pytest.mark.parametrize("T", [5, 21])
def test_blockwise_with_the_kernel_without_grad(T):
    """Inference (no autograd graph, the window product accumulated in place), also a chunk shorter than a block."""
    M = 8
    gen = torch.Generator().manual_seed(T)
    inputs, codes, count, ninv = attention_inputs(M, T, True, True, torch.float64, gen)
    outs = []
    for dtype, kernels in ((torch.float64, False), (torch.float32, True)):
        x = {k: t.to(dtype) for k, t in inputs.items()}
        with torch.no_grad(), use_kernels(kernels):
            outs.append(blockwise_attention(
                x["q"], x["keys"], x["values"], codes, n_invalid=ninv, rel=x["rel"], u=x["u"], v=x["v"], mem_len=M,
                block_len=L, cache=(x["codebook"], count.to(dtype), x["mean"]), cache_bias=x["cache_bias"],
                straight_through="window", agg_cache=True, grad_thru_cache=False))
    close(outs[1], outs[0], 1e-5)


def test_blockwise_with_every_kernel_under_bfloat16_autocast():
    """Under CPU bf16 autocast (Triton's interpreter multiplies bf16 in float32, as its tl.dot cannot) the three
    kernels together give the PyTorch path's output to bf16 accuracy."""
    from tvq.ops import blockwise_attention

    gen = torch.Generator().manual_seed(3)
    B, H, T, Dk, Dv, M, L, S = 2, 2, 24, 16, 24, 8, 8, 16
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    codebook, codes = r(H, S, Dk), torch.randint(0, S, (B, H, M + T), generator=gen)
    keys = codebook[torch.arange(H)[:, None], codes]
    count = torch.randint(0, 3, (B, H, S), generator=gen).float()
    args = (r(B, H, T, Dk), keys, r(B, H, M + T, Dv), codes)
    kw = dict(n_invalid=0, rel=r(H, M + 1, Dk), u=r(H, Dk), v=r(H, Dk), mem_len=M, block_len=L, agg_cache=True,
              grad_thru_cache=True, cache=(codebook, count, r(B, H, S, Dv)))
    outs = []
    for kernels in (True, False):
        with use_kernels(kernels), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(blockwise_attention(*args, **kw).float())
    close(outs[0], outs[1], 5e-2)
