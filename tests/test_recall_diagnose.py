"""``tvq recall --diagnose``: the per-answer fields against hand-computed cases, against the spec's
attention, and on a tiny model whose keys all collide by construction."""

import json
import math

import numpy as np
import pytest
import torch

from tvq import cli
from tvq.bench import recall_diagnose as rd
from tvq.bench.recall_tasks import RecallTask
from tvq.config import TransformerVQConfig
from tvq.models.transformer_vq import TransformerVQ
from tvq.ops.quadratic import reference_attention

TINY = ["--steps", "3", "--batch-size", "2", "--eval-seqs", "4", "--seq-len", "64", "--n-pairs", "4",
        "--log-every", "2", "--threads", "1", "--no-progress", "--set-all", "model.d_model=16",
        "--set-all", "model.d_k=8", "--set-all", "model.d_v=16", "--set-all", "model.n_code=8",
        "--set-all", "model.block_len=8", "--set-all", "model.mem_len=8"]


def uniform_case(**kw):
    """q = u = v = 0: every visible key scores 0 (the cache bias aside). T = 6, M = 1; codes
    [0, 2, 2, 1, 2, 0]; VALUE tokens 40, 41, 40 at 1, 2, 4; v_1 = (1, 0), v_2 = (0, 1)."""
    T = 6
    values = torch.tensor([[3.0, 1], [1, 0], [0, 1], [2, 2], [5, 1], [1, 7]])[None, None]  # (1, 1, T, 2)
    args = dict(q=torch.zeros(1, 1, T, 2), keys=torch.randn(1, 1, T, 2), values=values,
                codes=torch.tensor([[[0, 2, 2, 1, 2, 0]]]), rel=torch.randn(1, 2, 2), u=torch.zeros(1, 2),
                v=torch.zeros(1, 2), mem_len=1, agg_cache=True, cache_bias=None,
                query_pos=torch.tensor([[5, 5]]), target_pos=torch.tensor([[1, 4]]),
                value_tok=torch.tensor([[-1, 40, 41, -1, 40, -1]]))
    args.update(kw)
    return {k: v[0, 0].tolist() for k, v in rd.answer_attention(**args).items()}


def test_hand_computed_collision_and_dilution():
    """The query at 5 sees 6 keys alike (weight 1/6 each). Answer 0: VALUE at 1 (distance 4 > M), code 2
    shared by the old key 2 (a VALUE too, of another value: a rival): a cache entry of 2 keys, weight 2/6,
    mean (0.5, 0.5), cosine
    1/sqrt(2) with v_1 = (1, 0). Answer 1: VALUE at 4, within the window: no cache fields."""
    f = uniform_case()
    assert f["attn_target"] == pytest.approx([1 / 6, 1 / 6])
    assert f["attn_window"] == pytest.approx([2 / 6] * 2) and f["attn_far"] == pytest.approx([4 / 6] * 2)
    assert f["group"][0] == 2 and f["other_values"][0] == 1 and f["rival_values"][0] == 1
    same = uniform_case(value_tok=torch.tensor([[-1, 40, 40, -1, 40, -1]]))  # key 2 holds w's value: no rival
    assert same["other_values"][0] == 1 and same["rival_values"][0] == 0
    assert f["attn_code"][0] == pytest.approx(2 / 6) and f["cos_mean"][0] == pytest.approx(1 / math.sqrt(2))
    assert f["cos_all"][0] == pytest.approx(1.5 / math.sqrt(3.25))  # all old values' mean (1.5, 1) against v_1
    assert all(math.isnan(f[k][1]) for k in ("group", "other_values", "rival_values", "attn_code", "cos_mean", "cos_all"))


def test_hand_computed_cache_bias_and_no_cache():
    """A cache bias of log 2 doubles each old key's weight: 2 / (4 * 2 + 2) = 0.2 each; without the cache
    the query sees its window only."""
    f = uniform_case(cache_bias=torch.tensor([math.log(2.0)]))
    assert f["attn_target"][0] == pytest.approx(0.2) and f["attn_code"][0] == pytest.approx(0.4)
    assert f["attn_far"][0] == pytest.approx(0.8) and f["attn_target"][1] == pytest.approx(0.1)
    f = uniform_case(agg_cache=False)
    assert f["attn_target"] == pytest.approx([0.0, 0.5]) and f["attn_code"][0] == 0.0
    assert f["attn_window"] == pytest.approx([1.0, 1.0]) and f["group"][0] == 2  # the codes still collide
    dense = uniform_case(codes=None)
    assert set(dense) == {"attn_target", "attn_window", "attn_far"}


def tiny_model(**kw) -> TransformerVQ:
    torch.manual_seed(0)
    cfg = dict(vocab_size=RecallTask(seq_len=64, n_pairs=4, max_dist=None, window=8).vocab_size, d_model=16, d_k=8,
               d_v=16, n_layer=1, n_code=8, block_len=8, mem_len=8)
    return TransformerVQ(TransformerVQConfig.from_dict({**cfg, **kw})).eval()


@pytest.mark.parametrize("kw", [{}, {"cache_bias": True, "cache_bias_init": -1.0}, {"agg_cache": False},
                                {"attention": "full"}, {"head_type": "mha"}])
def test_weights_reproduce_the_sublayer(kw):
    """The recomputed q, keys and values with :func:`answer_probs` give the spec's attention at the
    answer rows, and that attention through the gate and W_o gives the sublayer's output."""
    model = tiny_model(**kw)
    task = RecallTask(seq_len=64, n_pairs=4, max_dist=None, window=8)
    ids, labels, dist, _ = task.batch(np.random.default_rng(0), 2)
    rec = rd.InputRecorder(model)
    with torch.no_grad():
        model(ids)
    inputs = rec.inputs()
    rec.close()
    x0 = inputs[0]
    attn = model.attns[0]
    t = rd.unit_terms(attn, x0)
    query_pos = (labels != -100).nonzero()[:, 1].view(2, -1)
    probs, _, _ = rd.answer_probs(t["q"], t["keys"], rel=t["rel"], u=t["u"], v=t["v"], mem_len=8,
                                  agg_cache=t["agg_cache"], cache_bias=t["cache_bias"], query_pos=query_pos)
    ref = reference_attention(t["q"], t["keys"], t["values"], n_invalid=0, rel=t["rel"], u=t["u"], v=t["v"],
                              mem_len=8, agg_cache=t["agg_cache"], cache_bias=t["cache_bias"])  # (B, H, T, D_v)
    rows = ref.gather(2, query_pos[:, None, :, None].expand(-1, ref.shape[1], -1, ref.shape[-1]))
    torch.testing.assert_close(probs @ t["values"].float(), rows, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        g = attn._projections(attn.norm(x0))[3]
        out = ref.transpose(1, 2).flatten(2)
        x_next = x0 + attn.w_o(out if g is None else out * g)
    if attn.config.head_type == "shga":  # the next GAU's input
        torch.testing.assert_close(x_next, inputs[1], atol=1e-5, rtol=1e-5)


def test_all_keys_in_one_code_by_construction():
    """Identical codewords: every key takes code 0, so an answer beyond the window shares its entry with
    every key older than the window: group = i - M, other_values = the VALUE tokens among them but w,
    rival_values = those of another value than w's, attn_code = attn_far."""
    model = tiny_model()
    for q in model._quantizers():
        q.c_sum.fill_(0.1)
        q.c_count.fill_(1.0)
    task = RecallTask(seq_len=64, n_pairs=4, n_values=3, max_dist=None, window=8)  # values repeat in a row
    data = task.batch(np.random.default_rng(3), 3)
    out = rd.diagnose(model, data, task.value_ids)
    ids, labels, dist, _ = data
    pos = (labels != -100).nonzero()
    v0, v1 = task.value_ids
    exp_group, exp_other, exp_rival = [], [], []
    for b, i in pos.tolist():
        d = int(dist[b, i])
        old, w = ids[b, : i - 8], ids[b, i - d]
        is_value = (old >= v0) & (old < v1)
        exp_group.append(i - 8 if d > 8 else None)
        exp_other.append(int(is_value.sum()) - 1 if d > 8 else None)
        exp_rival.append(int((is_value & (old != w)).sum()) if d > 8 else None)
    assert any(r is not None and r < o for r, o in zip(exp_rival, exp_other))  # some share w's value
    assert out["answers"]["distance"] == dist[labels != -100].tolist()
    for unit in ("0", "1"):
        f = out["answers"]["units"][unit]
        assert f["group"] == exp_group and f["other_values"] == exp_other and f["rival_values"] == exp_rival
        far = [k for k, g in enumerate(exp_group) if g is not None]
        assert far and all(f["attn_code"][k] == pytest.approx(f["attn_far"][k], abs=1e-4) for k in far)
        assert all(0 <= x <= 1 + 1e-6 for x in f["attn_target"] + f["attn_window"])
    s = out["summary"]
    assert s["within"]["n"] + s["beyond"]["n"] == 12
    by = s["units"]["0"]["beyond_by"]
    assert by["collided"]["n"] + by["clean"]["n"] == s["beyond"]["n"]
    assert sum(b["n"] for b in by["group"]) == s["beyond"]["n"] == sum(b["n"] for b in by["attn_code"])


def test_diagnose_option_writes_per_answer_json(tmp_path):
    diag, out = tmp_path / "d.json", tmp_path / "r.json"
    assert cli.main(["recall", *TINY, "--task", "slots", "--variants", "vq,full", "--diagnose", str(diag),
                     "--json", str(out)]) == 0
    d = json.loads(diag.read_text())
    assert d["meta"]["task_name"] == "slots" and set(d["variants"]) == {"vq", "full"}
    vq = d["variants"]["vq"]
    n = len(vq["answers"]["distance"])
    assert n == 16 and set(vq["answers"]["units"]) == {"0", "1", "2", "3"}
    assert all(len(col) == n for col in vq["answers"]["units"]["2"].values())
    assert [h["step"] for h in vq["codebook_history"]] == [2, 3]
    assert len(vq["codebook_history"][0]["per_gau"]["dead"]) == 4  # per GAU
    full = d["variants"]["full"]
    assert "group" not in full["answers"]["units"]["0"] and full["codebook_history"] == []
    assert "diagnosis" not in json.loads(out.read_text())["results"]["vq"]  # kept out of the results JSON


def test_heads_are_units_of_their_own():
    """mha: every query head of a sublayer is a unit ("layer.head"), each with its own fields."""
    model = tiny_model(head_type="mha", n_layer=2)  # d_model 16 / d_k 8: two heads
    task = RecallTask(seq_len=64, n_pairs=4, max_dist=None, window=8)
    out = rd.diagnose(model, task.batch(np.random.default_rng(4), 2), task.value_ids)
    assert list(out["answers"]["units"]) == ["0.0", "0.1", "1.0", "1.1"]
    assert list(out["summary"]["units"]) == ["0.0", "0.1", "1.0", "1.1"]
    assert out["answers"]["units"]["0.0"]["attn_target"] != out["answers"]["units"]["0.1"]["attn_target"]
