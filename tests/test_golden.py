"""Checkpoints and numbers recorded by an earlier tvq (tests/data/golden, made at commit 794bc9b before the
attention sublayers became one module): today's code loads them and computes the same function.

For each head type and each model variant (both straight-through rules, gradient through the cache or
not, cache on/off, cache offset or not, the quadratic reference, dense attention, left padding, a token
mask): logits of two chunks (the second continuing the first's state), loss, every parameter gradient,
the codebook statistics and the buffers after one update, the carried state, and decoder logits, to 1e-12
in float64.
"""

import pytest
import torch
from safetensors.torch import load_file

from tvq.training.checkpoint import load_model

from data.golden.make_golden import CASES, HEAD_TYPES, HERE, case_model, run_case, run_decode

TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module", params=HEAD_TYPES)
def golden(request):
    head_type = request.param
    expected = load_file(str(HERE / f"{head_type}_expected.safetensors"))
    return head_type, expected


def _weights(head_type: str) -> dict:
    """The checkpoint's weights as today's model names them (loaded through the real checkpoint loader)."""
    model, meta = load_model(HERE / head_type)
    assert meta["step"] == 0 and model.config.head_type == head_type
    return model.state_dict()


def test_checkpoint_loads_with_the_same_logits(golden):
    head_type, expected = golden
    model, _ = load_model(HERE / head_type)
    model = model.double().eval()
    with torch.no_grad():
        got = run_decode(model)
    for key, value in got.items():
        torch.testing.assert_close(value, expected[f"decode/{key}"], **TOL, msg=f"{head_type} decode {key}")


def _without_tokens(recorded, now):
    """The recorded statistics in today's layout: each quantizer's [sums | counts | tokens, err, norm] then had the
    token count, which the counts now give (one code per token and head)."""
    n_q = recorded.numel() - now.numel()  # one entry fewer per quantizer
    if n_q == 0:
        return recorded
    per = now.numel() // n_q  # today's entries per quantizer: sums, counts, err, norm
    rows = recorded.view(n_q, per + 1)
    return torch.cat([rows[:, : per - 2], rows[:, per - 1:]], 1).flatten()


@pytest.mark.parametrize("case", CASES)
def test_same_function_as_before(golden, case):
    head_type, expected = golden
    overrides = CASES[case]
    got = run_case(case_model(_weights(head_type), head_type, overrides), overrides)
    want = {k[len(case) + 1:]: v for k, v in expected.items() if k.startswith(case + "/")}
    assert sorted(got) == sorted(want), f"{head_type}/{case}: a different set of parameters, buffers or state"
    want["codebook_stats"] = _without_tokens(want["codebook_stats"], got["codebook_stats"])
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=f"{head_type}/{case}: {key}")
