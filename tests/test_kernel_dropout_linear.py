"""The dropout-then-linear kernel (tvq.ops.kernels.dropout_linear) behind the relative position embeddings: equal to
``F.linear`` of the table times the residual kernel's mask for the same seed (the stream it shares), outputs and the
weight's gradient (the mask drawn again in backward), float32 and float16, several tiles each way; the attention
sublayer takes it in training with sinusoid dropout; registrations and refusals. On a CPU through Triton's
interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("triton")

from tvq.ops.kernels import dropout_linear as kdl  # noqa: E402
from tvq.ops.kernels import use_kernels  # noqa: E402
from tvq.ops.kernels.residual import residual_dropout  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def mask_of(shape, p, seed):
    """The residual kernel's multipliers (0 or 1 / (1 - p)) for a tensor of ``shape``: x + ones * mask, x = 0."""
    with use_kernels(True):
        return residual_dropout(torch.zeros(shape), torch.ones(shape), p, 0.0, seed)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_equals_linear_of_the_masked_table(monkeypatch, dtype, tol, p):
    monkeypatch.setattr(kdl, "TILES", {"rows": 16, "cols": 16, "inner": 16})  # several tiles each way
    R, D, N, seed = 37, 42, 24, 77
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(R, D, generator=gen).to(dtype)
    w = torch.randn(N, D, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(R, N, generator=gen).to(dtype)
    mask = mask_of((R, D), p, seed)
    assert 0 < (mask == 0).sum() < mask.numel()
    w_ref = w.detach().double().requires_grad_()
    want = F.linear((x.float() * mask).to(dtype).double(), w_ref)
    (want_gw,) = torch.autograd.grad(want, w_ref, g.double())
    with use_kernels(True):
        got = kdl.dropout_linear_kernel(x, w, p, seed)
    (got_gw,) = torch.autograd.grad(got, w, g)
    assert got.dtype == dtype and got_gw.dtype == dtype
    for a, b in ((got, want), (got_gw, want_gw)):
        assert ((a.double() - b).norm() / b.norm()).item() < tol
    with use_kernels(True):  # the same seed, the same draws; another seed, another mask
        assert torch.equal(kdl.dropout_linear_kernel(x, w.detach(), p, seed), got.detach())
        assert not torch.equal(kdl.dropout_linear_kernel(x, w.detach(), p, seed + 1), got.detach())
        # a cast weight (no gradient) with its float32 master: the same output, the gradient the master's, in float32
        master = w.detach().float().requires_grad_()
        got_m = kdl.dropout_linear_kernel(x, w.detach(), p, seed, master=master)
    (got_mw,) = torch.autograd.grad(got_m, master, g)
    assert torch.equal(got_m, got.detach()) and got_mw.dtype == torch.float32
    assert ((got_mw.double() - want_gw).norm() / want_gw.norm()).item() < tol


def test_the_attention_sublayer_takes_it_in_training(monkeypatch):
    """With sinusoid dropout in training the relative embeddings come from the kernel (on the Triton path), whose
    weight gradient reaches w_r; in eval the table is not dropped (the plain GEMM)."""
    from tvq import TransformerVQ, TransformerVQConfig

    cfg = TransformerVQConfig(vocab_size=64, d_model=32, d_k=8, d_v=32, n_head=1, n_layer=1, n_code=8, block_len=8,
                              mem_len=8, dropout_sin=0.3)
    model = TransformerVQ(cfg).train()
    calls = []
    real = kdl.dropout_linear_kernel
    monkeypatch.setattr(kdl, "dropout_linear_kernel", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with use_kernels(True):
        model(ids, labels=ids).loss.backward()
    attn = model.attns[0]
    assert calls and attn.w_r.weight.grad is not None and attn.w_r.weight.grad.abs().sum() > 0
    calls.clear()
    model.eval()
    with use_kernels(True), torch.no_grad():
        model(ids)
    assert not calls


def test_registrations_and_refusals():
    x, w = torch.randn(9, 20), torch.randn(5, 20)
    torch.library.opcheck(kdl.dropout_linear.op, (x, w, 0.2, 3))
    torch.library.opcheck(kdl.dropout_linear_grad_weight.op, (torch.randn(9, 5), x, 0.2, 3, torch.float32))
    with pytest.raises(ValueError, match="no gradient"):
        kdl.dropout_linear_kernel(x.requires_grad_(), w, 0.2)
    with pytest.raises(ValueError, match="p must be"):
        kdl.dropout_linear_kernel(x.detach(), w, 0.0)
    with pytest.raises(ValueError, match="one dtype"):
        kdl.dropout_linear_kernel(x.detach(), w.double(), 0.2)
    with pytest.raises(ValueError, match="master"):
        kdl.dropout_linear_kernel(x.detach(), w, 0.2, master=torch.randn(4, 20))
    with pytest.raises(ValueError, match="master"):
        kdl.dropout_linear_kernel(x.detach(), w.requires_grad_(), 0.2, master=torch.randn(5, 20))
