"""The decode step as one in-place, capturable function (issue 24, item 4)."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import tvq.models.decoding as decoding
from conftest import make_model


def _traced_graph(step_, warmup: int = 2):
    """A CPU stand-in for :func:`decoding._cuda_graph` with its contract: ``warmup`` runs, then the step frozen
    into a fixed list of aten ops on fixed tensors (make_fx bakes every Python value in, as a CUDA graph
    does), whose replay rewrites one static logits tensor."""
    for _ in range(warmup):
        step_()
    graph = make_fx(lambda: step_())()
    logits = step_()  # capture runs the ops here (a CUDA graph's does not): the decoder restores the state

    def replay():
        return logits.copy_(graph())

    replay.captures = 1
    return replay


@pytest.fixture
def stand_in(monkeypatch):
    """cuda_graph=True on a CPU, captured by :func:`_traced_graph`; yields the list of captures."""
    captured = []

    def graph(step_):
        captured.append(step_)
        return _traced_graph(step_)

    monkeypatch.setattr(decoding, "_GRAPH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(decoding, "_cuda_graph", graph)
    return captured


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
    prompt = torch.randint(0, 50, (1, 3))
    state = model(prompt).state
    assert model.decoder(state)._replay is None  # the default off CUDA: no graph
    with pytest.raises(ValueError, match="CUDA"):
        model.decoder(state, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA"):
        model.generate(prompt, 3, cuda_graph=True)
    with pytest.raises(ValueError, match="attention='vq'"):
        make_model(attention="full").generate(prompt, 3, cuda_graph=True)


@pytest.mark.parametrize("agg_cache", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_replayed_graph_decodes_like_eager(stand_in, agg_cache, dtype):
    """The captured step, replayed with nothing but the token buffer changed, decodes exactly as the eager
    step does, past pos = M and around the ring, with left padding; capture leaves the state as it was."""
    model = make_model(agg_cache=agg_cache, mem_len=6).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 24))
    state = model(ids[:, :4], left_pad=torch.tensor([0, 2])).state
    eager = model.decoder(state, dtype=dtype, cuda_graph=False)
    graph = model.decoder(state, dtype=dtype, cuda_graph=True)
    assert len(stand_in) == 1 and eager._replay is None and graph._replay is not None
    for x, y in zip(graph.buffers(), eager.buffers()):
        assert torch.equal(x, y)
    a = torch.stack([eager.step(ids[:, t]) for t in range(4, 24)], 1)
    b = torch.stack([graph.step(ids[:, t]) for t in range(4, 24)], 1)
    torch.testing.assert_close(b, a, atol=0, rtol=0)
    for x, y in zip(graph.state().layers[0]._tensors(), eager.state().layers[0]._tensors()):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert graph.step(ids[:, :1]).data_ptr() != graph._replay().data_ptr()  # a copy of the static logits
    with pytest.raises(ValueError, match="shape"):
        graph.step(ids[:1, 0])


def test_reordering_rows_keeps_the_graph(stand_in):
    """select_rows_ (a beam search's reordering) rewrites the buffers in place: same addresses, the graph
    still valid, the same logits as a decoder made from the reordered state."""
    model = make_model(agg_cache=True, mem_len=6).eval()
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (3, 20))
    dec = model.decoder(model(ids[:, :3], left_pad=torch.tensor([0, 1, 2])).state, cuda_graph=True)
    for t in range(3, 10):
        dec.step(ids[:, t])
    ptrs = [b.data_ptr() for b in dec.buffers()]
    rows = torch.tensor([2, 2, 0])
    ref = model.decoder(_select(dec.state(), rows))
    dec.select_rows_(rows)
    assert [b.data_ptr() for b in dec.buffers()] == ptrs
    a = torch.stack([ref.step(ids[:, t]) for t in range(10, 20)], 1)
    b = torch.stack([dec.step(ids[:, t]) for t in range(10, 20)], 1)
    torch.testing.assert_close(b, a, atol=0, rtol=0)
    with pytest.raises(ValueError, match="batch size"):
        dec.select_rows_(torch.tensor([0, 1]))


def _select(state, rows):
    from tvq.state import LayerState, TransformerVQState

    return TransformerVQState([LayerState(*(t.index_select(0, rows) for t in layer._tensors()))
                               for layer in state.layers], state.pos, state.start.index_select(0, rows))


def test_generate_uses_the_graph(stand_in):
    model = make_model(agg_cache=True, mem_len=6).eval()
    prompt = torch.randint(0, 50, (2, 5))
    graph = model.generate(prompt, 20, top_k=5, seed=3, cuda_graph=True)
    assert len(stand_in) == 1
    assert torch.equal(graph, model.generate(prompt, 20, top_k=5, seed=3, cuda_graph=False))
    assert torch.equal(graph, model.generate(prompt, 20, top_k=5, seed=3))  # the default: a graph on CUDA only
    assert len(stand_in) == 1 and not decoding.default_cuda_graph(torch.device("cpu"))


def test_hf_generate_uses_the_graph(stand_in):
    """Hugging Face generate: greedy and beam search through the captured step, one capture per call
    (beam reorderings keep the graph), the same tokens as without it."""
    pytest.importorskip("transformers")
    from tvq.hf import TransformerVQForCausalLM, TransformerVQHFConfig

    core = make_model(agg_cache=True, mem_len=6)
    model = TransformerVQForCausalLM(TransformerVQHFConfig.from_tvq(core.config)).double()
    model.model.load_state_dict(core.state_dict())
    model.eval()
    prompt = torch.randint(1, 50, (1, 9))
    with torch.no_grad():
        for kwargs in (dict(do_sample=False), dict(num_beams=3, do_sample=False)):
            stand_in.clear()
            a = model.generate(prompt, max_new_tokens=12, cuda_graph=True, **kwargs)
            assert len(stand_in) == 1, kwargs
            assert torch.equal(a, model.generate(prompt, max_new_tokens=12, cuda_graph=False, **kwargs))


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


def test_compiled_step_writes_rows_in_place():
    """torch.compile of the whole step (state write included, bf16 with float32 means): no generated kernel
    copies a key or value buffer (a write into a slice of one makes inductor copy all of it), and the same
    step as eager (up to bf16 rounding: inductor keeps intermediates in float32)."""
    import re

    from torch._inductor.utils import run_and_get_code

    model = make_model(dtype=torch.float32, agg_cache=True, mem_len=64, n_code=64).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (1, 80))
    state = model(ids[:, :70]).state
    dec, ref = model.decoder(state, dtype=torch.bfloat16), model.decoder(state, dtype=torch.bfloat16)
    args = (decoding._model_step, dec._dims, dec._weights, dec.keys, dec.values, dec.means, dec.codes, dec.count,
            dec.log_count, dec._tokens, dec._pos, dec.start)
    dec._tokens.copy_(ids[:, 70])
    with torch.no_grad():
        logits, (code, *_) = run_and_get_code(torch.compile(decoding._decode_step_, fullgraph=True), *args)
    loops = [int(n) for n in re.findall(r"x\d+<static_cast<int64_t>\((\d+)L\)", code)]
    assert loops and max(loops) < min(dec.keys[0].numel(), dec.values[0].numel())
    torch.testing.assert_close(logits, ref.step(ids[:, 70]), atol=1e-2, rtol=0)
    for x, y in zip(dec.buffers(), ref.buffers()):
        torch.testing.assert_close(x, y, atol=1e-2, rtol=1e-2)


def test_hf_cuda_graph_needs_cuda():
    pytest.importorskip("transformers")
    from tvq.hf import TransformerVQForCausalLM, TransformerVQHFConfig

    model = TransformerVQForCausalLM(TransformerVQHFConfig.from_tvq(make_model().config)).eval()
    with pytest.raises(ValueError, match="CUDA"), torch.no_grad():
        model.generate(torch.randint(1, 50, (1, 5)), max_new_tokens=4, cuda_graph=True)
