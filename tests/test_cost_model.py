"""The GPU cost model (tvq.bench.cost): counts of one training / decode step on fake CUDA tensors, on a CPU.

All measurements run in one child process (module fixture) at a tiny shape: a few seconds. The counts are
exact and deterministic (no timing is involved), so the checks compare them with each other and with
figures computed from the shapes.
"""

from __future__ import annotations

import json

import pytest

from tvq.bench import cost
from tvq.config import TransformerVQConfig

TINY = dict(vocab_size=64, d_model=32, d_k=8, d_v=16, n_head=1, n_layer=1, n_code=16, block_len=16, mem_len=16)
T = 64


def tiny(**changes) -> TransformerVQConfig:
    return TransformerVQConfig(**{**TINY, **changes})


SPECS = {
    "train1": dict(config=tiny(), seq_len=T, mode="train", top=200),
    "train1_again": dict(config=tiny(), seq_len=T, mode="train", top=200),
    "train2": dict(config=tiny(n_layer=2), seq_len=T, mode="train", top=200),
    "train1_fp32": dict(config=tiny(), seq_len=T, mode="train", amp=False),
    "train2_log": dict(config=tiny(n_layer=2), seq_len=T, mode="train", log_step=True),
    "train2_deterministic": dict(config=tiny(n_layer=2), seq_len=T, mode="train", deterministic=True),
    # the PyTorch path (the others take the Triton kernels where Triton is installed, as on a GPU)
    "train1_torch": dict(config=tiny(), seq_len=T, mode="train", kernels=False, top=100),
    "train2_torch": dict(config=tiny(n_layer=2), seq_len=T, mode="train", kernels=False),
    "train2_deterministic_torch": dict(config=tiny(n_layer=2), seq_len=T, mode="train", deterministic=True,
                                       kernels=False),
    "decode1": dict(config=tiny(), seq_len=1000, mode="decode", decode_steps=2),
    "decode2": dict(config=tiny(n_layer=2), seq_len=1000, mode="decode", decode_steps=2),
}


@pytest.fixture(scope="module")
def results() -> dict:
    try:
        out = cost.measure_many(list(SPECS.values()), timeout=600)
    except RuntimeError as e:
        if "C++ compiler" in str(e):
            pytest.skip(str(e))
        raise
    return dict(zip(SPECS, out))


def without_timing(r: dict) -> dict:
    r = json.loads(json.dumps(r))
    r["meta"].pop("seconds")
    return r


def test_result_has_every_field(results):
    r = results["train1"]
    for key in ("meta", "summary", "phases", "per_sublayer", "syncs", "ops_by_count", "ops_by_bytes", "gemms",
                "sublayer_ops_by_count", "kernels_by_site", "views", "allocations"):
        assert key in r, key
    phase, op, site, n = r["kernels_by_site"][0]  # the site that runs most kernels
    assert phase in r["phases"] and op.startswith(("aten.", "tvq")) and site and n >= 1
    for key in ("kernels", "kernels_per_step", "gemm_flops", "gemm_flops_total", "fp32_share", "operand_bytes",
                "operand_bytes_per_token", "traffic_bytes_per_token", "syncs", "syncs_per_step",
                "saved_for_backward_bytes", "saved_for_backward_bytes_per_token", "tokens"):
        assert key in r["summary"], key
    assert set(r["phases"]) == {"forward", "backward", "update"}
    for key in ("kernels", "operand_bytes_per_token", "traffic_bytes_per_token", "fp32_share", "gemm_flops"):
        assert key in r["per_sublayer"]["total"], key
    for key in ("config", "mode", "seq_len", "batch_size", "amp", "excluded_views", "special_cases", "inductor"):
        assert key in r["meta"], key
    assert set(results["decode1"]["phases"]) == {"decode"}
    json.dumps(r)  # plain JSON


def test_counts_are_deterministic(results):
    assert without_timing(results["train1"]) == without_timing(results["train1_again"])


def test_numbers_are_in_range(results):
    for name, r in results.items():
        s = r["summary"]
        assert 0.0 <= s["fp32_share"] <= 1.0, name
        assert isinstance(s["syncs"], int) and s["syncs"] >= 0, name
        assert s["kernels"] > 0 and s["operand_bytes"] > 0 and s["gemm_flops_total"] > 0, name
        assert sum(s["gemm_flops"].values()) == s["gemm_flops_total"], name
        assert 0 < s["traffic_bytes"] <= s["operand_bytes"], name  # indexing ops count the rows they touch
    s = results["train1"]["summary"]
    assert 0.0 < s["fp32_share"] < 1.0  # under autocast: bf16 products; the head and the VQ distance in float32
    assert s["gemm_flops"]["bfloat16"] > 0
    assert s["saved_for_backward_bytes_per_token"] > 0


def test_without_autocast_every_gemm_is_float32(results):
    s = results["train1_fp32"]["summary"]
    assert s["fp32_share"] == 1.0 and set(s["gemm_flops"]) == {"float32"}
    # the same GEMMs as under autocast
    assert s["gemm_flops_total"] == results["train1"]["summary"]["gemm_flops_total"]


def test_kernels_scale_with_the_number_of_sublayers(results):
    one, two = results["train1"], results["train2"]
    assert one["meta"]["n_attn"] == 2 and two["meta"]["n_attn"] == 4
    k1, k2 = one["per_sublayer"]["total"]["kernels"], two["per_sublayer"]["total"]["kernels"]
    assert k1 > 30  # every sublayer op is counted (the kernel path: 36 launches a sublayer)
    assert abs(k2 - k1) <= 0.02 * k1  # every sublayer runs the same ops
    in_sublayers = [r["per_sublayer"]["total"]["kernels"] * r["meta"]["n_attn"] for r in (one, two)]
    assert 1.95 <= in_sublayers[1] / in_sublayers[0] <= 2.05
    # outside the sublayers the codebook update runs multi-tensor ops over all the quantizers and the initial
    # state one zero fill per dtype, so neither grows with the sublayers; each sublayer adds a few ops made
    # outside its forward (the commitment loss sum: 1 add); the embedding, head, loss and input checks do not grow
    out1, out2 = (r["per_sublayer"]["outside_sublayers"]["kernels"] for r in (one, two))
    upd1, upd2 = (r["phases"]["update"]["kernels"] for r in (one, two))
    assert upd2 == upd1
    zeros = [sum(n for _, op, site, n in r["kernels_by_site"]
                 if op == "aten.zeros" and site.startswith("tvq/state.py")) for r in (one, two)]
    assert zeros[0] == zeros[1] <= 3  # keys and values, codes, the cache: one fill per dtype
    assert 0 <= out2 - out1 <= 8 * 2
    assert two["summary"]["kernels"] > 1.5 * one["summary"]["kernels"]  # the sublayers' launches are most of a step
    d1, d2 = results["decode1"], results["decode2"]
    assert abs(d2["per_sublayer"]["total"]["kernels"] - d1["per_sublayer"]["total"]["kernels"]) <= 1


def test_training_gemm_flops_cover_three_head_products(results):
    r = results["train1"]
    cfg = r["meta"]["config"]
    head = 2 * T * cfg["d_model"] * cfg["vocab_size"]  # the lm head's forward product
    assert r["summary"]["gemm_flops_total"] >= 3 * head  # forward, and two products in backward
    # outside the sublayers: the head in float32 by design (exactly those three products) and, at the end of the
    # forward, every sublayer's codebook statistics in one batch (the per-code sums' one-hot products, bf16 keys)
    stats = 2 * r["meta"]["n_attn"] * cfg["n_head"] * T * cfg["n_code"] * cfg["d_k"]
    want = {"float32": 3 * head} | ({"bfloat16": stats} if r["meta"]["kernels"] else {})  # (else a scatter-add)
    assert r["per_sublayer"]["outside_sublayers"]["gemm_flops"] == want


def test_under_autocast_only_the_vq_distance_is_float32_in_a_sublayer(results):
    """Issue 24, item 2: the window product, the cache read (forward and backward) and every projection run in
    bf16; the code assignment's distance (no gradient) stays float32 so that codes are the fp32 argmin."""
    for name in ("train1", "train2", "train2_deterministic"):
        r = results[name]
        cfg = r["meta"]["config"]
        distance = 2 * T * cfg["n_code"] * cfg["d_k"] * cfg["n_head"]  # (T, D_k) x (D_k, S) per head, B = 1
        per = r["per_sublayer"]["total"]["gemm_flops"]
        assert per["float32"] == distance, name
        assert per["bfloat16"] > 20 * distance, name


def test_deterministic_mode_runs_no_float_cumsum(results):
    """CUDA has no deterministic float cumsum (torch raises in deterministic mode): the counts of the blockwise
    path are integers, and the cache read goes block by block (issue 24, item 5). The default path does use
    a float cumsum (chunks of caches at once), so the count is live. The Triton scan needs none either."""
    special = {name: r["meta"]["special_cases"] for name, r in results.items()}
    assert special["train2_torch"].get(cost.NONDETERMINISTIC_CUMSUM, 0) > 0
    names = ["train2_deterministic_torch", "train2_deterministic"] + (["train2"] if results["train2"]["meta"]["kernels"]
                                                                      else [])
    for name in names:
        assert special[name].get(cost.NONDETERMINISTIC_CUMSUM, 0) == 0, name
        assert results[name]["summary"]["syncs"] == 0, name
    assert results["train2_deterministic"]["meta"]["deterministic"] is True


def test_a_training_step_never_waits_for_the_device(results):
    """Forward (input checks included), backward and the codebook update read nothing back (issue 24, item 3);
    a logging step reads the codebook metrics: one .tolist() for all sublayers."""
    for name in ("train1", "train2"):
        assert results[name]["summary"]["syncs"] == 0, results[name]["syncs"]
    r = results["train2_log"]
    assert r["summary"]["syncs"] == 1
    (site,) = r["syncs"]
    assert site["kind"] == ".tolist()" and site["phase"] == "update" and "layers/vq.py" in site["site"], site
    assert r["summary"]["syncs"] == sum(p["syncs"] for p in r["phases"].values())


def test_decode_step(results):
    r = results["decode1"]
    s = r["summary"]
    assert r["meta"]["position"] == 1000 and s["steps"] == 2 and s["tokens"] == 2
    assert s["syncs"] == 0
    assert s["kernels_per_step"] == s["kernels"] / 2
    assert r["per_sublayer"]["total"]["kernels"] > 20
    assert s["gemm_flops"].get("bfloat16", 0) > 0  # the projections run under autocast
    assert s["traffic_bytes"] < s["operand_bytes"]  # a step reads and writes single rows of its buffers


def test_the_custom_ops_run_their_device_code(results):
    special = results["train1_torch"]["meta"]["special_cases"]
    assert results["train1_torch"]["meta"]["kernels"] is False
    assert special.get("tvq.cache_read run op by op", 0) == 2
    assert special.get("tvq.cache_read_backward run op by op", 0) == 2


def test_the_triton_kernels_count_as_one_kernel_each(results):
    """With Triton installed a CUDA step takes the fused kernels (tvq.ops.kernels): each launch is one kernel with
    its registered GEMM FLOPs, the step has fewer kernels and moves fewer bytes than the PyTorch path, and its
    GEMM FLOPs within a factor of two of the PyTorch path's (the two paths split the products differently)."""
    from tvq.ops.kernels import HAVE_TRITON

    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    kern, torch_ = results["train1"], results["train1_torch"]
    assert kern["meta"]["kernels"] is True
    ops = {name: n for name, n, _ in kern["ops_by_count"]}  # rows: op, count, bytes
    for op in ("tvq_kernels.window_scores", "tvq_kernels.window_scores_backward", "tvq_kernels.cache_scan_fold",
               "tvq_kernels.cache_scan_backward", "tvq_kernels.window_join", "tvq_kernels.vq_quantize",
               "tvq_kernels.vq_quantize_backward", "tvq_kernels.window_values_gated",
               "tvq_kernels.window_values_grad_weights_gated"):
        assert ops.get(op, 0) >= 1, op
    for op in ("tvq_kernels.cache_fold", "tvq_kernels.silu_gate", "tvq_kernels.silu_gate_backward",
               "tvq_kernels.block_counts"):
        assert op not in ops, op  # the scan folds the state's cache, the value kernels apply the gate, the key
        # list's launch counts the blocks' codes
    assert "tvq.cache_read run op by op" not in kern["meta"]["special_cases"]
    sub = {name for name, _, _ in kern["sublayer_ops_by_count"]}
    for op in ("tvq_kernels.residual_norm", "tvq_kernels.residual_norm_backward"):
        assert op in sub, op  # the residual add joined with the next sublayer's norm
    for op in ("aten.mean", "aten.sum", "aten._foreach_copy_"):
        assert op not in sub, op  # the commitment mean, the biases' and norms' partial sums and the weights'
        # gradient cast happen inside other launches (the weights are cast once per model forward: outside)
    a, b = kern["per_sublayer"]["total"], torch_["per_sublayer"]["total"]
    assert a["kernels"] < b["kernels"] and a["operand_bytes"] < b["operand_bytes"]
    # launches bound the step on a GPU at 8k (benchmarks/README.md, fifth round): 32 per sublayer at this shape
    # since the eleventh round (238 on the PyTorch path); a change that adds launches must say so here
    assert a["kernels"] <= 32
    fa, fb = sum(a["gemm_flops"].values()), sum(b["gemm_flops"].values())
    assert 0.5 * fb < fa < 2 * fb


def test_kernel_ops_are_placed_by_their_callers(results):
    """A kernel op's site is the line that called it (KernelOp's dispatch is skipped), so the parts split puts the
    sublayer's own kernels (norms, gate, residual) in "rest", which the dense model keeps, and the attention core's
    in "attention", which FlashAttention replaces (the roofline's comparison)."""
    from tvq.ops.kernels import HAVE_TRITON

    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    rows = [(op, site) for _, op, site, _ in results["train1"]["kernels_by_site"] if op.startswith("tvq_kernels.")]
    assert rows and not any("kernels/__init__.py" in site for _, site in rows)
    rest = {"tvq_kernels.rms_norm", "tvq_kernels.residual_dropout", "tvq_kernels.gau_activation",
            "tvq_kernels.gau_activation_norm", "tvq_kernels.silu_gate", "tvq_kernels.residual_norm"}
    for op, site in rows:
        assert any(m in site for m in cost.REST_MODULES) == (op.removesuffix("_backward") in rest), (op, site)
    # the projections' GEMMs (a dense model has them too) are "rest", wherever the cast weights' GEMM runs
    gemm_sites = [site for _, op, site, _ in results["train1"]["kernels_by_site"] if op == "aten.mm"]
    assert any("tvq/ops/linear.py" in site for site in gemm_sites)
    assert results["train1"]["parts"]["rest"]["kernels"] > results["train1"]["meta"]["n_attn"] * 6


def test_presets_match_the_training_and_bench_presets():
    from tvq.bench.args import BENCH_PRESETS
    from tvq.training.config import PRESETS

    assert cost.PRESETS["enwik8"] == PRESETS["enwik8"]["model"]
    assert cost.PRESETS["enwik8-nodrop"] == BENCH_PRESETS["enwik8"]
    assert cost.PRESETS["bench-small"] == BENCH_PRESETS["bench-small"]


def test_bad_requests_are_refused_before_any_child_runs():
    with pytest.raises(ValueError, match="attention='vq'"):
        cost.measure(tiny(attention="full"), 64)
    with pytest.raises(ValueError, match="mode"):
        cost.measure(tiny(), 64, mode="prefill")
    with pytest.raises(ValueError, match="seq_len"):
        cost.measure(tiny(), 0)
    with pytest.raises(SystemExit):
        cost.main(["--preset", "nonesuch"])


def test_table_formats(results):
    for name in ("train1", "decode1"):
        text = cost.format_table(results[name])
        assert "not timings" in text and "fp32 share" in text


def test_a_fill_counts_only_what_it_writes():
    """new_zeros reads nothing of the tensor it is called on (its dtype and device only), zero_ only writes."""
    import torch

    x = torch.ones(1000)  # 4,000 bytes
    rec = cost._make_recorder()
    with rec:
        x.new_zeros(10)
        torch.zeros_like(x).zero_()
        x + x
    ops = rec.phases["setup"].op_bytes
    assert ops["aten.new_zeros"] == 40 and ops["aten.zeros_like"] == 4000 and ops["aten.zero_"] == 4000
    assert ops["aten.add"] == 12000


def test_a_copy_counts_its_source_read_and_its_destination_written():
    """copy_ and _foreach_copy_ read the source and write the destination, which they do not read."""
    import torch

    src, dst = torch.ones(1000), torch.empty(1000, dtype=torch.float16)  # 4,000 and 2,000 bytes
    rec = cost._make_recorder()
    with rec:
        dst.copy_(src)
        torch._foreach_copy_([dst, dst], [src, src])
    ops = rec.phases["setup"].op_bytes
    assert ops["aten.copy_"] == 6000 and ops["aten._foreach_copy_"] == 12000
