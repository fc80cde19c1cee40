"""The three attention paths compute docs/spec.md section 3 exactly (float64, tolerance 1e-10).

Tolerance: every path does the same float64 arithmetic up to summation order, so results agree
to a few ulps of the largest intermediate (~1e-15 relative, measured ~2e-15 on logits). 1e-10 leaves
room for long sums at T = 1000 while any real error (a wrong mask, a missed cache entry, a
wrong stop-gradient) changes logits by >= 1e-4 (checked by the "switch matters" tests below).
"""

import math

import pytest
import torch

from tvq.ops import reference_attention
from conftest import clone_with, make_model

ATOL = 1e-10


def logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids.roll(-1, 1))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def assert_close_grads(ga, gb):
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=ATOL, rtol=0, msg=name)


def assert_blockwise_equals_quadratic(model, ids):
    """The model's logits and gradients on ``ids`` equal its quadratic twin's; returns its gradients."""
    ref = clone_with(model, attn_impl="quadratic")
    la, ga = logits_and_grads(model, ids)
    lb, gb = logits_and_grads(ref, ids)
    torch.testing.assert_close(la, lb, atol=ATOL, rtol=0)
    assert_close_grads(ga, gb)
    return ga


@pytest.mark.parametrize("T", [1, 7, 63, 200, 1000])
@pytest.mark.parametrize("block_len,mem_len", [(4, 8), (8, 8), (16, 5)])  # L < M, L = M, L > M
@pytest.mark.parametrize("agg_cache", [True, False])
@pytest.mark.parametrize("grad_thru_cache", [True, False])
def test_blockwise_equals_quadratic(T, block_len, mem_len, agg_cache, grad_thru_cache):
    n_head = 1 if T == 63 else 2
    model = make_model(block_len=block_len, mem_len=mem_len, agg_cache=agg_cache,
                       grad_thru_cache=grad_thru_cache, n_head=n_head).train()
    torch.manual_seed(T)
    assert_blockwise_equals_quadratic(model, torch.randint(0, 50, (2, T)))


@pytest.mark.parametrize("T", [1, 7, 200])
@pytest.mark.parametrize("block_len,mem_len", [(1, 4), (5, 8), (8, 8), (16, 5)])
@pytest.mark.parametrize("agg_cache", [True, False])
def test_no_grad_forward_equals_quadratic(T, block_len, mem_len, agg_cache):
    """Inference (no autograd) takes paths of its own (the window product accumulated in place, the
    cache's empty blocks skipped), from a fresh state and from a carried one."""
    model = make_model(block_len=block_len, mem_len=mem_len, agg_cache=agg_cache).eval()
    ref = clone_with(model, attn_impl="quadratic")
    torch.manual_seed(T)
    ids = torch.randint(0, 50, (2, T))
    with torch.no_grad():
        state, ref_state = None, None
        for chunk in (ids, ids[:, : T // 2 + 1]):  # from a fresh state, then from a carried one
            got, want = model(chunk, state=state), ref(chunk, state=ref_state)
            torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
            state, ref_state = got.state, want.state


def test_switches_matter(ids):
    """agg_cache and grad_thru_cache really change outputs/gradients (so the test above can fail)."""
    model = make_model().train()
    la, ga = logits_and_grads(model, ids)
    lb, _ = logits_and_grads(clone_with(model, agg_cache=False), ids)
    assert (la - lb).abs().max() > 1e-4
    _, gc = logits_and_grads(clone_with(model, grad_thru_cache=False), ids)
    assert max((ga[n] - gc[n]).abs().max() for n in ga) > 1e-6


def literal_attention(q, k_hat, v, rel, u, vb, mem_len, agg_cache):
    """SPEC section 3 written out query by query, key by key."""
    B, H, T, _ = q.shape
    out = torch.zeros(B, H, T, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                scores, vals = [], []
                for j in range(i + 1):
                    d = i - j
                    if d > mem_len and not agg_cache:
                        continue
                    s = (q[b, h, i] + u[h]) @ k_hat[b, h, j]
                    if d <= mem_len:
                        s = s + (q[b, h, i] + vb[h]) @ rel[h, d]
                    scores.append(s)
                    vals.append(v[b, h, j])
                w = torch.softmax(torch.stack(scores), 0)
                out[b, h, i] = sum(wi * vi for wi, vi in zip(w, vals))
    return out


@pytest.mark.parametrize("agg_cache", [True, False])
def test_reference_is_the_spec(agg_cache):
    torch.manual_seed(0)
    B, H, T, Dk, Dv, M = 2, 2, 23, 4, 3, 5
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64) for d in (Dk, Dk, Dv))
    rel, u, vb = torch.randn(H, M + 1, Dk, dtype=torch.float64), torch.randn(H, Dk, dtype=torch.float64), \
        torch.randn(H, Dk, dtype=torch.float64)
    got = reference_attention(q, k, v, n_invalid=0, rel=rel, u=u, v=vb, mem_len=M, agg_cache=agg_cache)
    torch.testing.assert_close(got, literal_attention(q, k, v, rel, u, vb, M, agg_cache), atol=ATOL, rtol=0)


@pytest.mark.parametrize("impl", ["blockwise", "quadratic"])
def test_output_independent_of_block_len(ids, impl):
    model = make_model(attn_impl=impl).eval()
    base = model(ids).logits
    for block_len in (1, 3, 8, 13, 64, 500):
        model.config.block_len = block_len
        torch.testing.assert_close(model(ids).logits, base, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attention,impl", [("vq", "blockwise"), ("vq", "quadratic"), ("full", "blockwise")])
def test_chunked_with_state_equals_full(ids, attention, impl):
    model = make_model(attention=attention, attn_impl=impl).eval()
    full = model(ids).logits
    state, parts = None, []
    for chunk in ids.split([1, 5, 2, 31, 8, 64, 89], 1):
        out = model(chunk, state=state)
        state, parts = out.state, parts + [out.logits]
    assert state.pos == ids.shape[1]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("train", [False, True])
def test_cpu_inference_in_segments_equals_one_pass(monkeypatch, ids, train):
    """A no-grad CPU forward runs in segments carrying the state: same logits, loss, commitment loss
    (a token-weighted mean over segments, padding excluded), state and codebook statistics."""
    from tvq import TransformerVQ

    model = make_model().train(train)  # block_len 4
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) > 0.3
    labels = ids.roll(-1, 1)
    one = model(ids, labels=labels, token_mask=mask)  # autograd on: one pass
    one_stats = [q.pending_stats().clone() for q in model._quantizers()]
    for q in model._quantizers():
        q.clear_stats()
    monkeypatch.setattr(TransformerVQ, "CPU_SEGMENT_TOKENS", 100)  # B = 2, T = 200: 4 segments, in whole blocks
    runs = []
    real_run = TransformerVQ._run
    monkeypatch.setattr(TransformerVQ, "_run", lambda self, *a: runs.append(a[0].shape[1]) or real_run(self, *a))
    with torch.no_grad():
        seg = model(ids, labels=labels, token_mask=mask)
    assert runs == [52, 52, 52, 44]
    for got, want in [(seg.logits, one.logits), (seg.loss, one.loss), (seg.commit_loss, one.commit_loss)]:
        torch.testing.assert_close(got, want.detach(), atol=ATOL, rtol=0)
    assert seg.state.pos == one.state.pos == ids.shape[1]
    for a, b in zip(seg.state.layers, one.state.layers):
        for x, y in zip(a._tensors(), b._tensors()):
            torch.testing.assert_close(x, y.detach(), atol=ATOL, rtol=0)
    if train:  # the codebook statistics of the segments add up to those of the one pass
        for q, want in zip(model._quantizers(), one_stats):
            torch.testing.assert_close(q.pending_stats(), want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("attention", ["vq", "full"])
def test_one_token_at_a_time_equals_full(ids, attention):
    model = make_model(attention=attention).eval()
    ids = ids[:, :60]
    full = model(ids).logits
    state, parts = None, []
    for t in range(ids.shape[1]):
        out = model(ids[:, t: t + 1], state=state)
        state, parts = out.state, parts + [out.logits]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=0)


def test_final_state_independent_of_block_len(ids):
    """The state is a function of the tokens seen, not of how they were blocked."""
    model = make_model().eval()
    a = model(ids).state
    model.config.block_len = 7
    b = model(ids).state
    for la, lb in zip(a.layers, b.layers):
        for x, y in zip(la._tensors(), lb._tensors()):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    # every key older than the window is in the cache, once
    assert a.layers[0].cache_count.sum(-1).eq(ids.shape[1] - model.config.mem_len).all()


@pytest.mark.parametrize("attention", ["vq", "full"])
def test_causal(attention):
    """d logits[t] / d embeddings[s] = 0 for s > t: the Jacobian is lower triangular."""
    model = make_model(attention=attention, n_layer=2).eval()
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (1, 24))
    emb = model.embed(ids).detach().requires_grad_(True)
    handle = model.embed.register_forward_hook(lambda mod, inp, out: emb)
    try:
        logits = model(ids).logits  # (1, T, V)
        for t in range(ids.shape[1]):
            (g,) = torch.autograd.grad(logits[0, t].sum(), emb, retain_graph=True)
            assert torch.all(g[0, t + 1:] == 0), f"logits[{t}] depend on a later token"
            assert torch.all(g[0, : t + 1].abs().sum(-1) > 0), f"logits[{t}] ignore an earlier token"
    finally:
        handle.remove()


def test_full_attention_is_dense_softmax():
    """attention="full" attends to every past key with its true (unquantized) value."""
    model = make_model(attention="full", mem_len=3).eval()
    assert model.attns[0].quantizer is None
    torch.manual_seed(2)
    B, H, T, Dk, Dv, M = 1, 2, 12, 4, 8, 3
    q, k = torch.randn(B, H, T, Dk, dtype=torch.float64), torch.randn(B, H, T, Dk, dtype=torch.float64)
    v = torch.randn(B, H, T, Dv, dtype=torch.float64)
    rel = torch.randn(H, M + 1, Dk, dtype=torch.float64)
    zero = torch.zeros(H, Dk, dtype=torch.float64)
    got = reference_attention(q, k, v, n_invalid=0, rel=rel, u=zero, v=zero, mem_len=M, agg_cache=True)
    dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    bias = torch.einsum("bhik,hdk->bhid", q, rel).gather(-1, dist.clamp(0, M).expand(B, H, T, T))
    scores = q @ k.transpose(-1, -2) + torch.where(dist <= M, bias, 0.0)
    scores = scores.masked_fill(dist < 0, -math.inf)
    torch.testing.assert_close(got, torch.softmax(scores, -1) @ v, atol=ATOL, rtol=0)


@pytest.mark.parametrize("T,P,chunk,mem_len", [(1, 0, 4, 3), (37, 0, 8, 5), (40, 13, 16, 3), (9, 30, 4, 12)])
def test_dense_chunked_equals_reference(T, P, chunk, mem_len):
    """The full-attention baseline's O(T * chunk)-memory path == the reference, with gradients."""
    from tvq.ops import dense_attention

    torch.manual_seed(T + P)
    B, H, Dk, Dv = 2, 2, 4, 3
    q = torch.randn(B, H, T, Dk, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(B, H, P + T, Dk, dtype=torch.float64, requires_grad=True)
    values = torch.randn(B, H, P + T, Dv, dtype=torch.float64, requires_grad=True)
    rel = torch.randn(H, mem_len + 1, Dk, dtype=torch.float64, requires_grad=True)
    u, vb = (torch.randn(H, Dk, dtype=torch.float64, requires_grad=True) for _ in range(2))
    inputs = (q, keys, values, rel, u, vb)
    got = dense_attention(q, keys, values, rel=rel, u=u, v=vb, mem_len=mem_len, chunk=chunk)
    want = reference_attention(q, keys, values, n_invalid=0, rel=rel, u=u, v=vb, mem_len=mem_len, agg_cache=True)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    w = torch.randn_like(got)
    g_got = torch.autograd.grad((got * w).sum(), inputs)
    g_want = torch.autograd.grad((want * w).sum(), inputs)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def _cache_read_reference(weights, codes, values, start, first_valid):
    """weights @ (start + an exclusive prefix sum over blocks of one-hot(code)^T values)."""
    P, nb, L = codes.shape
    keep = (torch.arange(nb * L) >= first_valid).view(nb, L, 1).to(values.dtype)
    onehot = torch.nn.functional.one_hot(codes, start.shape[1]).to(values.dtype) * keep  # (P, nb, L, S)
    stats = onehot.transpose(-1, -2) @ values  # (P, nb, S, D_v)
    return weights @ (start[:, None] + stats.cumsum(1) - stats)


@pytest.mark.parametrize("nb,first_valid", [(1, 0), (2, 3), (5, 0), (5, 6), (9, 4), (9, 36)])
@pytest.mark.parametrize("fresh", [False, True])
def test_cache_read_equals_the_one_hot_prefix_sum(nb, first_valid, fresh):
    """Both implementations (a CPU's running sum; chunks of 1, 2, 4 and all blocks elsewhere) and both
    backward passes, against autograd through the one-hot reference, float64. ``fresh``: a zero start,
    whose leading blocks read empty caches (the CPU skips their products)."""
    from tvq.ops import cache

    torch.manual_seed(nb)
    P, L, S, Dv = 3, 4, 5, 6
    codes = torch.randint(0, S, (P, nb, L))
    inputs = [torch.rand(P, nb, L, S, dtype=torch.float64, requires_grad=True),  # weights
              torch.randn(P, nb, L, Dv, dtype=torch.float64, requires_grad=True),  # values
              (torch.zeros if fresh else torch.randn)(P, S, Dv, dtype=torch.float64, requires_grad=True)]  # start
    weights, values, start = inputs
    want = _cache_read_reference(weights, codes, values, start, first_valid)
    w = torch.randn_like(want)
    g_want = torch.autograd.grad((want * w).sum(), inputs)
    plain = (weights.detach(), codes, values.detach(), start.detach(), first_valid)
    grad_args = (w, weights.detach(), codes, values.detach(), start.detach(), first_valid, True)
    impls = [(cache._read_running, cache._grad_running, ())] + [
        (cache._read_chunked, cache._grad_chunked, (size,)) for size in (1, 2, 4, nb)]
    for read, grad, extra in impls:  # what a CPU and what a GPU runs
        torch.testing.assert_close(read(*plain, *extra), want.detach(), atol=1e-12, rtol=0)
        g_weights, g_values, g_start = grad(*grad_args, *extra)
        for a, b in zip((g_weights, g_values, g_start), g_want):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        g_weights_only, g_values, g_start = grad(*grad_args[:-1], False, *extra)
        torch.testing.assert_close(g_weights_only, g_want[0], atol=1e-12, rtol=0)
        assert g_values.numel() == g_start.numel() == 0
    got = cache.cache_read(weights, codes, values, start, first_valid)  # the custom op, through autograd
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad((got * w).sum(), inputs), g_want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    g_weights, = torch.autograd.grad((cache.cache_read(weights, codes, values.detach(), start.detach(),
                                                        first_valid) * w).sum(), weights)
    torch.testing.assert_close(g_weights, g_want[0], atol=1e-12, rtol=0)
    if torch.cuda.is_available():
        args = [t.detach().cuda().requires_grad_() for t in inputs]
        got = cache.cache_read(args[0], codes.cuda(), *args[1:], first_valid)
        torch.testing.assert_close(got.cpu(), want.detach(), atol=1e-12, rtol=0)
        for a, b in zip(torch.autograd.grad((got * w.cuda()).sum(), args), g_want):
            torch.testing.assert_close(a.cpu(), b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunk", [None, 7, 1000])
def test_cache_read_sums_in_start_dtype_and_multiplies_in_weights_dtype(chunk):
    """Under autocast the read's products run in bf16 (weights, values) while its sums stay float32 (start):
    300 blocks of a value 1 under one code read back as means of 1 (bf16 sums would stall at 256)."""
    from tvq.ops import cache

    nb, Dv = 300, 4
    codes = torch.zeros(1, nb, 1, dtype=torch.long)
    values = torch.ones(1, nb, 1, Dv, dtype=torch.bfloat16)
    n = torch.arange(nb, dtype=torch.float32).clamp_min(1.0)  # keys before block n
    weights = (1.0 / n).view(1, nb, 1, 1).to(torch.bfloat16)  # (P, nb, L, S): p_s / count_s with p_s = 1
    start = torch.zeros(1, 1, Dv)
    if chunk is None:
        out = cache._read_running(weights, codes, values, start, 0)
    else:
        out = cache._read_chunked(weights, codes, values, start, 0, chunk)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[0, 1:, 0].float(), torch.ones(nb - 1, Dv), atol=1e-2, rtol=0)
    grad = torch.ones_like(out)
    g = (cache._grad_running(grad, weights, codes, values, start, 0, True) if chunk is None
         else cache._grad_chunked(grad, weights, codes, values, start, 0, True, chunk))
    assert [t.dtype for t in g] == [torch.bfloat16, torch.bfloat16, torch.float32]
    # key n's value reaches every later block's read: the sum of their weights, in float32 before the cast
    want = torch.flip(torch.cumsum(torch.flip(weights[0, :, 0, 0].float(), [0]), 0), [0])  # sum over n' >= n
    torch.testing.assert_close(g[1][0, :-1, 0, 0].float(), want[1:], atol=0, rtol=1e-2)


def test_cache_read_rejects_a_start_narrower_than_weights():
    from tvq.ops.cache import cache_read

    with pytest.raises(ValueError, match="start .* must be at least as wide as weights"):
        cache_read(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 3, 5),
                   torch.zeros(1, 4, 5, dtype=torch.bfloat16))


def test_cache_read_rejects_mismatched_shapes():
    from tvq.ops.cache import cache_read

    with pytest.raises(ValueError, match=r"cache_read: weights \(P, nb, L, S\), codes"):
        cache_read(torch.zeros(2, 3, 4, 7), torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, 5, 6),
                   torch.zeros(2, 7, 6))


@pytest.mark.parametrize("entry,skipped", [(None, 3), (-0.0, 3), (1e-300, 0), (-1e-300, 0), (float("nan"), 0)])
def test_cache_read_skips_only_a_start_that_is_zero(entry, skipped):
    """Blocks 0..first_valid // L read the start alone; their products are skipped only when it is exactly
    zero (-0.0 included): a tiny value, of either sign, or a NaN must reach the output."""
    from tvq.ops.cache import _n_empty

    start = torch.zeros(2, 5, 6, dtype=torch.float64)
    if entry is not None:
        start[1, 4, 5] = entry
    assert _n_empty(start, first_valid=9, L=4, nb=7) == skipped
    assert _n_empty(start, first_valid=9, L=4, nb=2) == min(skipped, 2)
    assert _n_empty(start[:0], first_valid=0, L=4, nb=7) == 1  # no entries: nothing to read


def test_code_statistics_is_a_per_code_sum():
    from tvq.ops.cache import code_statistics

    torch.manual_seed(0)
    codes = torch.randint(0, 5, (2, 3, 4, 9))
    values = torch.randn(2, 3, 4, 9, 6, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(4, 9) > 0.3
    counts, sums = code_statistics(codes, values, valid, 5, torch.float64)
    onehot = torch.nn.functional.one_hot(codes, 5).double() * valid[..., None]
    want = onehot.transpose(-1, -2) @ values
    torch.testing.assert_close(counts, onehot.sum(-2))
    torch.testing.assert_close(sums, want)
    w = torch.randn_like(want)  # the sums' gradient reaches each valid value from its code's row
    torch.testing.assert_close(torch.autograd.grad((sums * w).sum(), values)[0],
                               torch.autograd.grad((want * w).sum(), values)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("chunk_bytes", [1, None])  # one block per chunk of the cache read; the default
@pytest.mark.parametrize("agg_cache,grad_thru_cache", [(True, True), (True, False), (False, False)])
def test_blockwise_on_cuda_equals_quadratic_on_cpu(monkeypatch, chunk_bytes, agg_cache, grad_thru_cache):
    """What a GPU runs of its own (the chunked cache read, its kernels), logits and gradients, float64;
    then the decoder on the GPU against the forward."""
    from tvq.ops import cache

    if chunk_bytes is not None:
        monkeypatch.setattr(cache, "_CHUNK_BYTES", chunk_bytes)
    model = make_model(block_len=4, mem_len=6, agg_cache=agg_cache, grad_thru_cache=grad_thru_cache).train()
    ref = clone_with(model, attn_impl="quadratic")
    gpu = clone_with(model).cuda()
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (2, 61))
    la, ga = logits_and_grads(gpu, ids.cuda())
    lb, gb = logits_and_grads(ref, ids)
    torch.testing.assert_close(la.cpu(), lb, atol=ATOL, rtol=0)
    assert_close_grads({n: g.cpu() for n, g in ga.items()}, gb)

    gpu.eval()
    with torch.no_grad():
        full = gpu(ids.cuda()).logits
        decoder = gpu.decoder(gpu(ids[:, :3].cuda()).state)
        steps = torch.stack([decoder.step(ids[:, t].cuda()) for t in range(3, 61)], 1)
    torch.testing.assert_close(steps, full[:, 3:], atol=ATOL, rtol=0)
