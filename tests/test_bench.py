"""The speed benchmark harness: records, refusal of wrong paths, timeouts (tiny cases)."""

import json

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
    import tvq.layers.gau as gau

    def broken(q, keys, values, codes, **kwargs):
        return torch.zeros(*q.shape[:3], values.shape[-1], dtype=q.dtype)

    monkeypatch.setattr(gau, "blockwise_attention", broken)
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
