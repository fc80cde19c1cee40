"""Numerical health of the float32 fast path on long sequences."""

import pytest
import torch

from tvq import TransformerVQ, TransformerVQConfig
from conftest import clone_with

# float32 blockwise vs the float64 quadratic reference at T = 4096: logits of magnitude ~5 agree
# to ~2e-6 (measured 1.8e-6, i.e. ~3e-7 relative, a few float32 ulps); 2e-5 leaves a 10x margin
# while a lost cache entry or a wrong mask shows up as an error >= 1e-3.
FLOAT32_ATOL = 2e-5


def test_float32_blockwise_matches_float64_reference_at_4096():
    torch.manual_seed(0)
    cfg = TransformerVQConfig(vocab_size=256, d_model=64, d_k=16, d_v=64, n_head=2, n_layer=1,
                              n_code=64, block_len=64, mem_len=64)
    ref = TransformerVQ(cfg).double().eval()
    fast = clone_with(ref, attn_impl="blockwise").float().eval()
    ref.config.attn_impl = "quadratic"
    ids = torch.randint(0, 256, (1, 4096))
    with torch.no_grad():
        got, want = fast(ids).logits, ref(ids).logits
    assert got.dtype == torch.float32
    err = (got.double() - want).abs().max().item()
    assert err < FLOAT32_ATOL, f"max |float32 blockwise - float64 reference| = {err:.2e}"


def test_state_carried_over_2_pow_17_tokens_stays_finite():
    torch.manual_seed(0)
    cfg = TransformerVQConfig(vocab_size=256, d_model=32, d_k=8, d_v=32, n_head=1, n_layer=1,
                              n_code=32, block_len=128, mem_len=128)
    model = TransformerVQ(cfg).eval()
    state, total, chunk = None, 2**17, 16384
    with torch.no_grad():
        for _ in range(total // chunk):
            out = model(torch.randint(0, 256, (1, chunk)), state=state)
            assert torch.isfinite(out.logits).all()
            state = out.state
    assert state.pos == total
    for layer in state.layers:
        for t in (layer.keys, layer.values, layer.cache_count, layer.cache_mean):
            assert torch.isfinite(t).all()
        # float32 counts stay exact integers: every key older than the window counted once
        assert layer.cache_count.sum().item() == total - cfg.mem_len
        assert layer.cache_mean.abs().max() < 10  # silu values' means, not sums


@pytest.mark.parametrize("attn_impl", ["blockwise", "quadratic"])
@pytest.mark.parametrize("agg_cache,grad_thru_cache", [(True, True), (True, False), (False, False)])
def test_bfloat16_autocast_training_gradients_track_float32(attn_impl, agg_cache, grad_thru_cache):
    """The trainer's bf16 autocast (the GPU default): backward runs through every path, including
    the masked-gradient matmul, and the gradients stay close to float32's (measured ~2% relative;
    a dropped or doubled term is off by O(1))."""
    cfg = TransformerVQConfig(vocab_size=64, d_model=32, d_k=16, d_v=32, n_head=2, n_layer=1, n_code=16,
                              block_len=8, mem_len=8, attn_impl=attn_impl, agg_cache=agg_cache,
                              grad_thru_cache=grad_thru_cache)
    ids = torch.randint(0, 64, (2, 41), generator=torch.Generator().manual_seed(0))
    grads = []
    for amp in (False, True):
        torch.manual_seed(0)
        model = TransformerVQ(cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    rel = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    assert rel < 0.08, f"bf16 autocast gradients are {rel:.3f} (relative) from float32's"


def test_linear_fallback_and_arguments():
    from tvq.ops import linear as lin

    torch.manual_seed(0)
    x, w, r = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64), torch.randn(2, 5, 6)
    for act, res, want in [(None, None, x @ w.T), ("silu", None, torch.nn.functional.silu(x @ w.T)),
                           (None, r.double(), x @ w.T + r)]:
        torch.testing.assert_close(lin.linear(x, w, act, res), want)  # float64 always takes F.linear
        with torch.no_grad():  # float32: the fused kernel where oneDNN is there
            got = lin.linear(x.float(), w.float(), act, None if res is None else res.float())
            torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    x, w = x.float(), w.float()
    with pytest.raises(ValueError, match="act must be None or 'silu'"):
        lin.linear(x, w, act="gelu")
    with pytest.raises(ValueError, match="an activation and a residual"):
        lin.linear(x, w, act="silu", residual=r)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lin.fused_linear_ok(x, w)  # autocast runs F.linear in bfloat16
    assert not lin.fused_linear_ok(x, w.requires_grad_())  # autograd needs F.linear


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("head_type", ["shga", "mha", "mqa"])
def test_fused_cpu_inference_matches_the_plain_path(monkeypatch, head_type):
    """The eval forward with oneDNN's fused projections gives the plain path's logits and state, for every
    head type."""
    from tvq.ops import linear as lin

    torch.manual_seed(0)
    cfg = TransformerVQConfig(vocab_size=256, d_model=64, d_k=16, d_v=128, n_head=2, n_layer=2,
                              n_code=32, block_len=32, mem_len=32, head_type=head_type)
    model = TransformerVQ(cfg).eval()
    ids = torch.randint(0, 256, (2, 300))
    with torch.no_grad():
        assert lin.fused_linear_ok(torch.zeros(1), model.attns[0].w_q.weight)
        calls = []
        real = lin._LINEAR_POINTWISE
        monkeypatch.setattr(lin, "_LINEAR_POINTWISE", type("Spy", (), {
            "__call__": lambda self, *a: calls.append(1) or real(*a),
            "binary": lambda self, *a: calls.append(1) or real.binary(*a)})())
        fast = model(ids)
        assert len(calls) == 4 * cfg.n_attn  # q, k, v[|g] and o of every attention sublayer
        model.attns[0].w_o.register_forward_hook(lambda mod, inp, out: calls.append(0))
        model(ids)  # a hooked projection sends its sublayer down the plain path, which runs the hook
        assert calls.count(0) == 1 and calls.count(1) == 2 * 4 * cfg.n_attn - 4
        monkeypatch.setattr(lin, "_LINEAR_POINTWISE", None)
        plain = model(ids)
    torch.testing.assert_close(fast.logits, plain.logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(fast.state.layers, plain.state.layers):
        for x, y in zip(a._tensors(), b._tensors()):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_fused_rms_norm_of_the_cuda_path_equals_the_formula():
    """rms_norm runs PyTorch's _fused_rms_norm on CUDA; its value and gradient are the CPU formula's (float64,
    here on the CPU, where the op is PyTorch's own composite)."""
    from tvq.layers.norm import rms_norm

    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    fused = torch.ops.aten._fused_rms_norm(x, [16], None, 1e-6)[0]
    plain = rms_norm(x, 1e-6)
    torch.testing.assert_close(fused, plain, atol=1e-12, rtol=0)
    w = torch.randn_like(plain)
    g_fused, = torch.autograd.grad((fused * w).sum(), x)
    g_plain, = torch.autograd.grad((plain * w).sum(), x)
    torch.testing.assert_close(g_fused, g_plain, atol=1e-12, rtol=0)


def test_cast_weights_are_the_casts_joined_per_group():
    """cast_weights = per group, the cat of the casts, without gradient; a group of mixed widths is refused."""
    from tvq.ops.linear import cast_weights

    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(n, 5, generator=gen, requires_grad=True) for n in (3, 4, 2))
    d = torch.randn(6, 3, generator=gen, requires_grad=True)
    ab, cc, dd = cast_weights([[a, b], [c], [d]], torch.float16)
    assert ab.dtype == cc.dtype == dd.dtype == torch.float16 and not any(t.requires_grad for t in (ab, cc, dd))
    assert torch.equal(ab, torch.cat([a.half(), b.half()])) and torch.equal(cc, c.half()) and torch.equal(dd, d.half())
    with pytest.raises(ValueError, match="one dtype and one width"):
        cast_weights([[a, torch.randn(2, 4)]], torch.float16)


@pytest.mark.parametrize("shape", [(7,), (2, 3)])
def test_cast_linear_is_linear_of_the_cast_with_gradients_in_the_weights_dtype(shape):
    """cast_linear(x, cast, weights) = F.linear(x, cat(weights) cast); x's gradient as F.linear's through the cast,
    each weight's = the product's, given in the weights' dtype (float64 here; on a GPU one bf16 GEMM writes float32,
    on a CPU the product is cast); a w_cast of the wrong shape is refused."""
    from tvq.ops.linear import cast_linear, cast_weights, mm_to

    gen = torch.Generator().manual_seed(2)
    a, b = (torch.randn(n, 5, generator=gen, dtype=torch.float64, requires_grad=True) for n in (3, 4))
    x = torch.randn(*shape, 5, generator=gen).requires_grad_()
    w, = cast_weights([[a, b]], torch.float32)
    y = cast_linear(x, w, [a, b])  # (..., 7)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w), rtol=0, atol=0)
    dy = torch.randn(y.shape, generator=gen)
    g_x, g_a, g_b = torch.autograd.grad(y, (x, a, b), dy)
    assert g_a.dtype == g_b.dtype == torch.float64 and g_x.dtype == torch.float32
    torch.testing.assert_close(g_x, dy @ w, rtol=1e-6, atol=1e-6)
    want = dy.reshape(-1, 7).t() @ x.detach().reshape(-1, 5)  # (7, 5)
    torch.testing.assert_close(torch.cat([g_a, g_b]), want.double(), rtol=1e-6, atol=1e-6)
    assert torch.equal(mm_to(dy.reshape(-1, 7).t(), x.detach().reshape(-1, 5), torch.float64), want.double())
    with pytest.raises(ValueError, match="stacked by rows"):
        cast_linear(x, w[:6], [a, b])


def test_precast_weights_cast_many_calls_in_one_copy(monkeypatch):
    """precast_weights: several cast_weights calls' groups cast by ONE multi-tensor copy; each call given its own
    (``cast=``) returns the same values without copying again; a cast of the wrong shape or dtype is refused."""
    from tvq.ops.linear import cast_weights, precast_weights

    gen = torch.Generator().manual_seed(1)
    calls = [[[torch.randn(n, 5, generator=gen, requires_grad=True) for n in (3, 4)],
              [torch.randn(6, 3, generator=gen, requires_grad=True)]] for _ in range(3)]
    copies = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: copies.append(len(dst)) or real(dst, src))
    casts = precast_weights(calls, torch.float16)
    assert copies == [9]  # three calls of three weights each: one copy
    for groups, cast in zip(calls, casts):
        got = cast_weights(groups, torch.float16, cast)
        want = cast_weights(groups, torch.float16)
        assert all(not c.requires_grad for c in got)
        for x, y in zip(got, want):
            assert torch.equal(x, y) and x.dtype == torch.float16
    assert copies == [9] + [3] * 3  # per call the plain one's copy (none for the cast one)
    with pytest.raises(ValueError, match="do not match"):
        cast_weights(calls[0], torch.bfloat16, casts[0])
