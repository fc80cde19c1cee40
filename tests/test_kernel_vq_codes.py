"""The Triton nearest-codeword kernel (tvq.ops.kernels.vq_codes) against PyTorch's float64 distances and argmin:
several key and code tiles, key and code counts not tile multiples, strided and float16 keys, ties, the custom op's
registration. Without a GPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

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
    torch.library.opcheck(kvq.vq_codes, (k, codebook, codebook.square().sum(-1)),
                          test_utils=("test_schema", "test_faketensor"))
    assert KERNEL_FLOPS["tvq_kernels::vq_codes"](k, codebook, None) == ("float32", 2 * 2 * 2 * 12 * 8 * 20)
