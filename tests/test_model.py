"""The model's contract: dtypes, modes, state, checkpoints across block lengths, generation."""

import pytest
import torch

from tvq import TransformerVQ, TransformerVQState
from tvq.sampling import sample_next
from conftest import make_model, tiny_config


def test_contract_example_shapes():
    model = make_model(dtype=torch.float32)
    ids = torch.randint(0, 50, (3, 17))
    out = model(ids)
    assert out.logits.shape == (3, 17, 50) and out.logits.dtype == torch.float32
    out2 = model(ids[:, :5], state=out.state)
    assert out2.state.pos == 22


def test_double_runs_in_float64(ids):
    model = make_model(dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in [*model.parameters(), *model.buffers()])
    out = model(ids)
    assert out.logits.dtype == torch.float64
    for layer in out.state.layers:
        assert layer.keys.dtype == layer.values.dtype == layer.cache_mean.dtype == torch.float64


def test_state_shapes_and_detach(ids):
    cfg = tiny_config()
    model = make_model().train()
    state = model(ids).state
    assert len(state.layers) == 2 * cfg.n_layer
    layer = state.layers[0]
    B, H, M = 2, cfg.n_head, cfg.mem_len
    assert layer.keys.shape == (B, H, M, cfg.d_k) and layer.values.shape == (B, H, M, cfg.d_v)
    assert layer.codes.shape == (B, H, M) and layer.codes.dtype == torch.long
    assert layer.cache_count.shape == (B, H, cfg.n_code) and layer.cache_mean.shape == (B, H, cfg.n_code, cfg.d_v)
    assert layer.values.requires_grad
    detached = state.detach()
    assert not any(t.requires_grad for lay in detached.layers for t in lay._tensors() if t is not None)


@pytest.mark.parametrize("attention", ["vq", "full"])
def test_initial_state_is_zeros_in_disjoint_views(attention):
    """The model's empty state (one zero fill per dtype) has each sublayer's own shapes and dtypes, and writing
    one tensor in place (as the decoder does) leaves every other as it was."""
    model = make_model(attention=attention)
    state = model.initial_state(3)
    tensors = [t for layer in state.layers for t in layer._tensors() if t is not None]
    for layer, attn in zip(state.layers, model.attns):
        own = attn.initial_state(3, model.compute_dtype(), "cpu")
        for got, want in zip(layer._tensors(), own._tensors()):
            assert (got is None and want is None) or (got.dtype == want.dtype and torch.equal(got, want))
    for t in tensors:
        t.fill_(1)
        assert sum(int(u.count_nonzero()) for u in tensors) == t.numel()
        t.zero_()


def test_state_dict_loads_across_block_len(ids):
    a = make_model(block_len=4).eval()
    b = TransformerVQ(a.config.replace(block_len=32)).double().eval()
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=1e-10, rtol=0)


def test_eval_disables_dropout_and_train_enables_it(ids):
    model = make_model(dropout_emb=0.1, dropout_sin=0.2, dropout_res=0.3, layerdrop=0.3).eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)
    model.train()
    assert (model(ids).logits - model(ids).logits).abs().max() > 0


def test_loss_is_cross_entropy_plus_commitment(ids):
    model = make_model().eval()
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    out = model(ids, labels=labels)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, :-1].flatten())
    torch.testing.assert_close(out.lm_loss, ce)
    torch.testing.assert_close(out.loss, ce + model.config.commit_weight * out.commit_loss)
    assert out.commit_loss > 0


def test_tied_embeddings_final_norm_and_logit_scale(ids):
    model = make_model(tie_embeddings=True, final_norm=True, logit_scale=0.005)
    assert model.lm_head is None and model.norm_f is not None
    logits = model(ids).logits
    assert logits.abs().max() < 1.0  # 0.005 * (normed h . N(0,1) embedding) stays small
    params = sum(p.numel() for p in model.parameters())
    untied = make_model()
    assert params < untied.num_parameters()


def test_generate_shapes_seed_and_mode():
    model = make_model(dtype=torch.float32).train()
    prompt = torch.randint(0, 50, (2, 5))
    a = model.generate(prompt, 12, temperature=1.0, top_p=0.9, seed=3)
    b = model.generate(prompt, 12, temperature=1.0, top_p=0.9, seed=3)
    assert a.shape == (2, 17) and torch.equal(a, b) and torch.equal(a[:, :5], prompt)
    assert model.training  # restored
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_generate_passes_compile_to_the_decoder(monkeypatch):
    model = make_model(dtype=torch.float32).eval()
    seen, decoder = [], model.decoder
    monkeypatch.setattr(model, "decoder",
                        lambda state, compile=False, **kw: seen.append(compile) or decoder(state, **kw))
    prompt = torch.randint(0, 50, (1, 4))
    assert torch.equal(model.generate(prompt, 5, seed=1, compile=True), model.generate(prompt, 5, seed=1))
    assert seen == [True, False]


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(top_k=1), dict(top_p=1e-6)])
def test_greedy_generation_matches_full_forward(kwargs):
    model = make_model().eval()
    prompt = torch.randint(0, 50, (2, 9))
    seq = model.generate(prompt, 30, seed=0, **kwargs)
    logits = model(seq).logits
    assert torch.equal(seq[:, 9:], logits[:, 8:-1].argmax(-1))


def test_generation_state_has_constant_size():
    model = make_model().eval()
    state = model(torch.randint(0, 50, (1, 3))).state
    sizes = [sum(t.numel() for lay in state.layers for t in lay._tensors())]
    for _ in range(40):
        state = model(torch.randint(0, 50, (1, 1)), state=state).state
        sizes.append(sum(t.numel() for lay in state.layers for t in lay._tensors()))
    assert len(set(sizes)) == 1


def test_nucleus_sampling_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)
    gen = torch.Generator().manual_seed(0)
    tokens = sample_next(logits, 1.0, None, 0.8, gen)
    assert set(tokens.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    tokens = sample_next(logits, 1.0, 3, None, gen)
    assert set(tokens.tolist()) == {0, 1, 2}


def test_state_to_moves_floats_only(ids):
    state = make_model().eval()(ids).state
    moved = state.to(dtype=torch.bfloat16)
    assert isinstance(moved, TransformerVQState)
    layer = moved.layers[0]
    assert layer.keys.dtype == layer.values.dtype == torch.bfloat16 and layer.codes.dtype == torch.long
    assert layer.cache_count.dtype == layer.cache_mean.dtype == torch.float32  # never narrower than float32


@pytest.mark.parametrize("agg_cache", [True, False])
@pytest.mark.parametrize("batch,n_head", [(1, 1), (2, 2)])  # one row and head: a row-vector product
def test_decoder_steps_equal_forward(agg_cache, batch, n_head):
    """VQDecoder (ring buffers, in-place cache) == the blockwise forward, before and after pos = M."""
    model = make_model(agg_cache=agg_cache, mem_len=6, n_head=n_head).eval()
    torch.manual_seed(4)
    ids = torch.randint(0, 50, (batch, 40))
    full = model(ids).logits
    prefix = model(ids[:, :3])
    decoder = model.decoder(prefix.state)
    steps = [decoder.step(ids[:, t]) for t in range(3, 40)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 3:], atol=1e-10, rtol=0)
    back = decoder.state()
    again = model(ids[:, :40], state=None).state
    for a, b in zip(back.layers, again.layers):
        for x, y in zip(a._tensors(), b._tensors()):
            torch.testing.assert_close(x, y, atol=1e-10, rtol=0)


def test_blockwise_training_forward_compiles_without_graph_breaks():
    model = make_model(dtype=torch.float32).train()
    ids = torch.randint(0, 50, (2, 41))
    explanation = torch._dynamo.explain(model)(ids[:, :-1], labels=ids[:, 1:])
    assert explanation.graph_break_count == 0, [str(b.reason)[:120] for b in explanation.break_reasons]


def test_cpu_allocator_tuning_is_opt_out(monkeypatch):
    from tvq.runtime import tune_cpu_allocator

    monkeypatch.setenv("TVQ_KEEP_MALLOC", "1")
    assert tune_cpu_allocator() is False


def test_compiled_decoder_matches_eager():
    model = make_model(dtype=torch.float32, mem_len=5).eval()
    state = model(torch.randint(0, 50, (2, 3))).state
    eager, compiled = model.decoder(state), model.decoder(state, compile=True)
    tokens = torch.randint(0, 50, (2, 12))
    for t in range(12):  # crosses pos = M and wraps the ring
        torch.testing.assert_close(compiled.step(tokens[:, t]), eager.step(tokens[:, t]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["vq", "full"])
def test_grad_checkpoint_gives_the_same_step(attention):
    """Recomputing each GAU in backward: same loss, gradients and codebook statistics (gathered once,
    not again by the recomputation), with dropout and LayerDrop on (the same masks are drawn again)."""
    results = []
    for grad_checkpoint in (False, True):
        model = make_model(attention=attention, n_layer=2, dropout_emb=0.1, dropout_sin=0.1, dropout_res=0.1,
                           layerdrop=0.2, grad_checkpoint=grad_checkpoint).train()
        ids = torch.randint(0, 50, (2, 30), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads, model.codebook_stats(), out.state))
    (loss_a, grads_a, stats_a, state_a), (loss_b, grads_b, stats_b, state_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-12, rtol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-12, rtol=0, msg=name)
    torch.testing.assert_close(stats_b, stats_a, atol=0, rtol=0)
    if attention == "vq":
        assert stats_a.abs().sum() > 0
    for a, b in zip(state_a.layers, state_b.layers):
        for x, y in zip(a._tensors(), b._tensors()):
            torch.testing.assert_close(y, x, atol=1e-12, rtol=0)


def test_grad_checkpoint_compiles_and_counts_codes_once():
    """Under torch.compile the recomputation happens inside the graph: codebook statistics and
    gradients still match an eager step without checkpointing (float32)."""
    results = []
    for grad_checkpoint, compile in ((False, False), (True, True)):
        model = make_model(dtype=torch.float32, n_layer=2, grad_checkpoint=grad_checkpoint).train()
        net = torch.compile(model) if compile else model
        ids = torch.randint(0, 50, (2, 41), generator=torch.Generator().manual_seed(0))
        net(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((model.codebook_stats(), grads))
    (stats_a, grads_a), (stats_b, grads_b) = results
    torch.testing.assert_close(stats_b, stats_a, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grads_b, grads_a, atol=1e-5, rtol=1e-4)


def test_compiled_inference_forward_matches_eager():
    """The float32 inference forward (oneDNN's projections and the cache ops behind ops of our own)
    compiles as one graph and gives the eager logits and state."""
    model = make_model(dtype=torch.float32, n_layer=2).eval()
    ids = torch.randint(0, 50, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(ids)
        assert explanation.graph_break_count == 0, [str(b.reason)[:120] for b in explanation.break_reasons]
        eager, compiled = model(ids), torch.compile(model)(ids)
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(eager.state.layers, compiled.state.layers):
        for x, y in zip(a._tensors(), b._tensors()):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
