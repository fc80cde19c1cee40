"""Vector quantization: assignment, straight-through gradient, EMA update, distributed statistics."""

import copy

import pytest
import torch

from tvq.layers.vq import VectorQuantizer, apply_updates
from conftest import make_model


def quantizer(seed=0):
    torch.manual_seed(seed)
    return VectorQuantizer(n_head=3, n_code=16, d_k=4, decay=0.9).double()


def test_assignment_is_brute_force_nearest_codeword():
    vq = quantizer().eval()
    k = torch.randn(2, 3, 50, 4, dtype=torch.float64)
    out = vq(k)
    c = vq.codebook()  # (H, S, D_k)
    brute = torch.stack([torch.cdist(k[:, h], c[h].expand(2, -1, -1)).argmin(-1) for h in range(3)], 1)
    assert torch.equal(out.codes, brute)
    torch.testing.assert_close(out.keys, c[torch.arange(3)[None, :, None], brute])


def test_straight_through_gradient_is_identity():
    vq = quantizer().eval()
    k = torch.randn(2, 3, 10, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 10, 4, dtype=torch.float64)
    (vq(k).keys * w).sum().backward()
    torch.testing.assert_close(k.grad, w, atol=0, rtol=0)


def test_commit_loss_definition():
    vq = quantizer().eval()
    k = torch.randn(2, 3, 10, 4, dtype=torch.float64)
    out = vq(k)
    expect = (k - out.keys).square().sum(-1).sum(1).mean()  # sum over heads, mean over tokens
    torch.testing.assert_close(out.commit, expect)


def test_ema_update_closed_form():
    vq = quantizer().train()
    k = torch.randn(2, 3, 40, 4, dtype=torch.float64)
    c_sum, c_count = vq.c_sum.clone(), vq.c_count.clone()
    codes = vq(k).codes
    onehot = torch.nn.functional.one_hot(codes, 16).double()  # (B, H, T, S)
    expect_sum = 0.9 * c_sum + 0.1 * torch.einsum("bhts,bhtk->hsk", onehot, k)
    expect_count = 0.9 * c_count + 0.1 * onehot.sum((0, 2))
    metrics = vq.apply_update()
    torch.testing.assert_close(vq.c_sum, expect_sum, atol=1e-12, rtol=0)
    torch.testing.assert_close(vq.c_count, expect_count, atol=1e-12, rtol=0)
    assert vq.pending_stats().abs().sum() == 0  # cleared
    assert 0 < metrics["usage"] <= 1 and 0 <= metrics["entropy"] <= 1 and metrics["rel_err"] > 0
    assert metrics["tokens"] == 80


@pytest.mark.parametrize("revive", [0.0, 0.5])
def test_batched_update_equals_one_quantizer_at_a_time(revive):
    """apply_updates (a model's update: multi-tensor ops over all its quantizers) gives every quantizer exactly
    its own apply_update's buffers, and the mean of their metrics: other decays and shapes, revival included."""
    torch.manual_seed(0)
    vqs = [VectorQuantizer(3, 16, 4, 0.9, revive=revive), VectorQuantizer(3, 16, 4, 0.99, revive=revive),
           VectorQuantizer(2, 8, 6, 0.9, revive=revive)]
    for vq in vqs:
        vq.double().train()(torch.randn(2, vq.n_head, 30, vq.d_k, dtype=torch.float64))
    twins = copy.deepcopy(vqs)
    want = [vq.apply_update() for vq in twins]
    got = apply_updates(vqs, [vq.pending_stats().clone() for vq in vqs])
    for vq, twin in zip(vqs, twins):
        assert torch.equal(vq.c_sum, twin.c_sum) and torch.equal(vq.c_count, twin.c_count)
        assert vq.pending_stats().abs().sum() == 0
    names = {"usage", "dead", "entropy", "rel_err", "tokens"} | ({"revived"} if revive else set())
    assert set(got) == set(want[0]) == names
    for name in got:
        assert got[name] == pytest.approx(sum(m[name] for m in want) / len(want), rel=1e-12)


def test_no_statistics_in_eval_mode(ids):
    model = make_model().eval()
    model(ids)
    assert model.codebook_stats().abs().sum() == 0


def test_codebooks_are_buffers_not_parameters():
    model = make_model()
    names = {n for n, _ in model.named_parameters()}
    assert not any("c_sum" in n or "c_count" in n for n in names)
    assert any(n.endswith("quantizer.c_sum") for n in model.state_dict())


def _codebooks(model):
    return [t for n, t in model.state_dict().items() if "quantizer" in n]


def test_micro_batches_and_fake_ranks_equal_one_batch():
    torch.manual_seed(5)
    ids = torch.randint(0, 50, (4, 90))
    one = make_model().train()
    one(ids)
    one.update_codebooks()

    # gradient accumulation: two micro-batches, one update
    micro = make_model().train()
    micro(ids[:2])
    micro(ids[2:])
    micro.update_codebooks()

    # two fake data-parallel ranks: the all-reduce hook sums their statistics
    ranks = [make_model().train(), make_model().train()]
    for r, part in zip(ranks, (ids[:2], ids[2:])):
        r(part)
    stats = [r.codebook_stats().clone() for r in ranks]
    for i, r in enumerate(ranks):
        r.update_codebooks(all_reduce=lambda t, other=stats[1 - i]: t.add_(other))

    for model in (micro, *ranks):
        for a, b in zip(_codebooks(one), _codebooks(model)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert any((a != b).any() for a, b in zip(_codebooks(one), _codebooks(make_model())))


def test_token_mask_excludes_padding():
    torch.manual_seed(6)
    ids = torch.randint(0, 50, (2, 30))
    masked = make_model().train()
    mask = torch.tensor([[True] * 30, [False] * 30])
    out_masked = masked(ids, token_mask=mask)
    alone = make_model().train()
    out_alone = alone(ids[:1])
    torch.testing.assert_close(masked.codebook_stats(), alone.codebook_stats())
    torch.testing.assert_close(out_masked.commit_loss, out_alone.commit_loss)


def test_update_changes_codebook_towards_keys():
    model = make_model().train()
    torch.manual_seed(7)
    ids = torch.randint(0, 50, (2, 100))
    before = model(ids).commit_loss.item()
    for _ in range(20):
        model(ids)
        model.update_codebooks()
    after = model.eval()(ids).commit_loss.item()
    assert after < before


@pytest.mark.parametrize("attention", ["full"])
def test_full_attention_has_no_codebooks(attention, ids):
    model = make_model(attention=attention).train()
    model(ids)
    assert model.update_codebooks() == {}
    assert model.codebook_stats().numel() == 0


def _fresh(vq, dtype=None):
    book = vq.c_sum / vq.c_count.clamp_min(0.01)[..., None]
    return book if dtype is None else book.to(dtype)


def test_codebook_is_kept_until_its_buffers_change():
    """codebook() is computed once per update (and per dtype), and again whenever c_sum or c_count is written or
    replaced: an EMA update, a load, a write by hand."""
    vq = quantizer().train()
    first = vq.codebook()
    assert vq.codebook() is first and vq.codebook(torch.float32) is vq.codebook(torch.float32)
    torch.testing.assert_close(vq.codebook(torch.float32), _fresh(vq, torch.float32), atol=0, rtol=0)
    vq(torch.randn(2, 3, 20, 4, dtype=torch.float64))
    vq.apply_update()  # refreshed by the update, in both dtypes asked for before
    assert vq.codebook() is not first
    torch.testing.assert_close(vq.codebook(), _fresh(vq), atol=0, rtol=0)
    torch.testing.assert_close(vq.codebook(torch.float32), _fresh(vq, torch.float32), atol=0, rtol=0)
    with torch.no_grad():
        vq.c_sum[0, 0] += 1.0  # a write by hand
    torch.testing.assert_close(vq.codebook(), _fresh(vq), atol=0, rtol=0)
    other = quantizer(seed=1)
    vq.load_state_dict(other.state_dict())
    torch.testing.assert_close(vq.codebook(), other.codebook(), atol=0, rtol=0)
    vq.c_count = vq.c_count * 2  # replaced
    torch.testing.assert_close(vq.codebook(), _fresh(vq), atol=0, rtol=0)


def test_batched_codebook_refresh_equals_each_quantizer():
    qs = [quantizer(seed=s).train() for s in range(3)]
    for q in qs:
        q.codebook(torch.float32)  # a forward under autocast asks for the compute dtype
        q(torch.randn(2, 3, 20, 4, dtype=torch.float64))
    apply_updates(qs, [q.pending_stats().clone() for q in qs])
    for q in qs:
        for dtype in (torch.float64, torch.float32):
            torch.testing.assert_close(q.codebook(dtype), _fresh(q, dtype), atol=0, rtol=0)
