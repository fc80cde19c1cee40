"""The official optimized code's model variants: head_type "mha" and "mqa" (attention + MLP layers).

Every path the shga model has is checked for them in float64: blockwise == quadratic (logits and all
gradients), chunks and single tokens with the state carried == one pass, the decoder == the forward.
"""

import pytest
import torch

from tvq import TransformerVQ, TransformerVQConfig
from conftest import clone_with, make_model, sample_text, tiny_config

ATOL = 1e-10
HEAD_TYPES = ["mha", "mqa"]


def logits_and_grads(model, ids, splits):
    model.zero_grad(set_to_none=True)
    state, logits, loss = None, [], 0.0
    for chunk in ids.split(splits, 1):  # the state carried in the graph
        out = model(chunk, state=state, labels=chunk.roll(-1, 1))
        state, logits, loss = out.state, logits + [out.logits], loss + out.loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits, 1).detach(), grads


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_structure(head_type):
    """d_model / d_k query heads of width d_k, one (mqa) or as many (mha) key/value heads and codebooks,
    an MLP of 4 (mha) or 5 (mqa) d_model after each attention sublayer, no biases, no gate."""
    cfg = tiny_config(head_type=head_type, d_model=16, d_k=4, n_layer=2)
    model = TransformerVQ(cfg)
    Hkv = 4 if head_type == "mha" else 1
    assert (cfg.n_q_head, cfg.n_kv_head, cfg.head_d_v, cfg.n_attn) == (4, Hkv, 4, 2)
    assert len(model.attns) == len(model.mlps) == 2
    attn, mlp = model.attns[0], model.mlps[0]
    assert attn.w_q.weight.shape == (16, 16) and attn.w_kvg.weight.shape == (2 * Hkv * 4, 16)
    assert attn.w_o.weight.shape == (16, 16) and attn.w_r.weight.shape == (Hkv * 4, 16)
    assert attn.quantizer.c_sum.shape == (Hkv, cfg.n_code, 4)
    assert mlp.w_1.weight.shape == ({"mha": 4, "mqa": 5}[head_type] * 16, 16)
    assert cfg.replace(d_ff=24).ff_width == 24
    assert not any(n.endswith("bias") for n, _ in [*attn.named_parameters(), *mlp.named_parameters()])
    assert TransformerVQ(tiny_config()).mlps is None  # shga: unchanged


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("straight_through", ["window", "block"])
@pytest.mark.parametrize("agg_cache,grad_thru_cache", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("block_len,mem_len", [(4, 8), (8, 5)])
def test_blockwise_equals_quadratic(head_type, straight_through, agg_cache, grad_thru_cache, block_len, mem_len):
    model = make_model(head_type=head_type, straight_through=straight_through, agg_cache=agg_cache,
                       grad_thru_cache=grad_thru_cache, block_len=block_len, mem_len=mem_len).train()
    ref = clone_with(model, attn_impl="quadratic")
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (2, 41))
    la, ga = logits_and_grads(model, ids, [17, 24])
    lb, gb = logits_and_grads(ref, ids, [17, 24])
    torch.testing.assert_close(la, lb, atol=ATOL, rtol=0)
    assert ga.keys() == gb.keys() and any("mlps" in n for n in ga)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("attention", ["vq", "full"])
def test_chunks_and_single_tokens_equal_one_pass(ids, head_type, attention):
    model = make_model(head_type=head_type, attention=attention).eval()
    ids = ids[:, :70]
    full = model(ids).logits
    for splits in ([1, 5, 2, 31, 8, 23], [1] * 70):
        state, parts = None, []
        for chunk in ids.split(splits, 1):
            out = model(chunk, state=state)
            state, parts = out.state, parts + [out.logits]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("agg_cache", [True, False])
def test_decoder_equals_forward(ids, head_type, agg_cache):
    model = make_model(head_type=head_type, agg_cache=agg_cache).eval()
    ids = ids[:, :45]
    with torch.no_grad():
        full = model(ids)
        decoder = model.decoder(model(ids[:, :3]).state)
        steps = torch.stack([decoder.step(ids[:, t]) for t in range(3, 45)], 1)
        torch.testing.assert_close(steps, full.logits[:, 3:], atol=ATOL, rtol=0)
        for got, want in zip(decoder.state().layers, full.state.layers):
            for a, b in zip(got._tensors(), want._tensors()):
                torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        # generate = the stream of one-token steps; seeded sampling is reproducible
        a = model.generate(ids[:, :5], 8, seed=3)
        assert a.shape == (2, 13) and torch.equal(a, model.generate(ids[:, :5], 8, seed=3))


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_full_attention_generates(head_type):
    model = make_model(head_type=head_type, attention="full").eval()
    assert model.generate(torch.zeros(1, 3, dtype=torch.long), 4, seed=0).shape == (1, 7)


def test_mqa_state_is_one_cache_per_layer():
    """An mqa layer's state holds one key/value head: 1 / H_q of an mha layer's."""
    mha, mqa = (TransformerVQ(tiny_config(head_type=h, d_model=16, d_k=4)) for h in HEAD_TYPES)
    s_mha, s_mqa = mha.initial_state(3).layers[0], mqa.initial_state(3).layers[0]
    assert s_mqa.keys.shape == (3, 1, 8, 4) and s_mqa.cache_mean.shape == (3, 1, 8, 4)
    nbytes = [sum(t.numel() * t.element_size() for t in s._tensors()) for s in (s_mha, s_mqa)]
    assert nbytes[0] == 4 * nbytes[1]


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_grad_checkpoint_gives_the_same_gradients(ids, head_type):
    model = make_model(head_type=head_type, layerdrop=0.0).train()
    la, ga = logits_and_grads(model, ids[:, :40], [40])
    lb, gb = logits_and_grads(clone_with(model, grad_checkpoint=True), ids[:, :40], [40])
    torch.testing.assert_close(la, lb, atol=ATOL, rtol=0)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_layerdrop_drops_both_sublayers(head_type):
    """With LayerDrop 0.999 almost every residual of a training forward is dropped: the output is the
    embedding read out (both the attention and the MLP residual are dropped per sequence)."""
    model = make_model(head_type=head_type, layerdrop=0.999).train()
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 9))
    logits = model(ids).logits
    torch.testing.assert_close(logits, model._logits(model.embed(ids)), atol=ATOL, rtol=0)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="head_type must be one of"):
        tiny_config(head_type="gqa")
    with pytest.raises(ValueError, match="d_model divisible by d_k"):
        tiny_config(head_type="mqa", d_model=18, d_k=4)
    with pytest.raises(ValueError, match="d_ff=8 needs head_type"):
        tiny_config(d_ff=8)
    with pytest.raises(ValueError, match="d_ff must be an int >= 0"):
        tiny_config(head_type="mha", d_ff=-1)


def test_cli_train_with_head_type_mqa_then_sample(tmp_path, capsys):
    """`tvq train --set model.head_type=mqa` trains, checkpoints and samples an mqa model."""
    from tvq.cli import main
    from tvq.training import checkpoint as ckpt

    text = tmp_path / "text.txt"
    text.write_bytes(sample_text(50_000))
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(text), "--out", str(run), "--no-progress",
                 "--set", "model.head_type=mqa", "--set", "max_steps=4", "--set", "sample_tokens=0"]) == 0
    model, _ = ckpt.load_model(ckpt.find_checkpoint(run))
    assert model.config.head_type == "mqa" and model.mlps is not None
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_config_round_trip():
    cfg = TransformerVQConfig(head_type="mqa", d_ff=100)
    assert TransformerVQConfig.from_dict(cfg.to_dict()) == cfg
