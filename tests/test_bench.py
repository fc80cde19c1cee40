"""The speed benchmark harness: records, refusal of wrong paths, timeouts (tiny cases)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tvq.bench import runner

FIELDS = {"impl", "mode", "seq_len", "batch_size", "tokens_per_s", "peak_mem_bytes", "device", "dtype",
          "torch_version", "commit"}


def test_sweep_writes_records_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert runner.main(["--mode", "train,decode", "--impl", "vq,sdpa", "--seq-lens", "64", "--decode-positions", "64", "--repeats", "1",
                        "--warmup", "0", "--decode-steps", "2", "--threads", "1", "--json", str(out), "--plot", str(png)]) == 0
    records = json.loads(out.read_text())
    assert len(records) == 4 and all(FIELDS <= r.keys() for r in records)
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["peak_mem_bytes"] >= 0 for r in records)
    assert all(r["threads"] == 1 for r in records)  # --threads reaches the case subprocesses
    table = capsys.readouterr().out
    assert "| train | 64 |" in table and "vq / sdpa" in table
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_over_budget_is_reported_not_dropped():
    record = runner.run_isolated(runner.Case("full", "forward", 64), time_budget=0.01)
    assert record.status == "timeout" and record.tokens_per_s is None


def test_a_wrong_fast_path_is_refused(monkeypatch):
    import tvq.layers.attention as attention

    def broken(q, keys, values, codes, **kwargs):
        return torch.zeros(*q.shape[:3], values.shape[-1], dtype=q.dtype)

    monkeypatch.setattr(attention, "blockwise_attention", broken)
    with pytest.raises(runner.WrongResult, match="reference"):
        runner.check("vq", "bench-small")
    runner.check("sdpa", "bench-small")  # the other paths still pass
    runner.check("full", "bench-small")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown mode/impl"):
        runner.main(["--impl", "flash"])
    with pytest.raises(ValueError, match="bench preset"):
        runner.main(["--preset", "huge"])
    with pytest.raises(ValueError, match="--threads"):
        runner.main(["--threads", "-1"])
    with pytest.raises(ValueError, match="--processes"):
        runner.main(["--processes", "0"])


def _record(tokens_per_s, peak, seconds, status="ok"):
    return runner.Record("vq", "forward", 64, 1, tokens_per_s, peak, "cpu", "float32", "2", "abc", status=status,
                         seconds=seconds, process_tokens_per_s=[tokens_per_s] if status == "ok" else [])


def test_processes_combine_to_their_median():
    r = runner.combine([_record(300.0, 5, [0.2]), _record(100.0, 9, [0.6]), _record(200.0, 7, [0.3])])
    assert r.tokens_per_s == 200.0 and r.peak_mem_bytes == 9 and r.status == "ok"
    assert r.process_tokens_per_s == [300.0, 100.0, 200.0] and r.seconds == [0.2, 0.6, 0.3]
    failed = runner.combine([_record(300.0, 5, [0.2]), _record(None, None, [], status="oom")])
    assert failed.status == "oom" and failed.tokens_per_s is None and failed.detail.startswith("process 2 of 2")


def test_each_process_is_a_fresh_run(tmp_path):
    out = tmp_path / "bench.json"
    assert runner.main(["--mode", "forward", "--impl", "vq", "--seq-lens", "32", "--repeats", "1", "--warmup", "0",
                        "--threads", "1", "--processes", "2", "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    assert record["status"] == "ok" and len(record["process_tokens_per_s"]) == 2 and len(record["seconds"]) == 2


def test_model_overrides_reach_every_case(tmp_path):
    """--set NAME=VALUE changes the benchmarked model (here the mqa variant), checked and timed."""
    out = tmp_path / "bench.json"
    assert runner.main(["--mode", "train,decode", "--impl", "vq,full", "--seq-lens", "64", "--decode-positions", "64",
                        "--repeats", "1", "--warmup", "0", "--decode-steps", "2", "--threads", "1",
                        "--set", "head_type=mqa", "--set", "model.d_ff=300", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    assert all(r["model"] == {"head_type": "mqa", "d_ff": 300} for r in records)
    shga = runner.build("vq", "bench-small").num_parameters()
    mqa = runner.build("vq", "bench-small", overrides={"head_type": "mqa", "d_ff": 300}).num_parameters()
    assert records[0]["params"] == mqa != shga


def test_bad_model_overrides():
    with pytest.raises(ValueError, match="--set 'heads=2'"):
        runner.main(["--set", "heads=2"])
    with pytest.raises(ValueError, match="other than attention"):
        runner.main(["--set", "attention=full"])
    with pytest.raises(ValueError, match="type int"):
        runner.main(["--set", "d_ff=big"])
    with pytest.raises(ValueError, match="d_model divisible by d_k"):
        runner.main(["--set", "head_type=mha", "--set", "d_k=48"])


@pytest.mark.parametrize("entry", [["tvq", "bench"], ["tvq.bench"]])
def test_bench_help_does_not_import_torch(entry):
    """``tvq bench --help`` and ``python -m tvq.bench --help`` answer without importing torch (``-X importtime``
    lists every module a process imports)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", *entry, "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: tvq bench"), proc.stderr[-500:]
    imported = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "tvq.bench.args" in imported and not [m for m in imported if m.split(".")[0] == "torch"]
