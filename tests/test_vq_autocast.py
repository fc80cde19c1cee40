"""Under CPU bf16 autocast the VQ codes equal the fp32 argmin (issue 24 item 2)."""
import torch

from tvq.layers.vq import VectorQuantizer


def test_codes_equal_fp32_argmin_under_autocast():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_head=2, n_code=64, d_k=16, decay=0.99).eval()
    k = torch.nn.functional.normalize(torch.randn(2, 2, 256, 16), dim=-1)
    c = vq.codebook().detach()
    ref = torch.cdist(k.transpose(0, 1).flatten(1, 2), c).argmin(-1)  # (H, B T) in fp32
    ref = ref.view(2, 2, 256).transpose(0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = vq(k).codes
    assert torch.equal(codes, ref)
