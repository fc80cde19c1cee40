"""The cache warm-up (``cache_warmup``, not in the paper): for the first N optimizer steps of training the
attention ignores the cache exactly as ``agg_cache=False`` does, then uses it; the count is saved with the model."""

import pytest
import torch

from conftest import decoded, make_model, tiny_config
from test_equivalence import ATOL

HEAD_TYPES = ["shga", "mqa"]


def same_weights(model, **overrides):
    """An otherwise identical model (config changed), with ``model``'s weights and codebooks."""
    other = make_model(**overrides)
    other.load_state_dict(model.state_dict(), strict=False)  # strict=False: no warm-up count there
    return other


def test_off_by_default_and_validated():
    assert tiny_config().cache_warmup == 0
    assert all(not hasattr(gau, "warmup_steps") for gau in make_model().attns)  # no extra buffer: old checkpoints load
    assert "warmup_steps" not in "".join(make_model().state_dict())
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="cache_warmup"):
            tiny_config(cache_warmup=bad)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("attn_impl", ["blockwise", "quadratic"])
def test_window_only_during_warmup_then_the_cache(ids, head_type, attn_impl):
    model = make_model(cache_warmup=2, head_type=head_type, attn_impl=attn_impl)
    window = same_weights(model, agg_cache=False, head_type=head_type, attn_impl=attn_impl).eval()
    cached = same_weights(model, head_type=head_type, attn_impl=attn_impl).eval()
    want_window, want_cached = window(ids).logits, cached(ids).logits
    assert (want_window - want_cached).abs().max() > 1e-4  # the cache matters here
    # the same in eval and in train mode (no dropout here), and the state is built as with the cache
    torch.testing.assert_close(model.eval()(ids).logits, want_window, atol=ATOL, rtol=0)
    out = model.train()(ids)
    torch.testing.assert_close(out.logits, want_window, atol=ATOL, rtol=0)
    got, want = out.state.layers[0], cached(ids).state.layers[0]  # the first sublayer's input is the same
    torch.testing.assert_close(got.cache_count, want.cache_count, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.cache_mean, want.cache_mean, atol=ATOL, rtol=0)
    model.update_codebooks()
    model.eval().update_codebooks()  # eval mode: not a training step, not counted
    torch.testing.assert_close(model(ids).logits, same_weights(model, agg_cache=False, head_type=head_type,
                                                               attn_impl=attn_impl)(ids).logits, atol=ATOL, rtol=0)
    model.train().update_codebooks()
    assert all(int(gau.warmup_steps) == 2 for gau in model.attns)
    cached = same_weights(model, head_type=head_type, attn_impl=attn_impl).eval()
    torch.testing.assert_close(model.eval()(ids).logits, cached(ids).logits, atol=ATOL, rtol=0)


def test_count_survives_a_state_dict_round_trip(ids):
    model = make_model(cache_warmup=2).train()
    model.update_codebooks()
    model.update_codebooks()
    fresh = make_model(seed=3, cache_warmup=2)
    assert all(gau.uses_cache() is False for gau in fresh.attns)
    fresh.load_state_dict(model.state_dict())  # strict: the count is a saved buffer
    assert all(gau.uses_cache() for gau in fresh.attns)
    torch.testing.assert_close(fresh.eval()(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)
    # and back: loading a count of 0 re-enters the warm-up
    fresh.load_state_dict(make_model(cache_warmup=2).state_dict())
    assert all(gau.uses_cache() is False for gau in fresh.attns)


def test_decoder_follows_the_warmup(ids):
    model = make_model(cache_warmup=1).eval()
    ids = ids[:, :40]
    for _ in range(2):  # during the warm-up (window only), then after it (with the cache)
        full = model(ids).logits
        torch.testing.assert_close(decoded(model, ids, 5), full[:, 5:], atol=ATOL, rtol=0)
        model.train().update_codebooks()
        model.eval()


def test_compiles_fullgraph_and_switches_on(ids):
    """A compiled forward reads the host flag: one graph during the warm-up, one after (a recompile)."""
    model = make_model(n_layer=1, cache_warmup=1).eval()
    ids = ids[:, :32]
    torch._dynamo.reset()
    net = torch.compile(model, fullgraph=True, backend="aot_eager")
    outs = []
    for _ in range(2):
        with torch.no_grad():
            got, want = net(ids).logits, model(ids).logits
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        outs.append(got)
        model.train().update_codebooks()
        model.eval()
    assert (outs[0] - outs[1]).abs().max() > 1e-4
    torch._dynamo.reset()


def test_cache_bias_gets_a_zero_gradient_during_warmup(ids):
    """Under DDP every parameter must take part: the unused cache offset gets a zero gradient, not None."""
    model = make_model(cache_warmup=1, cache_bias=True, cache_bias_init=-1.0).train()
    model(ids[:, :40], labels=ids[:, 1:41]).loss.backward()
    assert all(gau.cache_bias.grad is not None and not gau.cache_bias.grad.any() for gau in model.attns)
    model.zero_grad(set_to_none=True)
    model.update_codebooks()
    model(ids[:, :40], labels=ids[:, 1:41]).loss.backward()
    assert any(gau.cache_bias.grad.any() for gau in model.attns)
