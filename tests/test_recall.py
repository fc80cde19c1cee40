"""``tvq recall``: the synthetic stream, the collision rate, the command end to end (tiny sizes)."""

import json

import numpy as np
import pytest
import torch

from tvq import cli
from tvq.bench import recall
from tvq.config import TransformerVQConfig
from tvq.models.transformer_vq import IGNORE_INDEX, TransformerVQ

TINY = ["--steps", "3", "--batch-size", "2", "--eval-seqs", "4", "--seq-len", "64", "--n-pairs", "4",
        "--max-dist", "60", "--log-every", "2", "--threads", "1", "--no-progress",
        "--set-all", "model.d_model=16", "--set-all", "model.d_k=8", "--set-all", "model.d_v=16",
        "--set-all", "model.n_code=8", "--set-all", "model.block_len=8", "--set-all", "model.mem_len=8"]


def test_stream_layout():
    task = recall.RecallTask(seq_len=128, n_pairs=8, n_keys=10, n_values=5, n_filler=7, max_dist=120, window=16)
    ids, labels, dist, written = task.batch(np.random.default_rng(0), 6)
    assert ids.shape == labels.shape == dist.shape == (6, 128) and written.shape == (6, 8)
    assert int(ids.min()) >= 0 and int(ids.max()) < task.vocab_size == 23
    for b in range(6):
        answers = (labels[b] != IGNORE_INDEX).nonzero().flatten()
        assert len(answers) == 8
        keys = []
        for q in answers.tolist():
            d = int(dist[b, q])
            w = q - d - 1  # the written KEY
            assert ids[b, q - 1] == recall.QUERY and ids[b, w] == ids[b, q]  # ? KEY ... the same KEY
            assert ids[b, w + 1] == labels[b, q] == ids[b, q + 1]  # the written VALUE is the answer
            assert 1 <= int(ids[b, q]) <= 10 and 11 <= int(labels[b, q]) <= 15
            assert w + 1 in written[b].tolist() and 2 <= d <= 120
            keys.append(int(ids[b, q]))
        assert len(set(keys)) == 8  # keys are distinct in a row
        filler = torch.ones(128, dtype=torch.bool)
        filler[answers] = filler[answers - 1] = filler[answers + 1] = False
        filler[written[b]] = filler[written[b] - 1] = False
        assert (ids[b, filler] >= 16).all()  # everything else is filler
    again = task.batch(np.random.default_rng(0), 6)
    assert torch.equal(again[0], ids)  # a seeded stream


def test_distances_follow_near_frac():
    task = recall.RecallTask(near_frac=0.25, window=32)
    _, labels, dist, _ = task.batch(np.random.default_rng(1), 200)
    d = dist[labels != IGNORE_INDEX]
    assert 0.2 < (d <= 32).float().mean() < 0.3 and int(d.min()) >= 2 and int(d.max()) <= 253
    far = recall.RecallTask(near_frac=0.0, window=32).batch(np.random.default_rng(1), 20)
    assert (far[2][far[1] != IGNORE_INDEX] > 32).all()


@pytest.mark.parametrize("bad,match", [
    (dict(n_pairs=40), "n_keys"), (dict(n_pairs=60, n_keys=60), "seq_len"), (dict(max_dist=254), "max_dist"),
    (dict(min_dist=1), "min_dist"), (dict(near_frac=1.5), "near_frac"), (dict(n_filler=0), "n_filler"),
])
def test_bad_task_is_a_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        recall.RecallTask(**bad)


def test_collision_rate_counts_pairs_sharing_a_code():
    model = TransformerVQ(TransformerVQConfig(vocab_size=10, d_model=8, d_k=4, d_v=8, n_layer=1, n_code=4,
                                              block_len=4, mem_len=4))
    rec = recall.CodeRecorder(model)
    rec._parts = [[torch.tensor([[[0, 1, 1, 2, 1]]])], [torch.tensor([[[3, 3, 3, 3, 3]]])]]  # (B, H, T) per GAU
    written = torch.tensor([[1, 2, 3]])  # codes 1, 1, 2: one pair of three collides
    assert rec.collision(written) == pytest.approx([1 / 3, 1.0])
    rec.close()


def test_recall_end_to_end_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert cli.main(["recall", *TINY, "--loss", "all", "--set", "model.codebook_revive=0.5", "--json", str(out), "--plot", str(png)]) == 0
    data = json.loads(out.read_text())
    res = data["results"]
    assert list(res) == ["vq", "nocache", "full"] and data["meta"]["task"]["window"] == 8
    assert res["vq"]["config"]["codebook_revive"] == 0.5 and res["full"]["config"]["codebook_revive"] == 0.0
    assert not res["nocache"]["config"]["agg_cache"] and res["full"]["config"]["attention"] == "full"
    for name, r in res.items():
        e = r["eval"]
        assert e["answers"] == 16 and sum(e[b]["n"] for b in ("within", "1-4 windows", "beyond 4")) == 16
        assert r["tokens_per_s"] > 0 and r["history"][-1]["step"] == 3
        assert ("collision" in e) == (name != "full") and ("dead" in r["codebook_final"]) == (name != "full")
    assert "revived" in res["vq"]["history"][-1]
    assert res["vq"]["parameters"] == res["full"]["parameters"] and data["meta"]["train"]["loss"] == "all"
    assert "| vq |" in capsys.readouterr().out and png.read_bytes()[:4] == b"\x89PNG"


def test_variants_share_weights_init_and_batches(tmp_path):
    """With the cache off and agg_cache off the same model is trained: the two runs agree exactly."""
    out = tmp_path / "r.json"
    assert recall.main([*TINY, "--variants", "nocache,vq", "--set", "model.agg_cache=false", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert res["vq"]["history"] == res["nocache"]["history"]


@pytest.mark.parametrize("argv,match", [
    (["--variants", "vq,dense"], "unknown variant"), (["--steps", "0"], "--steps"),
    (["--set", "model.nope=1"], "unknown model config key"), (["--set", "model.vocab_size=64"], "vocab_size"),
    (["--n-pairs", "64"], "n_keys"), (["--config", "/nonexistent.json"], "does not exist"),
    (["--bogus"], "unrecognized arguments"), (["--lr", "nan"], "--lr"), (["--device", "tpu"], "unknown device"),
    (["--json", "/nonexistent/out.json"], "does not exist"), (["--threads", "-1"], "--threads"),
])
def test_bad_input_is_one_line_and_exit_2(argv, match, capsys):
    assert cli.main(["recall", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tvq: error:") and match in err and "\n" not in err


def test_shipped_recall_config_is_valid_and_keeps_the_parameter_count():
    """benchmarks/recall_config.json (read by other tools) holds model config keys that change the vq
    variants only, within the target's 2% of the paper model's parameters."""
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "recall_config.json"
    overrides = json.loads(path.read_text())
    assert isinstance(overrides, dict) and overrides
    tuned = recall.variant_configs(recall.parse_args(["--config", str(path)]), 128)
    paper = recall.variant_configs(recall.parse_args([]), 128)
    assert tuned["full"] == paper["full"]
    for name in ("vq", "nocache"):
        for key, value in overrides.items():
            assert getattr(tuned[name], key) == value
    n_paper = TransformerVQ(paper["vq"]).num_parameters()
    assert abs(TransformerVQ(tuned["vq"]).num_parameters() - n_paper) <= 0.02 * n_paper
    assert TransformerVQ(tuned["nocache"]).num_parameters() == TransformerVQ(paper["nocache"]).num_parameters()
