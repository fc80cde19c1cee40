"""The learned per-head offset of the cache scores (``cache_bias``, not in the paper): every attention
path adds it the same way (float64, outputs and gradients), and it is off by default."""

import pytest
import torch

from conftest import decoded, make_model, tiny_config
from test_equivalence import ATOL, assert_blockwise_equals_quadratic


def biased(**overrides):
    model = make_model(cache_bias=True, cache_bias_init=-1.5, **overrides)
    with torch.no_grad():  # a different offset per head and GAU
        for i, gau in enumerate(model.attns):
            gau.cache_bias.copy_(torch.linspace(-2.0, 1.0, gau.cache_bias.numel(), dtype=torch.float64) + i)
    return model


def test_off_by_default_and_validated():
    assert not tiny_config().cache_bias
    assert all(gau.cache_bias is None for gau in make_model().attns)
    assert all(gau.cache_bias is None for gau in make_model(attention="full", cache_bias=True).attns)
    # no cache, no offset: a window-only model keeps the paper's parameters (and no unused one under DDP)
    window_only = make_model(agg_cache=False, cache_bias=True, head_type="mqa")
    assert all(gau.cache_bias is None for gau in window_only.attns)
    assert window_only.num_parameters() == make_model(agg_cache=False, head_type="mqa").num_parameters()
    with pytest.raises(ValueError, match="cache_bias_init"):
        tiny_config(cache_bias=True, cache_bias_init=float("nan"))
    with pytest.raises(ValueError, match="cache_bias"):
        tiny_config(cache_bias=1)


def test_initialised_to_cache_bias_init_and_zero_is_the_paper(ids):
    model = make_model(cache_bias=True, cache_bias_init=-3.0)
    assert all((gau.cache_bias == -3.0).all() for gau in model.attns)
    zero = make_model(cache_bias=True).eval()
    plain = make_model().eval()
    torch.testing.assert_close(zero(ids).logits, plain(ids).logits, atol=0, rtol=0)
    far = model.eval()(ids).logits
    assert (far - plain(ids).logits).abs().max() > 1e-4  # the offset matters


@pytest.mark.parametrize("T", [7, 63, 200])
@pytest.mark.parametrize("block_len,mem_len", [(4, 8), (16, 5)])
@pytest.mark.parametrize("grad_thru_cache", [True, False])
@pytest.mark.parametrize("head_type,straight_through", [("shga", "window"), ("shga", "block"), ("mqa", "window")])
def test_blockwise_equals_quadratic(T, block_len, mem_len, grad_thru_cache, head_type, straight_through):
    model = biased(block_len=block_len, mem_len=mem_len, grad_thru_cache=grad_thru_cache, head_type=head_type,
                   straight_through=straight_through).train()
    torch.manual_seed(T)
    ga = assert_blockwise_equals_quadratic(model, torch.randint(0, 50, (2, T)))
    if T > mem_len:  # the offset learns once keys are in the cache
        assert all(ga[f"attns.{i}.cache_bias"].abs().max() > 1e-8 for i in range(len(model.attns)))


@pytest.mark.parametrize("head_type", ["shga", "mha", "mqa"])
def test_decoder_equals_forward(ids, head_type):
    model = biased(head_type=head_type).eval()
    ids = ids[:, :60]
    full = model(ids).logits
    torch.testing.assert_close(decoded(model, ids, 5), full[:, 5:], atol=ATOL, rtol=0)


def test_checkpoint_round_trip(ids):
    model = biased()
    other = make_model(seed=3, cache_bias=True)
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other.eval()(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)
