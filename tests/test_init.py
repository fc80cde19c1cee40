"""The official initialisation of the codebooks, and a sinusoid table exact in the model's dtype."""

import torch

from tvq import TransformerVQ
from tvq.layers.position import sinusoids
from tvq.layers.vq import VectorQuantizer
from conftest import tiny_config


def test_codebook_init_is_the_official_fan_in_normal():
    """c_sum ~ N(0, 1 / (H S)) on (H, S, D_k) (the official dense-kernel initializer), c_count = 1."""
    torch.manual_seed(0)
    H, S, Dk = 2, 512, 64
    vq = VectorQuantizer(H, S, Dk, 0.99)
    assert vq.c_sum.shape == (H, S, Dk)
    std = vq.c_sum.std().item()
    assert abs(std / (H * S) ** -0.5 - 1) < 0.02, std  # 65k draws: the sample std is within ~0.3%
    assert abs(vq.c_sum.mean().item()) < 0.02 * std  # 5 standard errors
    assert torch.equal(vq.c_count, torch.ones(H, S))
    torch.testing.assert_close(vq.codebook(), vq.c_sum)


def test_sinusoids_are_exact_in_the_model_dtype():
    """model.double() gets the float64 table itself, not the float32 one upcast; .float() rounds it once."""
    model = TransformerVQ(tiny_config(mem_len=40, d_model=48))
    want = sinusoids(41, 48, model.config.rel_pos_base, dtype=torch.float64)  # (M + 1, D)
    gau = model.attns[0]
    assert gau.sin().dtype == torch.float32
    assert torch.equal(gau.sin(), want.float())
    model.double()
    assert gau.sin().dtype == torch.float64 and torch.equal(gau.sin(), want)
    assert not torch.equal(want.float().double(), want)  # (so the check above can fail)
    model.float()
    assert torch.equal(gau.sin(), want.float())
    scaled = want * model.config.d_k**-0.25  # the scale folded in once, from float64
    half = gau.sin.scaled(torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, scaled.float().half())  # cast from the model's dtype
    assert gau.sin.scaled(torch.float16) is half
    model.double()  # a cast drops the kept table
    assert gau.sin.scaled(torch.float16) is not half and torch.equal(gau.sin.scaled(torch.float64), scaled)
    assert not any("sin" in name for name in model.state_dict())  # not saved: rebuilt, never loaded


def test_float64_relative_embeddings_are_computed_in_float64():
    model = TransformerVQ(tiny_config()).double()
    gau = model.attns[0]
    rel, _, _ = gau.position_terms(torch.float64)  # (H, M + 1, D_k)
    cfg = model.config
    table = sinusoids(cfg.mem_len + 1, cfg.d_model, cfg.rel_pos_base, dtype=torch.float64)
    want = (table @ gau.w_r.weight.T).view(cfg.mem_len + 1, cfg.n_head, cfg.d_k).transpose(0, 1) * cfg.d_k**-0.25
    torch.testing.assert_close(rel, want, atol=1e-15, rtol=0)
