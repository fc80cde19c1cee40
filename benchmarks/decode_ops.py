"""Ops per decode token, eager and compiled, measured on a CPU (issue 24, item 4).

One step of :class:`tvq.models.decoding.VQDecoder` (the step and its state write, as ``compile=True``
compiles it and ``cuda_graph=True`` captures it) at position ``--pos``, B = 1, in ``--dtype``:

- eager: aten ops that launch work (views and bare allocations excluded, as in ``tvq.bench.cost``), and
  the dtype casts among them;
- compiled: the same step through ``torch.compile(fullgraph=True)`` as inductor generates it for the CPU:
  fused C++ kernels + extern GEMM calls + aten fallbacks called by the wrapper, per token; inductor's IR
  nodes before fusion (an upper bound for any backend's fusion); and
  the largest flat loop of a generated kernel against one sublayer's key or value buffer (the state
  written in place, row by row: no kernel copies a whole buffer).

Inductor generates Triton kernels for CUDA tensors, which needs a GPU; Triton fuses reductions of
different sizes less than the C++ backend does, so the CUDA kernel count lies between the CPU count and
the pre-fusion count. Usage (bench-small: ~1 minute on the 2-core machine, mostly compiling):

    PYTHONPATH=src python benchmarks/decode_ops.py --preset bench-small --dtype bfloat16 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch._inductor import metrics
from torch._inductor.utils import run_and_get_code
from torch.utils._python_dispatch import TorchDispatchMode

from tvq.bench.cost import ALLOCATIONS, PRESETS, VIEW_LIKE, preset_config
from tvq.models import decoding
from tvq.models.transformer_vq import TransformerVQ


class _Count(TorchDispatchMode):
    """Counts the aten ops that launch work (by name) and the dtype casts."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"aten.{func._schema.name.removeprefix('aten::')}"
        if name not in VIEW_LIKE and name not in ALLOCATIONS:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _args(dec):
    return (decoding._model_step, dec._dims, dec._weights, dec.keys, dec.values, dec.means, dec.codes, dec.count,
            dec.log_count, dec._tokens, dec._pos, dec.start)


def _wrapper_calls(code: str) -> dict[str, int]:
    """Kernel launches in the generated wrapper's ``call``: fused kernels, extern kernels, aten fallbacks."""
    call = code[code.index("def call("):]
    fused = re.findall(r"^\s+(cpp_fused_\w+)\(", call, re.M)
    extern = re.findall(r"^\s+(?:\w+ = )?(extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?|aten\.\w+(?:\.\w+)?)\(",
                        call, re.M)
    out = {"fused": len(fused)}
    for name in extern:
        out[name] = out.get(name, 0) + 1
    return out


def measure(preset: str, dtype: torch.dtype, pos: int, steps: int = 3) -> dict:
    torch.manual_seed(0)
    cfg = preset_config(preset)
    model = TransformerVQ(cfg).eval()
    state = model.initial_state(1)
    state.pos = pos  # the state of a context of pos tokens (its contents do not change the counts)
    dec = model.decoder(state, dtype=dtype, cuda_graph=False)
    tokens = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        dec.step(tokens)
        count = _Count()
        with count:
            dec.step(tokens)
    eager = sum(count.ops.values())

    step = torch.compile(decoding._decode_step_, fullgraph=True)
    metrics.reset()
    t0 = time.perf_counter()
    with torch.no_grad():
        _, codes = run_and_get_code(step, *_args(dec))
    compile_s = time.perf_counter() - t0
    pre_fusion = metrics.ir_nodes_pre_fusion
    calls = _wrapper_calls(codes[-1])
    loops = [int(n) for n in re.findall(r"x\d+<static_cast<int64_t>\((\d+)L\)", codes[-1])]
    window = min(dec.keys[0].numel(), dec.values[0].numel())  # one sublayer's key or value buffer
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            step(*_args(dec))
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    G = len(model.attns)
    compiled = sum(calls.values())
    return {
        "preset": preset, "config": PRESETS[preset], "dtype": str(dtype).removeprefix("torch."), "position": pos,
        "batch_size": 1, "attention_sublayers": G,
        "eager": {"ops_per_token": eager, "ops_per_sublayer": eager / G,
                  "casts_per_token": count.ops.get("aten._to_copy", 0),
                  "ops": dict(sorted(count.ops.items(), key=lambda kv: -kv[1]))},
        "compiled": {"kernels_per_token": compiled, "kernels_per_sublayer": compiled / G, "calls": calls,
                     "ir_nodes_pre_fusion": pre_fusion,
                     "largest_kernel_loop": max(loops, default=0), "key_or_value_buffer_per_sublayer": window,
                     "writes_in_place": max(loops, default=0) < window,
                     "compile_s": round(compile_s, 1), "cpu_step_ms": round(step_ms, 2)},
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench-small", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--pos", type=int, default=65_536)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    result = measure(args.preset, getattr(torch, args.dtype), args.pos)
    result["command"] = "PYTHONPATH=src python benchmarks/decode_ops.py " + " ".join(argv or sys.argv[1:])
    e, c = result["eager"], result["compiled"]
    print(f"{args.preset} {args.dtype} @ {args.pos}: eager {e['ops_per_token']} ops/token ({e['ops_per_sublayer']:.1f} "
          f"per sublayer, {e['casts_per_token']} casts); compiled {c['kernels_per_token']} kernels/token "
          f"({c['kernels_per_sublayer']:.1f} per sublayer; {c['ir_nodes_pre_fusion']} IR nodes before fusion), "
          f"rows written in place: {c['writes_in_place']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
