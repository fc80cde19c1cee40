"""The Triton quantizer kernels (tvq.ops.kernels.vq_codes) against PyTorch in float64: the nearest codeword at
several key and code tiles, key and code counts not tile multiples, strided and float16 keys, ties; the whole quantizer
(straight-through key, error, key norms) forward and backward, alone and in the layer (commitment loss, codebook
statistics); the custom ops' registration. Without a GPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

import pytest
import torch

pytest.importorskip("triton")

from tvq.ops.kernels import KERNEL_FLOPS  # noqa: E402
from tvq.ops.kernels import vq_codes as kvq  # noqa: E402


def reference(k, codebook):
    """argmin_s ||k - c_s||^2 in float64."""
    d = (k.double()[..., None, :] - codebook.double()[None, :, None]).square().sum(-1)  # (B, H, T, S)
    return d.argmin(-1)


@pytest.mark.parametrize("B, H, T, S, Dk, tiles", [(2, 3, 20, 24, 8, None), (1, 2, 70, 70, 24, (16, 16)),
                                                    (2, 1, 33, 130, 40, (32, 64))])
def test_codes_match_the_float64_argmin(monkeypatch, B, H, T, S, Dk, tiles):
    if tiles:
        monkeypatch.setattr(kvq, "TILES", dict(zip(("keys", "codes"), tiles)))
    g = torch.Generator().manual_seed(T + S)
    codebook = torch.randn(H, S, Dk, generator=g)
    k = torch.randn(B, H, T, Dk, generator=g)
    assert torch.equal(kvq.vq_codes_kernel(k, codebook), reference(k, codebook))


def test_strided_and_float16_keys():
    g = torch.Generator().manual_seed(1)
    codebook = torch.randn(2, 40, 16, generator=g)
    k = torch.randn(3, 25, 2, 16, generator=g).transpose(1, 2)  # (B, H, T, D_k) as the layer's view
    assert torch.equal(kvq.vq_codes_kernel(k, codebook), reference(k, codebook))
    k16 = k.half()
    assert torch.equal(kvq.vq_codes_kernel(k16, codebook), reference(k16.float(), codebook))


def test_ties_go_to_the_lowest_code():
    """Copies of one codeword in two code tiles: every key's nearest is the first copy, as torch.argmin's."""
    codebook = torch.randn(1, 48, 8, generator=torch.Generator().manual_seed(2))
    codebook[0, 40] = codebook[0, 3]
    k = codebook[:, [3, 3, 40]][None] + 1e-3  # (1, 1, 3, 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kvq, "TILES", {"keys": 16, "codes": 16})
        assert kvq.vq_codes_kernel(k, codebook).tolist() == [[[3, 3, 3]]]


def test_bad_shapes_and_empty_input():
    with pytest.raises(ValueError, match="vq_codes_kernel"):
        kvq.vq_codes_kernel(torch.zeros(1, 2, 3, 4), torch.zeros(3, 5, 4))
    assert kvq.vq_codes_kernel(torch.zeros(1, 2, 0, 4), torch.zeros(2, 5, 4)).shape == (1, 2, 0)


def test_opcheck_and_flops():
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(2, 20, 8, generator=g)
    k = torch.randn(2, 2, 12, 8, generator=g)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(kvq.vq_codes.op, (k, codebook), test_utils=utils)
    torch.library.opcheck(kvq.vq_quantize.op, (k, codebook), test_utils=utils)
    torch.library.opcheck(kvq.vq_quantize.op, (k, codebook, True), test_utils=utils)
    codes = kvq.vq_codes(k, codebook)
    for dst, derr in ((torch.randn_like(k), torch.randn(2, 2, 12)), (None, torch.randn(2, 2, 12)),
                      (torch.randn_like(k), None)):
        torch.library.opcheck(kvq.vq_quantize_backward.op, (k, codebook, codes, dst, derr), test_utils=utils)
    torch.library.opcheck(kvq.vq_quantize_backward.op, (k, codebook, codes, None, None, torch.randn(()), 0.5),
                          test_utils=utils)
    flops = ("float32", 2 * 2 * 2 * 12 * 8 * 20)
    assert KERNEL_FLOPS["tvq_kernels::vq_codes"](k, codebook) == flops
    assert KERNEL_FLOPS["tvq_kernels::vq_quantize"](k, codebook) == flops


def quantize_reference(k, codebook):
    """(k_st, codes, err, k_sq) as the PyTorch path computes them: c_z in k's dtype, the error from that cast."""
    codes = reference(k, codebook)
    c_z = codebook.to(k.dtype)[torch.arange(k.shape[1])[None, :, None], codes]  # (B, H, T, D_k)
    k_st = c_z + (k - k.detach())
    return k_st, codes, (k - c_z).square().sum(-1), k.detach().square().sum(-1)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("B, H, T, S, Dk", [(2, 3, 20, 24, 8), (1, 2, 70, 40, 24)])
def test_quantize_forward_and_backward(dtype, tol, B, H, T, S, Dk):
    """Outputs and k's gradient (through the straight-through key and the error) against float64, for strided keys
    and with either gradient absent."""
    g = torch.Generator().manual_seed(B * T + S)
    codebook = torch.randn(H, S, Dk, generator=g)
    k0 = torch.randn(B, T, H, Dk, generator=g).to(dtype).transpose(1, 2)  # (B, H, T, D_k), strided like the layer's
    r, w = torch.randn(B, H, T, Dk, generator=g), torch.randn(B, H, T, generator=g)
    for use_st, use_err in ((True, True), (True, False), (False, True)):
        k = k0.detach().requires_grad_()
        k_st, codes, err, k_sq, none = kvq.quantize_kernel(k, codebook)
        assert none is None
        loss = (k_st.double() * r).sum() * use_st + (err.double() * w).sum() * use_err
        loss.backward()
        k64 = k0.double().detach().requires_grad_()
        ref = quantize_reference(k64, codebook.double())
        ((ref[0] * r).sum() * use_st + (ref[2] * w).sum() * use_err).backward()
        assert torch.equal(codes, ref[1])
        assert k_st.dtype == dtype and err.dtype == k_sq.dtype == torch.float32
        c_z64 = codebook.to(dtype).double()[torch.arange(H)[None, :, None], ref[1]]
        torch.testing.assert_close(k_st.double(), c_z64, rtol=0, atol=0)  # the codeword in k's dtype, exactly
        torch.testing.assert_close(err.double(), (k0.double() - c_z64).square().sum(-1), rtol=tol, atol=tol)
        torch.testing.assert_close(k_sq.double(), ref[3], rtol=tol, atol=tol)
        assert k.grad.dtype == dtype
        torch.testing.assert_close(k.grad.double(), k64.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("H, T", [(1, 19), (3, 19), (3, 70)])
def test_quantize_mean_error_and_its_gradient(monkeypatch, H, T):
    """quantize_kernel(mean=True)'s loss err.sum(1).mean() (summed by the launch's last program: with 30 programs
    over partial-sum tiles of 16, in two rounds) and k's gradient through it (the backward kernel reads the scalar
    gradient), alone and with the straight-through key's, against float64; the ticket counter is left at zero."""
    from tvq.ops.kernels.common import tickets

    monkeypatch.setattr(kvq, "TILES", {"keys": 16, "codes": 32})
    monkeypatch.setattr(kvq, "PARTS", 16)
    g = torch.Generator().manual_seed(5 + H)
    B, S, Dk = 2, 24, 8
    codebook = torch.randn(H, S, Dk, generator=g)
    k0 = torch.randn(B, T, H, Dk, generator=g).transpose(1, 2)  # (B, H, T, D_k), strided
    r = torch.randn(B, H, T, Dk, generator=g)
    for use_st in (False, True):
        k = k0.detach().requires_grad_()
        k_st, _, err, _, mean_err = kvq.quantize_kernel(k, codebook, mean=True)
        assert mean_err.shape == () and mean_err.dtype == torch.float32
        (3.0 * mean_err + (k_st * r).sum() * use_st).backward()
        k64 = k0.double().detach().requires_grad_()
        ref = quantize_reference(k64, codebook.double())
        ref_mean = ref[2].sum(1).mean()
        (3.0 * ref_mean + (ref[0] * r).sum() * use_st).backward()
        torch.testing.assert_close(mean_err.double(), ref_mean.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(k.grad.double(), k64.grad, rtol=1e-5, atol=1e-6)
        assert not tickets(k.device).any()


def test_quantizer_layer_kernels_equal_pytorch():
    """VectorQuantizer with the kernels on and off: codes, the straight-through key, the commitment loss (with and
    without a token mask), its gradient and the accumulated codebook statistics, in float32."""
    from tvq.layers.vq import VectorQuantizer
    from tvq.ops.kernels import use_kernels

    g = torch.Generator().manual_seed(4)
    k0 = torch.randn(2, 3, 17, 16, generator=g)
    mask = torch.rand(2, 17, generator=g) > 0.3
    for token_mask in (None, mask):
        out = {}
        for on in (False, True):
            torch.manual_seed(0)
            vq = VectorQuantizer(3, 24, 16, decay=0.99).train()
            k = k0.clone().requires_grad_()
            with use_kernels(on):
                q = vq(k, token_mask)
                (q.keys.sin().sum() + 3 * q.commit).backward()
            out[on] = q, k.grad, vq.pending_stats().clone()
        (q0, g0, s0), (q1, g1, s1) = out[False], out[True]
        assert torch.equal(q0.codes, q1.codes)
        torch.testing.assert_close(q1.keys, q0.keys, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(q1.commit, q0.commit, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-5)
