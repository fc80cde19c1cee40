"""A roofline estimate of a training step on a GPU from the cost model's counts: tvq against the same model
with FlashAttention-2 (SDPA) in place of the VQ attention, and the sequence length where tvq overtakes it.

Counts, not timings. The step time of a part (:mod:`tvq.bench.cost` splits a step into the VQ attention
core and the rest) is the sum of its bf16 GEMM FLOPs at ``bf16_tflops``, its float32 GEMM FLOPs at
``fp32_tflops``, its memory traffic at ``hbm_tbps`` and a launch overhead per kernel: an upper bound for op
by op (eager) execution, where a kernel rarely overlaps compute with memory. The dense model keeps the rest
and runs causal attention as FlashAttention-2 at ``fa2_tflops`` (forward 2 T^2 (D_k + D_v) / 2 FLOPs per
head and row; backward 2.5x that, as it recomputes the scores). tvq's counts are linear in T (measured at
two lengths and fitted); the dense attention's grow as T^2.

    python -m tvq.bench.roofline --preset enwik8 --json benchmarks/results/cost/roofline.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from tvq.usage import int_range

# H100 SXM, achieved rather than peak: the issue-24 assumptions, stated in every result
@dataclass(frozen=True)
class Device:
    bf16_tflops: float = 650.0  # dense bf16 GEMMs (989 peak)
    fp32_tflops: float = 50.0  # float32 GEMMs without TF32 (PyTorch's default for matmul)
    hbm_tbps: float = 2.6  # memory bandwidth (3.35 peak)
    launch_us: float = 4.0  # per kernel, eager
    fa2_tflops: float = 350.0  # FlashAttention-2 through SDPA, forward and backward


def part_seconds(part: dict, dev: Device) -> float:
    """Step time of one part of a cost-model result (its "summary"-like dict)."""
    flops = part["gemm_flops"]
    return (flops.get("bfloat16", 0) / (dev.bf16_tflops * 1e12) + flops.get("float32", 0) / (dev.fp32_tflops * 1e12)
            + part["traffic_bytes"] / (dev.hbm_tbps * 1e12) + part["kernels"] * dev.launch_us * 1e-6)


def fa2_seconds(config: dict, seq_len: int, batch_size: int, dev: Device) -> float:
    """Causal attention of every sublayer as FlashAttention-2, forward and backward."""
    n_attn = 2 * config["n_layer"] if config["head_type"] == "shga" else config["n_layer"]
    gated = config["head_type"] == "shga"
    n_q = config["n_head"] if gated else config["d_model"] // config["d_k"]
    d_v = config["d_v"] if gated else config["d_k"]
    forward = batch_size * n_q * seq_len**2 * (config["d_k"] + d_v)  # 2 T^2 (D_k + D_v) / 2, causal
    return n_attn * 3.5 * forward / (dev.fa2_tflops * 1e12) + n_attn * 2 * dev.launch_us * 1e-6


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of a + b T through two measured (T, seconds) points."""
    (t0, s0), (t1, s1) = points
    b = (s1 - s0) / (t1 - t0)
    return s0 - b * t0, b


def estimate(results: list[dict], dev: Device = Device(), lengths=(8192, 32768, 131072)) -> dict:
    """tvq vs the dense model from cost-model results of one config at two sequence lengths (train mode)."""
    if len(results) != 2 or any(r["meta"]["mode"] != "train" for r in results):
        raise ValueError("estimate needs the cost model's training results at two sequence lengths")
    config, batch = results[0]["meta"]["config"], results[0]["meta"]["batch_size"]
    pts = {part: [(r["meta"]["seq_len"], part_seconds(r["parts"][part], dev)) for r in results]
           for part in ("attention", "rest")}
    if pts["rest"][0][0] == pts["rest"][1][0]:
        raise ValueError("estimate needs two different sequence lengths")
    fits = {part: _fit(p) for part, p in pts.items()}

    def tvq(T):
        return sum(a + b * T for a, b in fits.values())

    def dense(T):
        a, b = fits["rest"]
        return a + b * T + fa2_seconds(config, T, batch, dev)

    lo, hi = 1, 1 << 24  # the first length where tvq is faster (dense grows as T^2: once faster, always)
    if tvq(hi) >= dense(hi):
        crossover = None
    elif tvq(lo) < dense(lo):
        crossover = lo
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if tvq(mid) >= dense(mid) else (lo, mid)
        crossover = hi
    return {
        "what": "roofline estimate of a training step on a GPU from cost-model counts (see tvq.bench.roofline)",
        "device": asdict(dev), "config": config, "batch_size": batch,
        "measured_lengths": [p[0] for p in pts["rest"]],
        "crossover_tokens": crossover,
        "at": {str(T): {"tvq_ms": tvq(T) * 1e3, "dense_fa2_ms": dense(T) * 1e3, "speedup": dense(T) / tvq(T)}
               for T in lengths},
    }


# the assumptions varied by :func:`spread`: each around its default
SPREAD = {"launch_us": (2.0, 4.0, 8.0), "hbm_tbps": (2.0, 2.6, 3.0), "fa2_tflops": (300.0, 350.0, 450.0),
          "bf16_tflops": (500.0, 650.0)}


def spread(results: list[dict]) -> dict:
    """The crossover over every combination of the :data:`SPREAD` assumptions: min, median, max (None: never)."""
    import itertools

    found = []
    for values in itertools.product(*SPREAD.values()):
        found.append(estimate(results, Device(**dict(zip(SPREAD, values))))["crossover_tokens"])
    known = sorted(t for t in found if t is not None)
    return {"assumptions": {k: list(v) for k, v in SPREAD.items()}, "combinations": len(found),
            "never": len(found) - len(known), "min": known[0] if known else None,
            "median": known[len(known) // 2] if known else None, "max": known[-1] if known else None}


def main(argv: list[str] | None = None) -> int:
    from tvq.bench.cost import PRESETS, measure_many, preset_config

    p = argparse.ArgumentParser(prog="python -m tvq.bench.roofline", description=(
        "Where tvq overtakes FlashAttention-2 on a GPU: a roofline estimate from the cost model's counts."))
    p.add_argument("--preset", default="enwik8", choices=sorted(PRESETS))
    p.add_argument("--lengths", type=int_range(1), nargs=2, default=[8192, 32768], metavar=("T0", "T1"),
                   help="the two training lengths measured (default 8192 32768)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.lengths[0] == args.lengths[1]:
        p.error("--lengths must be two different lengths")
    cfg = preset_config(args.preset)
    results = measure_many([dict(config=cfg, seq_len=T, mode="train") for T in args.lengths])
    est = estimate(results)
    est["preset"] = args.preset
    est["crossover_spread"] = spread(results)
    print(f"tvq vs FlashAttention-2 ({args.preset}, roofline from counts; assumptions: {est['device']})")
    sp = est["crossover_spread"]
    print(f"  crossover: {est['crossover_tokens'] or 'none below 16M'} tokens (over {sp['combinations']} variations "
          f"of the assumptions: {sp['min']}-{sp['max']}, median {sp['median']}, never in {sp['never']})")
    for T, row in est["at"].items():
        print(f"  {int(T):>8,} tokens  tvq {row['tvq_ms']:9.1f} ms  dense {row['dense_fa2_ms']:9.1f} ms  "
              f"speedup {row['speedup']:.2f}x")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(est, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
