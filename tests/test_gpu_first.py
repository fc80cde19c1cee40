"""CPU dry run of benchmarks/gpu_first.py (DEV=cpu, tiny shapes): every part ends ok/skipped, numbers plausible."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_first_cpu_dry_run(tmp_path):
    out = tmp_path / "g.json"
    env = {**os.environ, "DEV": "cpu", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "benchmarks/gpu_first.py", "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    parts = d["parts"]
    assert set(parts) == {"equivalence", "train32k", "crossover", "profile", "decode", "graphed", "compiled"}
    for name, p in parts.items():
        assert p["status"] in ("ok", "skipped"), (name, p.get("error"))
    assert parts["equivalence"]["ok"] is True, parts["equivalence"]["results"]
    for part in ("train32k", "crossover"):
        for key, rec in parts[part]["results"].items():
            if isinstance(rec, str):
                assert rec.startswith("skipped"), (key, rec)
            else:
                assert 0 < rec["tokens_per_s"] < 1e9, (key, rec)
    for T in ("256", "512"):
        assert parts["profile"]["results"][T]["top25"] and parts["profile"]["results"][T]["step_wall_ms"] > 0
    dec = parts["decode"]["results"]
    assert dec["position"] > 0
    for k in ("tvq_eager_tokens_per_s", "sdpa_static_kv_tokens_per_s"):
        v = dec[k]
        assert (isinstance(v, float) and v > 0) or str(v).startswith("skipped"), (k, v)
    assert "tvq_cuda_graph_tokens_per_s" in dec
