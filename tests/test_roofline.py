"""tvq.bench.roofline: the step-time model and the crossover, on hand-made counts."""

from __future__ import annotations

import pytest

from tvq.bench.roofline import SPREAD, Device, estimate, fa2_seconds, part_seconds, spread

CONFIG = dict(head_type="shga", n_layer=1, n_head=1, d_model=8, d_k=2, d_v=6)
DEV = Device(bf16_tflops=1e-12, fp32_tflops=0.5e-12, hbm_tbps=1e-12, launch_us=1e6, fa2_tflops=1e-12)  # 1 s units


def part(T, k=1.0):
    """A part whose counts grow linearly in T: k T bf16 FLOPs, T fp32 FLOPs, 2 T bytes, one kernel."""
    return {"gemm_flops": {"bfloat16": k * T, "float32": T}, "traffic_bytes": 2 * T, "kernels": 1}


def result(T):
    return {"meta": {"mode": "train", "seq_len": T, "config": CONFIG, "batch_size": 1},
            "parts": {"attention": part(T), "rest": part(T, k=3.0)}}


def test_part_seconds_adds_flops_bytes_and_launches():
    assert part_seconds(part(10), DEV) == pytest.approx(10 + 2 * 10 + 2 * 10 + 1)


def test_fa2_counts_causal_forward_and_backward():
    # 2 GAUs x 3.5 x T^2 (D_k + D_v) FLOPs at 1 FLOP/s, plus 2 kernels each
    assert fa2_seconds(CONFIG, 10, 1, DEV) == pytest.approx(2 * 3.5 * 100 * 8 + 4)


def test_crossover_is_where_the_quadratic_dense_attention_costs_more():
    # tvq: attention 5 T + 1 plus rest 7 T + 1; dense: rest 7 T + 1 plus FlashAttention 56 T^2 / rate + 4
    slow = Device(bf16_tflops=1e-12, fp32_tflops=0.5e-12, hbm_tbps=1e-12, launch_us=1e6, fa2_tflops=1e-6)
    est = estimate([result(100), result(400)], slow, lengths=(1000,))
    tvq, dense = (lambda T: 12 * T + 2), (lambda T: 7 * T + 1 + 56e-6 * T**2 + 4)
    T = est["crossover_tokens"]
    assert tvq(T) < dense(T) and tvq(T - 1) >= dense(T - 1) and 80_000 < T < 100_000
    assert est["at"]["1000"]["speedup"] == pytest.approx(dense(1000) / tvq(1000))
    assert estimate([result(100), result(400)], DEV)["crossover_tokens"] == 1  # attention at 1 FLOP/s: faster at once
    never = Device(bf16_tflops=1e-12, fp32_tflops=0.5e-12, hbm_tbps=1e-12, launch_us=1e6, fa2_tflops=1e30)
    assert estimate([result(100), result(400)], never)["crossover_tokens"] is None


def test_estimate_needs_two_training_lengths():
    with pytest.raises(ValueError, match="two"):
        estimate([result(100)])
    with pytest.raises(ValueError, match="two different"):
        estimate([result(100), result(100)])


def test_spread_covers_every_combination_of_the_assumptions():
    sp = spread([result(100), result(400)])
    n = 1
    for values in SPREAD.values():
        n *= len(values)
    assert sp["combinations"] == n and sp["never"] == 0 and sp["min"] <= sp["median"] <= sp["max"]
