"""The two straight-through rules (config.straight_through): same forward, different gradients.

"window": keys within mem_len of the query pass the straight-through (ST) gradient; "block" (the
official code's): every key of the window of the query's block, and with grad_thru_cache=False only
the block's own keys and values get a gradient. Blockwise == quadratic in float64 for both.
"""

import pytest
import torch

from tvq.ops import blockwise_attention, quadratic_attention
from conftest import clone_with, make_model

ATOL = 1e-10


def chunked_logits_and_grads(model, ids, splits):
    """Loss over chunks run one after the other with the state carried, not detached (one graph)."""
    model.zero_grad(set_to_none=True)
    state, logits, loss = None, [], 0.0
    for chunk in ids.split(splits, 1):
        out = model(chunk, state=state, labels=chunk.roll(-1, 1))
        state, logits, loss = out.state, logits + [out.logits], loss + out.loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits, 1).detach(), grads


def max_grad_diff(ga, gb):
    assert ga.keys() == gb.keys()
    return max((ga[n] - gb[n]).abs().max().item() for n in ga)


@pytest.mark.parametrize("straight_through", ["window", "block"])
@pytest.mark.parametrize("block_len,mem_len", [(4, 8), (8, 8), (16, 5)])  # L < M, L = M, L > M
@pytest.mark.parametrize("agg_cache", [True, False])
@pytest.mark.parametrize("grad_thru_cache", [True, False])
@pytest.mark.parametrize("splits", [[45], [13, 32]])  # one chunk; two, the state carried in the graph
def test_blockwise_equals_quadratic(straight_through, block_len, mem_len, agg_cache, grad_thru_cache, splits):
    model = make_model(block_len=block_len, mem_len=mem_len, agg_cache=agg_cache, grad_thru_cache=grad_thru_cache,
                       straight_through=straight_through).train()
    ref = clone_with(model, attn_impl="quadratic")
    torch.manual_seed(block_len + mem_len)
    ids = torch.randint(0, 50, (2, 45))
    la, ga = chunked_logits_and_grads(model, ids, splits)
    lb, gb = chunked_logits_and_grads(ref, ids, splits)
    torch.testing.assert_close(la, lb, atol=ATOL, rtol=0)
    assert max_grad_diff(ga, gb) < ATOL


@pytest.mark.parametrize("impl", ["blockwise", "quadratic"])
@pytest.mark.parametrize("grad_thru_cache", [True, False])
def test_forward_never_depends_on_the_rule(ids, impl, grad_thru_cache):
    model = make_model(attn_impl=impl, grad_thru_cache=grad_thru_cache).train()
    la, ga = chunked_logits_and_grads(model, ids, [200])
    lb, gb = chunked_logits_and_grads(clone_with(model, straight_through="block"), ids, [200])
    torch.testing.assert_close(la, lb, atol=ATOL, rtol=0)  # the same to rounding (other summation splits)
    assert max_grad_diff(ga, gb) > 1e-4  # ... while the gradients do (so the tests can fail)


@pytest.mark.parametrize("impl", ["blockwise", "quadratic"])
@pytest.mark.parametrize("grad_thru_cache", [True, False])
def test_only_the_block_rule_depends_on_block_len(ids, impl, grad_thru_cache):
    for rule, depends in (("window", False), ("block", True)):
        model = make_model(attn_impl=impl, straight_through=rule, grad_thru_cache=grad_thru_cache,
                           block_len=4, mem_len=8).train()
        la, ga = chunked_logits_and_grads(model, ids, [200])
        lb, gb = chunked_logits_and_grads(clone_with(model, block_len=16), ids, [200])
        torch.testing.assert_close(la, lb, atol=ATOL, rtol=0)
        diff = max_grad_diff(ga, gb)
        assert diff > 1e-4 if depends else diff < ATOL, (rule, diff)


@pytest.mark.parametrize("grad_thru_cache", [True, False])
def test_reference_block_rule_reaches_the_right_keys(grad_thru_cache):
    """For each query t (block length L, window M), the keys whose gradient is nonzero are exactly those
    the rule names: keys at t - M..t always; older keys at >= floor(t / L) L - M (ST); without
    grad_thru_cache, keys and values before floor(t / L) L get none."""
    torch.manual_seed(0)
    B, H, T, Dk, Dv, M, L = 1, 1, 20, 4, 3, 3, 6
    q = torch.randn(B, H, T, Dk, dtype=torch.float64)
    k = torch.randn(B, H, T, Dk, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, T, Dv, dtype=torch.float64, requires_grad=True)
    rel = torch.randn(H, M + 1, Dk, dtype=torch.float64)
    u, vb = torch.randn(2, H, Dk, dtype=torch.float64)
    cache = (torch.zeros(H, 1, Dk, dtype=torch.float64), torch.zeros(B, H, 1, dtype=torch.float64),
             torch.zeros(B, H, 1, Dv, dtype=torch.float64))  # empty: every key is in the list
    out = quadratic_attention(q, k, v, None, n_invalid=0, rel=rel, u=u, v=vb, mem_len=M, block_len=L,
                              agg_cache=True, grad_thru_cache=grad_thru_cache, cache=cache, straight_through="block")
    j = torch.arange(T)
    for t in range(1, T):  # (query 0 has one key: its output does not depend on it)
        gk, gv = torch.autograd.grad(out[0, 0, t].sum(), (k, v), retain_graph=True)
        start = t // L * L
        first = start - M if grad_thru_cache else start
        want_k = (j >= max(first, 0)) & (j <= t)
        want_v = (j >= (0 if grad_thru_cache else start)) & (j <= t)
        assert torch.equal(gk[0, 0].abs().sum(-1) > 0, want_k), t
        assert torch.equal(gv[0, 0].abs().sum(-1) > 0, want_v), t


def test_paper_presets_use_the_official_rule():
    from tvq.training.config import preset

    for name in ("enwik8", "pg19", "imagenet64"):
        assert preset(name).model.straight_through == "block"
    assert preset("small").model.straight_through == "window"


def test_bad_rule_is_rejected():
    from tvq import TransformerVQConfig

    with pytest.raises(ValueError, match="straight_through"):
        TransformerVQConfig(straight_through="blocks")


def passes_gradient(rule: str, grad_thru_cache: bool, i: int, j: int, first: int, M: int, L: int) -> tuple[bool, bool]:
    """The definition of docs/spec.md section 4, pair by pair: whether key j's straight-through gradient and
    value j's gradient pass through query i (key-list indices; the chunk's queries start at ``first``)."""
    if rule == "window":
        near = i - j <= M
        return near, grad_thru_cache or near
    block_start = first + (i - first) // L * L
    return j >= (block_start - M if grad_thru_cache else block_start), grad_thru_cache or j >= block_start


def per_pair_attention(q, keys, values, rel, u, vb, cache, M, L, rule, grad_thru_cache):
    """Attention written out per (query, key) pair, every pair's key and value detached unless the rule passes
    its gradient: query i over keys j <= i of the key list and the S cache entries."""
    codebook, count, mean = cache
    B, H, T, _ = q.shape
    first = keys.shape[2] - T
    out = torch.zeros(B, H, T, values.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                i = first + t
                qu, qv = q[b, h, t] + u[h], q[b, h, t] + vb[h]
                scores, vals = [], []
                for j in range(i + 1):
                    key_ok, value_ok = passes_gradient(rule, grad_thru_cache, i, j, first, M, L)
                    k_j = keys[b, h, j] if key_ok else keys[b, h, j].detach()
                    d = i - j
                    scores.append(qu @ k_j + (qv @ rel[h, d] if d <= M else 0.0))
                    vals.append(values[b, h, j] if value_ok else values[b, h, j].detach())
                for s_ in range(codebook.shape[1]):
                    if count[b, h, s_] > 0:
                        scores.append(qu @ codebook[h, s_] + count[b, h, s_].log())
                        vals.append(mean[b, h, s_])
                w = torch.softmax(torch.stack(scores), 0)
                out[b, h, t] = sum(wi * vi for wi, vi in zip(w, vals))
    return out


@pytest.mark.parametrize("rule", ["window", "block"])
@pytest.mark.parametrize("grad_thru_cache", [True, False])
@pytest.mark.parametrize("impl", [quadratic_attention, blockwise_attention])
def test_rules_match_their_per_pair_definition(rule, grad_thru_cache, impl):
    """Both paths' outputs and gradients (queries, keys, values, cache means, positions) equal attention
    written out pair by pair with the rule's stop-gradients: M = 3 window slots of a carried state, then
    T = 11 queries in blocks of L = 4 (the last one partial), a cache of S = 5 codes."""
    torch.manual_seed(3)
    B, H, T, Dk, Dv, M, L, S = 1, 2, 11, 3, 2, 3, 4, 5
    f64 = dict(dtype=torch.float64)
    codebook = torch.randn(H, S, Dk, **f64)
    codes = torch.randint(0, S, (B, H, M + T))
    keys = codebook[torch.arange(H)[:, None], codes].requires_grad_()  # (B, H, M + T, D_k): codewords
    values = torch.randn(B, H, M + T, Dv, **f64, requires_grad=True)
    q = torch.randn(B, H, T, Dk, **f64, requires_grad=True)
    rel = torch.randn(H, M + 1, Dk, **f64, requires_grad=True)
    u, vb = (torch.randn(H, Dk, **f64, requires_grad=True) for _ in range(2))
    count = torch.tensor([0.0, 1.0, 3.0, 0.0, 2.0], **f64).expand(B, H, S)
    mean = torch.randn(B, H, S, Dv, **f64, requires_grad=True)
    inputs = (q, keys, values, rel, u, vb, mean)
    got = impl(q, keys, values, codes, n_invalid=0, rel=rel, u=u, v=vb, mem_len=M, block_len=L, agg_cache=True,
               grad_thru_cache=grad_thru_cache, cache=(codebook, count, mean), straight_through=rule)
    want = per_pair_attention(q, keys, values, rel, u, vb, (codebook, count, mean), M, L, rule, grad_thru_cache)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    w = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((got * w).sum(), inputs), torch.autograd.grad((want * w).sum(), inputs)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
