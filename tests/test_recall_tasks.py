"""``tvq recall``'s family of tasks: each named variant generates what it claims; ``--suite`` end to end
(tiny sizes); bad options are one-line errors."""

import json

import numpy as np
import pytest
import torch

from tvq import cli
from tvq.bench import recall, recall_suite, recall_train
from tvq.bench.recall_tasks import QUERY, SUITE, TASKS, RecallTask
from tvq.models.transformer_vq import IGNORE_INDEX

TINY_MODEL = ["--set-all", "model.d_model=16", "--set-all", "model.d_k=8", "--set-all", "model.d_v=16",
              "--set-all", "model.n_code=8", "--set-all", "model.block_len=8", "--set-all", "model.mem_len=8"]
TINY = ["--steps", "3", "--batch-size", "2", "--eval-seqs", "4", "--seq-len", "64", "--n-pairs", "4",
        "--log-every", "2", "--threads", "1", "--no-progress", *TINY_MODEL]


def check_rows(task: RecallTask, ids, labels, dist, written) -> dict:
    """Asserts the layout of every row (keys, queries, marker, slots, distances, distractors, filler);
    -> what was seen, for the caller's claims."""
    kl, m, s = task.key_len, int(task.marker), task.slot_len
    v0, v1 = task.value_ids
    seen = {"dist": [], "keys": set(), "shared_last": False, "distractor_writes": []}
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        answers = (labels[b] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(answers) == task.n_pairs
        used = np.zeros(task.seq_len, dtype=bool)
        keys = []
        for a in answers:
            d = int(dist[b, a])
            w = a - d  # the written VALUE
            key = tuple(row[w - kl: w])
            assert key == tuple(row[a - kl + 1: a + 1]) and all(1 <= k <= task.n_keys for k in key)
            assert row[w] == int(labels[b, a]) == row[a + 1] and v0 <= row[w] < v1
            assert w in written[b].tolist() and task.min_dist <= d <= task.max_dist
            start_w, start_q = w - kl, a - kl + 1 - m
            assert (row[start_q] == QUERY) == bool(m) and QUERY not in row[start_w: w]
            assert start_w % s == 0 and start_q % s == 0 and (d - (m - 1)) % s == 0
            used[start_w: w + 1] = used[start_q: a + 2] = True
            keys.append(key)
            seen["dist"].append(d)
        assert len(set(keys)) == task.n_pairs  # distinct in a row
        seen["keys"].update(keys)
        seen["shared_last"] |= len({k[-1] for k in keys}) < len(keys)
        # what is left: distractor writes KEY VALUE (keys never queried), else filler
        rest = [p for p in range(task.seq_len) if not used[p] and v0 <= row[p] < v1]
        for p in rest:
            key = tuple(row[p - kl: p])
            assert key not in keys and all(1 <= k <= task.n_keys for k in key) and (p - kl) % s == 0
            used[p - kl: p + 1] = True
        seen["distractor_writes"].append(len(rest))
        assert all(t >= v1 for t, u in zip(row, used) if not u)  # everything else is filler
    return seen


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_generates_what_it_claims(name):
    spec = TASKS[name]
    task = RecallTask(**spec.stream)
    data = task.batch(np.random.default_rng(0), 4)
    seen = check_rows(task, *data)
    d = np.array(seen["dist"])
    assert (d >= task.dist_range[0]).all() and task.min_dist == task.dist_range[0]
    assert task.max_dist == task.dist_range[1]  # answers up to the whole row back
    if name == "slots":  # issue 23's stream
        assert (task.seq_len, task.slot_len, task.marker, task.n_pairs, task.n_keys, task.n_values,
                task.n_filler, task.near_frac) == (256, 2, False, 16, 32, 32, 64, 0.4)
        assert spec.model == {"d_k": 32} and (d % 2 == 1).all()
    if name.startswith("long"):
        assert task.seq_len >= 1024 and d.max() > task.seq_len // 2
    if name == "pool-1k":
        assert task.key_pool == 1024 and len(seen["keys"]) > 32
    if name == "key2":
        assert task.key_len == 2 and seen["shared_last"]
    if name == "distract":
        assert seen["distractor_writes"] == [task.n_distractors * task.distractor_repeats] * 4
    else:
        assert seen["distractor_writes"] == [0] * 4
    assert set(SUITE) <= set(TASKS) and "long-4k" not in SUITE


def test_the_default_task_is_the_classic_stream():
    """--task marked (the default) is RecallTask() itself: the same rows as before the family."""
    args = recall.parse_args([])
    assert args.task == "marked" and RecallTask(**recall_train.task_fields(args, "marked")) == RecallTask()
    assert recall_train.sized(args, "marked", 0).batch_size == 16 and recall_train.sized(args, "marked", 0).eval_seqs == 512


@pytest.mark.parametrize("frac", [0.0, 0.4, 1.0])
def test_near_share_in_slots(frac):
    task = RecallTask(**dict(TASKS["slots"].stream, near_frac=frac))
    _, labels, dist, _ = task.batch(np.random.default_rng(1), 64)
    near = (dist[labels != IGNORE_INDEX] <= 32).float().mean().item()
    assert abs(near - frac) < 0.08


@pytest.mark.parametrize("kw", [dict(marker=False), dict(slot_len=4), dict(slot_len=4, marker=False),
                                dict(key_len=3, n_keys=4), dict(n_distractors=3, distractor_repeats=2)])
def test_options_combine(kw):
    task = RecallTask(seq_len=128, n_pairs=6, min_dist=None, max_dist=None, window=16, **kw)
    check_rows(task, *task.batch(np.random.default_rng(2), 3))


@pytest.mark.parametrize("bad,match", [
    (dict(slot_len=3), "slot"), (dict(key_len=5), "key_len"), (dict(n_keys=2, key_len=2, n_pairs=5), "key pool"),
    (dict(n_distractors=16, distractor_repeats=8), "seq_len"), (dict(marker=False, min_dist=0), "min_dist"),
    (dict(slot_len=2, min_dist=2, max_dist=2, marker=False), "no distance"), (dict(n_distractors=-1), "n_distractors"),
])
def test_bad_task_is_a_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        RecallTask(**bad)


def test_task_model_overrides_every_variant_before_set_all():
    args = recall.parse_args(["--task", "slots"])
    assert {c.d_k for c in recall.variant_configs(args, 129).values()} == {32}
    args = recall.parse_args(["--task", "slots", "--set-all", "model.d_k=16"])
    assert {c.d_k for c in recall.variant_configs(args, 129).values()} == {16}


def test_suite_end_to_end_writes_json_plot_and_diagnosis(tmp_path, capsys):
    out, png, diag = tmp_path / "s.json", tmp_path / "s.png", tmp_path / "d.json"
    argv = ["recall", "--suite", "--tasks", "marked,slots", "--seeds", "0,1", *TINY, "--json", str(out),
            "--plot", str(png), "--diagnose", str(diag)]
    assert cli.main(argv) == 0
    data = json.loads(out.read_text())
    assert list(data["tasks"]) == ["marked", "slots"] and data["meta"]["seeds"] == [0, 1]
    for name, t in data["tasks"].items():
        assert list(t["runs"]) == ["0", "1"] and t["task"]["seq_len"] == 64 and t["task"]["window"] == 8
        assert set(t["summary"]["variants"]) == {"vq", "nocache", "full"}
        for v, s in t["summary"]["variants"].items():
            xs = [t["runs"][k][v]["eval"]["beyond"]["accuracy"] for k in ("0", "1")]
            assert s["beyond"]["mean"] == pytest.approx(sum(xs) / 2) and s["beyond"]["per_seed"] == xs
        assert t["summary"]["wall_minutes_per_seed"] >= t["summary"]["train_minutes_per_seed"] > 0
        assert list(t["wall_seconds"]) == ["0", "1"]
    assert data["tasks"]["slots"]["task"]["marker"] is False and data["tasks"]["slots"]["model"] == {"d_k": 32}
    assert data["tasks"]["slots"]["runs"]["0"]["vq"]["config"]["d_k"] == 8  # --set-all over the task's d_k
    printed = capsys.readouterr().out
    assert "| marked | 2 |" in printed and "| slots | 2 |" in printed and png.read_bytes()[:4] == b"\x89PNG"
    d = json.loads(diag.read_text())["tasks"]
    assert set(d) == {"marked", "slots"} and set(d["slots"]["1"]) == {"vq", "nocache", "full"}
    assert "collided" in d["slots"]["1"]["vq"]["units"]["0"]["beyond_by"]


def test_gap_closed():
    def rec(acc):
        return {"eval": {"beyond": {"accuracy": acc}}}
    assert recall_suite.gap_closed({"vq": rec(0.5), "nocache": rec(0.1), "full": rec(0.9)}) == pytest.approx(0.5)
    assert recall_suite.gap_closed({"vq": rec(0.5), "nocache": rec(0.1), "full": rec(0.1)}) is None
    assert recall_suite.gap_closed({"vq": rec(0.5)}) is None


def test_suite_plot_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "matplotlib"
                        else real(name, *a, **k))
    summary = {"seeds": 1, "variants": {"vq": {"within": {"mean": 1.0, "sd": None},
                                               "beyond": {"mean": 0.5, "sd": None}, "parameters": 1}}}
    assert recall_suite.plot({"marked": summary}, str(tmp_path / "p.png")) is False
    assert "no plot" in capsys.readouterr().err and not (tmp_path / "p.png").exists()


def test_list_tasks(capsys):
    assert cli.main(["recall", "--list-tasks"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in TASKS) and "issue 23" in out


@pytest.mark.parametrize("argv,match", [
    (["--task", "nope"], "unknown task nope"), (["--suite", "--tasks", "slots,nope"], "unknown task nope"),
    (["--suite", "--tasks", "slots,slots"], "twice"), (["--suite", "--seeds", "a"], "--seeds"),
    (["--suite", "--seeds", "1,1"], "--seeds"), (["--seeds", "1"], "--suite"), (["--tasks", "slots"], "--suite"),
    (["--suite", "--tasks", "slots", "--set", "model.nope=1"], "unknown model config key 'nope'"),
    (["--slot-len", "3"], "slot_len"),
    (["--task", "slots", "--key-len", "9"], "key_len"), (["--marker", "yes"], "unrecognized arguments"),
    (["--task", "distract", "--seq-len", "64"], "task distract"), (["--near-frac", "x"], "--near-frac"),
    (["--diagnose", "/nonexistent/d.json"], "does not exist"), (["--batch-size", "0"], "--batch-size"),
])
def test_bad_options_are_one_line_and_exit_2(argv, match, capsys):
    assert cli.main(["recall", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tvq: error:") and match in err and "\n" not in err


def test_rows_are_seeded_and_torch_tensors():
    task = RecallTask(**TASKS["key2"].stream)
    a, b = task.batch(np.random.default_rng(5), 2), task.batch(np.random.default_rng(5), 2)
    assert all(isinstance(x, torch.Tensor) and torch.equal(x, y) for x, y in zip(a, b))


def test_single_run_plot_without_matplotlib_fails_before_training(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert cli.main(["recall", *TINY, "--plot", "/tmp/never.png"]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
