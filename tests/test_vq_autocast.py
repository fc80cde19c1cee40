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


def test_state_and_window_stay_in_the_compute_dtype_under_autocast():
    """Issue 24, item 2: under bf16 autocast the carried window is bf16 (an fp32 state would promote the window
    product to fp32) and the cache stays float32; a carried fp32 state is cast, not promoted; the step tracks
    the fp32 one to bf16 accuracy, forward and backward."""
    from conftest import make_model

    model = make_model(dtype=torch.float32, n_layer=2).train()
    ids = torch.randint(0, 50, (2, 41), generator=torch.Generator().manual_seed(0))
    want = model(ids[:, :-1], labels=ids[:, 1:])
    want.loss.backward()
    g_want = model.attns[0].w_kvg.weight.grad.clone()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(ids[:, :-1], labels=ids[:, 1:])
        again = model(ids[:, :8], state=want.state.detach())  # an fp32 state carried into autocast
    got.loss.backward()
    for state in (got.state, again.state):
        for layer in state.layers:
            assert layer.keys.dtype == layer.values.dtype == torch.bfloat16
            assert layer.cache_count.dtype == layer.cache_mean.dtype == torch.float32
    err = (got.logits.float() - want.logits).norm() / want.logits.norm()
    assert err < 0.05, err
    g_got = model.attns[0].w_kvg.weight.grad
    assert (g_got - g_want).norm() / g_want.norm() < 0.1
