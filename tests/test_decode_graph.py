"""The decode step as one in-place, capturable function (issue 24, item 4)."""

import pytest
import torch

from conftest import make_model


@pytest.mark.parametrize("agg_cache", [False, True])
def test_decode_step_keeps_static_buffers(agg_cache):
    """Every step writes the same buffers in place (fixed addresses, as a CUDA graph needs) and the
    position advances as a tensor, with the logits still equal to the blockwise forward."""
    model = make_model(agg_cache=agg_cache, mem_len=6).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 20))
    full = model(ids).logits
    dec = model.decoder(model(ids[:, :3]).state)
    bufs = (dec.keys, dec.values, dec.codes, dec.count, dec.log_count, dec._pos)
    ptrs = [b.data_ptr() for b in bufs]
    steps = [dec.step(ids[:, t]) for t in range(3, 20)]
    assert [b.data_ptr() for b in bufs] == ptrs
    assert int(dec._pos) == dec.pos == 20
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 3:], atol=1e-10, rtol=0)


def test_cuda_graph_needs_cuda():
    model = make_model().eval()
    state = model(torch.randint(0, 50, (1, 3))).state
    with pytest.raises(ValueError, match="CUDA"):
        model.decoder(state, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_equals_eager():
    model = make_model(agg_cache=True, mem_len=6, dtype=torch.float32).cuda().eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 30), device="cuda")
    with torch.no_grad():
        state = model(ids[:, :3]).state
        eager, graph = model.decoder(state), model.decoder(state, cuda_graph=True)
        a = torch.stack([eager.step(ids[:, t]) for t in range(3, 30)], 1)
        b = torch.stack([graph.step(ids[:, t]) for t in range(3, 30)], 1)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
