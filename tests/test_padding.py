"""Padded batches: each row of a left- or right-padded batch computes exactly what it computes alone
(float64), in the blockwise and quadratic paths, the dense baseline, the decoder and codebook statistics."""

import pytest
import torch

from conftest import make_model

PADS = [0, 3, 13, 30]  # 13 and 30 > mem_len 8: padding reaches the cache; 30 spans several blocks
T = 40


def padded_batch(seed=0, pads=PADS, length=T, vocab=50):
    torch.manual_seed(seed)
    rows = [torch.randint(0, vocab, (length - p,)) for p in pads]
    ids = torch.stack([torch.cat([torch.full((p,), 7), r]) for p, r in zip(pads, rows)])  # (B, T), pad id 7
    return ids, rows, torch.tensor(pads)


@pytest.mark.parametrize("overrides", [
    dict(attn_impl="blockwise"), dict(attn_impl="quadratic"), dict(agg_cache=False),
    dict(attn_impl="quadratic", agg_cache=False), dict(attention="full"), dict(n_layer=2, block_len=8),
])
def test_left_padded_rows_equal_rows_alone(overrides):
    model = make_model(**overrides).eval()
    ids, rows, pads = padded_batch()
    more = torch.randint(0, 50, (len(PADS), 11))
    with torch.no_grad():
        out = model(ids, left_pad=pads)
        nxt = model(more, state=out.state)  # the state carries each row's start
        for b, (p, row) in enumerate(zip(PADS, rows)):
            alone = model(row[None])
            torch.testing.assert_close(out.logits[b, p:], alone.logits[0], atol=1e-10, rtol=0)
            cont = model(more[b: b + 1], state=alone.state)
            torch.testing.assert_close(nxt.logits[b], cont.logits[0], atol=1e-10, rtol=0)


def test_left_padding_with_gradients_and_codebook_statistics():
    """Training mode: logits, commitment loss, gradients and codebook statistics of the real tokens."""
    model = make_model(n_layer=2).train()
    ids, rows, pads = padded_batch(1)
    out = model(ids, labels=ids, left_pad=pads)
    stats_batch = model.codebook_stats().clone()
    out.loss.backward()
    grad_batch = model.attns[0].w_kvg.weight.grad.clone()
    model.zero_grad()
    for q in model._quantizers():
        q.clear_stats()
    n_real = [T - p for p in PADS]
    commit, lm = 0.0, 0.0
    for p, row in zip(PADS, rows):
        alone = model(row[None], labels=row[None])
        torch.testing.assert_close(out.logits[PADS.index(p), p:], alone.logits[0], atol=1e-10, rtol=0)
        commit = commit + alone.commit_loss * len(row)
        lm = lm + alone.lm_loss * len(row)
    torch.testing.assert_close(out.commit_loss, commit / sum(n_real), atol=1e-12, rtol=0)
    torch.testing.assert_close(model.codebook_stats(), stats_batch, atol=1e-10, rtol=0)
    # labels at the padding are ignored: the batch's loss is the token mean over the real labels
    torch.testing.assert_close(out.lm_loss, lm / sum(n_real), atol=1e-12, rtol=0)
    (lm / sum(n_real) + model.config.commit_weight * commit / sum(n_real)).backward()
    torch.testing.assert_close(model.attns[0].w_kvg.weight.grad, grad_batch, atol=1e-10, rtol=0)


def test_cpu_segments_carry_the_starts(monkeypatch):
    """A long padded prompt read in CPU segments (padding longer than a segment) is still exact."""
    model = make_model().eval()
    monkeypatch.setattr(type(model), "CPU_SEGMENT_TOKENS", 16)
    ids, rows, pads = padded_batch(2)
    with torch.no_grad():
        out = model(ids, left_pad=pads)
        for b, (p, row) in enumerate(zip(PADS, rows)):
            torch.testing.assert_close(out.logits[b, p:], model(row[None]).logits[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("agg_cache,head_type", [(True, "shga"), (False, "shga"), (True, "mqa"), (True, "mha")])
def test_decoder_and_generate_with_left_padding(agg_cache, head_type):
    model = make_model(n_layer=2, agg_cache=agg_cache, head_type=head_type).eval()
    ids, rows, pads = padded_batch(3)
    with torch.no_grad():
        out = model(ids, left_pad=pads)
        dec = model.decoder(out.state)
        tokens = torch.randint(0, 50, (len(PADS), 12))
        steps = torch.stack([dec.step(tokens[:, i]) for i in range(12)], 1)  # (B, 12, V)
        ref = model(tokens, state=out.state).logits
        torch.testing.assert_close(steps, ref, atol=1e-10, rtol=0)
        assert torch.equal(dec.state().start, pads)
        gen = model.generate(ids, 15, temperature=0, left_pad=pads)
        for b, (p, row) in enumerate(zip(PADS, rows)):
            alone = model.generate(row[None], 15, temperature=0)
            assert torch.equal(gen[b, p:], alone[0])


@pytest.mark.parametrize("attn_impl", ["blockwise", "quadratic"])
def test_right_padding_keeps_real_logits_and_statistics(attn_impl):
    model = make_model(attn_impl=attn_impl).train()
    torch.manual_seed(4)
    lengths = [40, 25, 9]
    ids = torch.randint(0, 50, (3, 40))
    mask = torch.arange(40)[None] < torch.tensor(lengths)[:, None]
    out = model(ids, token_mask=mask)
    stats = model.codebook_stats().clone()
    for q in model._quantizers():
        q.clear_stats()
    commit = 0.0
    for b, n in enumerate(lengths):
        alone = model(ids[b: b + 1, :n])
        torch.testing.assert_close(out.logits[b, :n], alone.logits[0], atol=1e-10, rtol=0)
        commit = commit + alone.commit_loss * n
    torch.testing.assert_close(model.codebook_stats(), stats, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.commit_loss, commit / sum(lengths), atol=1e-12, rtol=0)


def test_left_pad_checks():
    model = make_model().eval()
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        state = model(ids).state
        assert state.start is None
        assert model(ids, left_pad=torch.zeros(2, dtype=torch.long)).state.start is None  # nothing padded
        with pytest.raises(ValueError, match="without a state"):
            model(ids, state=state, left_pad=torch.tensor([1, 0]))
        with pytest.raises(ValueError, match="shape"):
            model(ids, left_pad=torch.tensor([1, 0, 0]))
        with pytest.raises(ValueError, match=">= 0"):
            model(ids, left_pad=torch.tensor([-1, 0]))
        state.start = torch.tensor([1.0, 0.0])
        with pytest.raises(ValueError, match="state.start"):
            model(ids, state=state)


def test_left_padding_in_the_chunked_cache_read(monkeypatch):
    """The cache read off a CPU (chunks of blocks from one scatter and a cumsum), forced here on the CPU:
    the same rows-alone equality, forward and gradients."""
    import tvq.ops.cache as cache

    monkeypatch.setattr(cache, "_read_running", lambda *a: cache._read_chunked(*a, 3))
    monkeypatch.setattr(cache, "_grad_running", lambda *a: cache._grad_chunked(*a, 3))
    model = make_model().train()
    ids, rows, pads = padded_batch(5)
    out = model(ids, left_pad=pads)
    out.logits[1, PADS[1]:].sum().backward()
    grad = model.attns[0].w_kvg.weight.grad.clone()
    model.zero_grad()
    for b, (p, row) in enumerate(zip(PADS, rows)):
        alone = model(row[None])
        torch.testing.assert_close(out.logits[b, p:], alone.logits[0], atol=1e-10, rtol=0)
        if b == 1:
            alone.logits[0].sum().backward()
            torch.testing.assert_close(model.attns[0].w_kvg.weight.grad, grad, atol=1e-10, rtol=0)
