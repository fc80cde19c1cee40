"""Bad input raises ValueError with a message that names the problem."""

import pytest
import torch

from tvq import TransformerVQConfig
from conftest import make_model, tiny_config


@pytest.mark.parametrize("field,value,match", [
    ("d_k", 0, "d_k"), ("d_k", -3, "d_k"), ("n_code", 0, "n_code"), ("mem_len", 0, "mem_len"),
    ("block_len", 2.5, "block_len"), ("n_layer", True, "n_layer"), ("vocab_size", "256", "vocab_size"),
    ("attention", "linear", "attention"), ("attn_impl", "flash", "attn_impl"),
    ("dropout_res", 1.0, "dropout_res"), ("layerdrop", -0.1, "layerdrop"),
    ("codebook_decay", 1.0, "codebook_decay"), ("commit_weight", -1, "commit_weight"),
    ("logit_scale", 0, "logit_scale"), ("agg_cache", 1, "agg_cache"),
])
def test_impossible_config(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**{field: value})


def test_unknown_config_field():
    with pytest.raises(ValueError, match="n_heads"):
        TransformerVQConfig.from_dict({"n_heads": 2})
    cfg = tiny_config()
    assert TransformerVQConfig.from_dict(cfg.to_dict()) == cfg


@pytest.fixture(scope="module")
def model():
    return make_model().eval()


@pytest.mark.parametrize("ids,match", [
    (torch.tensor([[1, 2, 50]]), r"outside \[0, 50\)"),
    (torch.tensor([[1, -1, 3]]), r"outside \[0, 50\)"),
    (torch.tensor([[1.0, 2.0]]), "integer dtype"),
    (torch.tensor([[True, False]]), "integer dtype"),
    (torch.tensor([1, 2, 3]), r"shape \(batch, time\)"),
    (torch.zeros(1, 2, 3, dtype=torch.long), r"shape \(batch, time\)"),
    (torch.zeros(2, 0, dtype=torch.long), "empty"),
    ([[1, 2, 3]], "torch.Tensor"),
])
def test_bad_input_ids(model, ids, match):
    with pytest.raises(ValueError, match=match):
        model(ids)


def test_state_from_another_batch_size(model):
    state = model(torch.zeros(2, 5, dtype=torch.long)).state
    with pytest.raises(ValueError, match="batch size 2"):
        model(torch.zeros(3, 1, dtype=torch.long), state=state)


@pytest.mark.parametrize("overrides,match", [
    (dict(mem_len=5), "keys has shape"), (dict(n_layer=2), "4 layers"), (dict(d_v=4), "values has shape"),
    (dict(n_code=4), "cache_count has shape"), (dict(attention="full"), "keys has shape"),
])
def test_state_from_another_config(model, overrides, match):
    other = make_model(**overrides).eval()
    state = other(torch.zeros(2, 5, dtype=torch.long)).state
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(2, 1, dtype=torch.long), state=state)


def test_not_a_state(model):
    with pytest.raises(ValueError, match="TransformerVQState"):
        model(torch.zeros(1, 1, dtype=torch.long), state={"pos": 0})


def test_bad_labels_and_mask(model):
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels has shape"):
        model(ids, labels=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels has ids outside"):
        model(ids, labels=torch.full((2, 4), 99))
    with pytest.raises(ValueError, match="token_mask"):
        model(ids, token_mask=torch.ones(2, 4))


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=2, top_k=0), "top_k"), (dict(max_new_tokens=2, top_p=0.0), "top_p"),
    (dict(max_new_tokens=2, top_p=1.5), "top_p"),
])
def test_bad_generation_args(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros(1, 3, dtype=torch.long), **kwargs)
