"""A training step compiles as one graph (``torch.compile(fullgraph=True)``) with padding and every codebook
tool on, and computes what the eager step computes (issue 24, item 3)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model

TOOLS = {"random": {}, "kmeans+revive": dict(codebook_init="kmeans", codebook_revive=0.5)}


def step(net, model, ids, left_pad, mask):
    """Two chunks (the second continues the first's state), backward, then the codebook update."""
    out1 = net(ids[:, :16], labels=ids[:, 1:17], left_pad=left_pad, token_mask=mask[:, :16])
    out2 = net(ids[:, 16:-1], state=out1.state, labels=ids[:, 17:], token_mask=mask[:, 16:])
    (out1.loss + out2.loss).backward()
    stats = model.codebook_stats().clone()
    metrics = dict(model.update_codebooks())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.state_dict().items() if "quantizer" in n}
    return out2.logits.detach(), stats, metrics, grads, buffers


@pytest.mark.parametrize("tools", TOOLS)
def test_training_step_compiles_fullgraph_and_matches_eager(tools):
    ids = torch.randint(0, 50, (2, 33), generator=torch.Generator().manual_seed(0))
    left_pad = torch.tensor([0, 5])
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[0, 20:23] = False
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = make_model(n_layer=1, **TOOLS[tools]).train()  # float64, block_len 4
        torch._dynamo.reset()
        net = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        runs.append(step(net, model, ids, left_pad, mask))
    (logits_e, stats_e, metrics_e, grads_e, buf_e), (logits_c, stats_c, metrics_c, grads_c, buf_c) = runs
    torch.testing.assert_close(logits_c, logits_e, atol=1e-10, rtol=0)
    torch.testing.assert_close(stats_c, stats_e, atol=1e-10, rtol=0)
    assert stats_e.abs().sum() > 0 and metrics_c == pytest.approx(metrics_e, rel=1e-9)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 8
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-10, rtol=0, msg=name)
    for name in buf_e:
        torch.testing.assert_close(buf_c[name], buf_e[name], atol=1e-10, rtol=0, msg=name)
    if tools != "random":  # the first update ran k-means on the keys the compiled forwards kept
        pending = [b for n, b in buf_c.items() if n.endswith("kmeans_pending")]
        assert pending and not any(bool(b) for b in pending)
