"""Issue 24's targets side by side: the cost model's figures before (at 167fc02) and after, in one JSON and a
markdown table.

Both sides are counted by the same (current) ``tvq.bench.cost``: the "before" files come from a checkout of
167fc02 with this cost.py copied in (the recorder was corrected since: silu_backward and the fused RMSNorm are
single CUDA kernels), e.g.

    git worktree add /tmp/old 167fc02 && cp src/tvq/bench/cost.py /tmp/old/src/tvq/bench/
    (cd /tmp/old && PYTHONPATH=src python -m tvq.bench.cost --preset enwik8 --mode train --seq-len 8192 \\
        --json $OLDPWD/benchmarks/results/cost/before24_enwik8_train_8192.json)
    python -m tvq.bench.cost --preset enwik8 --mode train --seq-len 8192 \\
        --json benchmarks/results/cost/after24_enwik8_train_8192.json
    python benchmarks/cost_side_by_side.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent / "results" / "cost"
CASES = ["enwik8_train_8192", "enwik8_train_32768", "bench-small_train_2048", "bench-small_train_8192",
         "enwik8_decode_65536", "bench-small_decode_65536"]


def figures(r: dict) -> dict:
    s, sub = r["summary"], r["per_sublayer"]["total"]
    out = {"kernels_per_step": s["kernels_per_step"], "syncs_per_step": s["syncs_per_step"],
           "fp32_share_of_gemm_flops": s["fp32_share"], "fp32_share_in_sublayers": sub["fp32_share"],
           "operand_MB_per_token": s["operand_bytes_per_token"] / 1e6,
           "operand_MB_per_token_per_sublayer": sub["operand_bytes_per_token"] / 1e6,
           "traffic_MB_per_token": s["traffic_bytes_per_token"] / 1e6}
    if r["meta"]["mode"] == "train":
        out["saved_for_backward_MB_per_token"] = s["saved_for_backward_bytes_per_token"] / 1e6
    else:
        out["kernels_per_token_per_sublayer"] = s["kernels_per_token"] / r["meta"]["n_attn"]
    return out


def main() -> None:
    rows, table = {}, []
    for case in CASES:
        before, after = HERE / f"before24_{case}.json", HERE / f"after24_{case}.json"
        if not (before.is_file() and after.is_file()):
            continue
        b, a = (figures(json.loads(p.read_text())) for p in (before, after))
        rows[case] = {"before": b, "after": a, "files": [before.name, after.name]}
        for key in b:
            ratio = b[key] / a[key] if a[key] else float("inf") if b[key] else 1.0
            table.append(f"| {case} | {key} | {b[key]:.4g} | {a[key]:.4g} | {ratio:.2f}x |")
    out = HERE / "issue24_side_by_side.json"
    out.write_text(json.dumps({"what": __doc__.split("\n\n")[0], "cases": rows}, indent=1) + "\n")
    print("| case | figure | before (167fc02) | after | before / after |\n|---|---|---|---|---|")
    print("\n".join(table))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
