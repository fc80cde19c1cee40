"""Host time of a training step on the Triton path with no kernel run: what calling the kernel ops costs (issue 25).

The first GPU run found the 8k enwik8 training step host-bound (~60 us of host time per launch, the GPU busy 30% of
the step). Part of each Triton op's host time is the torch.library dispatcher's round trip through a boxed Python
kernel, which :class:`tvq.ops.kernels.KernelOp` skips in plain eager mode. This measures, on a CPU, the host time of
whole training steps (forward with labels under float32, backward, ``update_codebooks``) on the kernel path with
every Triton launch made a no-op (Triton's interpreter with its ``run`` stubbed: no kernel executes, integer
arguments are zeroed so that codes stay valid indices, other outputs hold whatever memory held), so that what is
timed is tvq's and PyTorch's Python, the dispatcher and the aten ops at a tiny shape. Each step runs once with the
kernel ops called directly (``tvq.ops.kernels.DIRECT = True``, the default) and once through the dispatcher
(``False``), alternating, so that both see the same machine; medians and the spread over ``--steps`` pairs, for
each ``--layers`` count (the saving per call should not depend on it).

    PYTHONPATH=src python benchmarks/host_overhead.py --json benchmarks/results/host_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from tvq.config import TransformerVQConfig  # noqa: E402
from tvq.models.transformer_vq import TransformerVQ  # noqa: E402
from tvq.ops import kernels  # noqa: E402

TINY = dict(vocab_size=256, d_model=64, d_k=16, d_v=128, n_head=1, n_code=32, block_len=64, mem_len=64)


def _no_launch(self, *args, grid=None, warmup=False, **kwargs):
    """InterpretedFunction.run without running the kernel: integer tensors zeroed (codes stay in range)."""
    for a in args:
        if isinstance(a, torch.Tensor) and not a.is_floating_point():
            a.data.zero_()  # .data: no version bump (autograd saved some of them)


def _calls() -> dict:
    """KernelOp calls, counted by name."""
    counts: dict[str, int] = {}
    original = kernels.KernelOp.__call__

    def counting(self, *args, **kwargs):
        counts[self.__name__] = counts.get(self.__name__, 0) + 1
        return original(self, *args, **kwargs)

    return counts, counting, original


def measure(n_layer: int, seq_len: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = TransformerVQ(TransformerVQConfig(**TINY, n_layer=n_layer)).train()
    ids = torch.randint(0, TINY["vocab_size"], (1, seq_len))

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        model.update_codebooks()

    counts, counting, original = _calls()
    times = {True: [], False: []}
    with kernels.use_kernels(True):
        kernels.KernelOp.__call__ = counting
        try:
            step()  # counted once
        finally:
            kernels.KernelOp.__call__ = original
        for i in range(warmup + steps):
            for direct in (True, False) if i % 2 == 0 else (False, True):
                kernels.DIRECT = direct
                t = time.perf_counter()
                step()
                if i >= warmup:
                    times[direct].append(time.perf_counter() - t)
        kernels.DIRECT = True
    calls = sum(counts.values())
    med = {d: statistics.median(v) for d, v in times.items()}
    diffs = sorted(b - a for a, b in zip(times[True], times[False]))  # per pair: through the dispatcher - direct
    return {
        "n_layer": n_layer, "seq_len": seq_len, "kernel_op_calls_per_step": calls, "calls_by_op": counts,
        "step_ms": {"direct": [round(x * 1e3, 3) for x in times[True]],
                    "dispatcher": [round(x * 1e3, 3) for x in times[False]]},
        "median_ms": {"direct": round(med[True] * 1e3, 3), "dispatcher": round(med[False] * 1e3, 3)},
        "saved_us_per_call": {"median": round(statistics.median(diffs) / calls * 1e6, 2),
                              "min": round(diffs[0] / calls * 1e6, 2), "max": round(diffs[-1] / calls * 1e6, 2)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    InterpretedFunction.run = _no_launch
    load = os.getloadavg()
    results = [measure(n, args.seq_len, args.steps, args.warmup) for n in args.layers]
    out = {"what": "host time of a training step on the kernel path, Triton launches made no-ops (CPU, float32, "
                   "1 thread): kernel ops called directly vs through the torch.library dispatcher",
           "command": " ".join(["python", "benchmarks/host_overhead.py", *(argv or sys.argv[1:])]),
           "config": TINY, "torch": torch.__version__, "load_before": load, "load_after": os.getloadavg(),
           "results": results}
    for r in results:
        s = r["saved_us_per_call"]
        print(f"n_layer {r['n_layer']}: {r['kernel_op_calls_per_step']} kernel-op calls a step; step "
              f"{r['median_ms']['direct']} ms direct, {r['median_ms']['dispatcher']} ms through the dispatcher; "
              f"saved per call {s['median']} us (pairs: {s['min']} to {s['max']})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
