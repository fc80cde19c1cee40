"""The decoder in a compute dtype (issue 24, item 4): weights and buffers cast once, not per step."""

from dataclasses import fields

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_model


class _Casts(TorchDispatchMode):
    """Records the input of every dtype cast (aten._to_copy) and counts all ops."""

    def __init__(self):
        super().__init__()
        self.casts, self.ops = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func is torch.ops.aten._to_copy.default:
            self.casts.append(args[0])
        return func(*args, **(kwargs or {}))


def _storages(model, dec) -> set[int]:
    """Storages of the model's parameters and buffers and of the decoder's weights and state."""
    tensors = list(model.parameters()) + list(model.buffers()) + dec.buffers()
    w = dec._weights
    tensors += [w.embed, w.head_w] + [getattr(a, f.name) for a in w.attns for f in fields(a)]
    tensors += [t for m in w.mlps or () for t in (m.w_1, m.w_2)]
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def _decode(dec, ids, start):
    return torch.stack([dec.step(ids[:, t]) for t in range(start, ids.shape[1])], 1)


@pytest.mark.parametrize("agg_cache", [True, False])
@pytest.mark.parametrize("head_type", ["shga", "mha"])
def test_bf16_decoder_is_close_to_fp32_and_casts_no_weight(agg_cache, head_type):
    """A bf16 decoder of an fp32 model: logits close to the fp32 decoder's (past pos = M, ring wrapped),
    and a step casts only activation rows, never a weight or a state buffer."""
    model = make_model(dtype=torch.float32, agg_cache=agg_cache, mem_len=6, head_type=head_type).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 40))
    with torch.no_grad():
        state = model(ids[:, :3]).state
        ref, low = model.decoder(state), model.decoder(state, dtype=torch.bfloat16)
    assert low.keys.dtype == low.values.dtype == low._weights.attns[0].w_in.dtype == torch.bfloat16
    assert low.means.dtype == low.count.dtype == low.log_count.dtype == torch.float32
    a, b = _decode(ref, ids[:, :-1], 3), _decode(low, ids[:, :-1], 3)
    torch.testing.assert_close(b, a, atol=5e-2, rtol=0)
    torch.testing.assert_close(b.softmax(-1), a.softmax(-1), atol=5e-3, rtol=0)
    # the float32 means stay exact; their bf16 copy after the ring is their rounding
    M = model.config.mem_len
    torch.testing.assert_close(low.values[:, :, :, M:], low.means.to(torch.bfloat16), atol=0, rtol=0)

    storages = _storages(model, low)
    casts = _Casts()
    with casts:
        low.step(ids[:, -1])
    assert casts.casts and not [t.shape for t in casts.casts if t.untyped_storage().data_ptr() in storages]
    assert len(casts.casts) <= 8 * len(model.attns) + 2


def test_decoder_takes_the_autocast_dtype_and_ignores_autocast_in_steps():
    """Built under autocast, the decoder computes in its dtype; an autocast around a step changes nothing."""
    model = make_model(dtype=torch.float32, agg_cache=True, mem_len=6).eval()
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        state = model(ids[:, :3]).state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model.decoder(state)
        plain = model.decoder(state, dtype=torch.bfloat16)
    assert auto.dtype == torch.bfloat16 and model.decoder(state).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = _decode(auto, ids, 3)
    torch.testing.assert_close(a, _decode(plain, ids, 3), atol=0, rtol=0)
    assert a.dtype == torch.float32  # the head in float32, like the forward's


def test_bf16_decoder_state_round_trip():
    """state() gives the state back in the dtypes it came in; continuing it with the forward stays close to
    the fp32 decoder's continuation."""
    model = make_model(dtype=torch.float32, agg_cache=True, mem_len=6).eval()
    torch.manual_seed(2)
    ids = torch.randint(0, 50, (1, 30))
    with torch.no_grad():
        state = model(ids[:, :3]).state
        ref, low = model.decoder(state), model.decoder(state, dtype=torch.bfloat16)
        _decode(ref, ids[:, :20], 3), _decode(low, ids[:, :20], 3)
        a, b = ref.state(), low.state()
        for x, y in zip(a.layers[0]._tensors(), b.layers[0]._tensors()):
            assert x.dtype == y.dtype
        torch.testing.assert_close(b.layers[0].cache_count, a.layers[0].cache_count, atol=0, rtol=0)
        la = model(ids[:, 20:], state=a).logits
        lb = model(ids[:, 20:], state=b).logits
    torch.testing.assert_close(lb, la, atol=5e-2, rtol=0)


def test_decoder_dtype_must_be_floating():
    model = make_model().eval()
    state = model(torch.randint(0, 50, (1, 3))).state
    with pytest.raises(ValueError, match="floating"):
        model.decoder(state, dtype=torch.int32)
