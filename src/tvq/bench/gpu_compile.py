"""Every Triton kernel launch of a model's steps compiled ahead of time for a GPU, on a machine without one.

Triton's interpreter, which the tests run the kernels in, accepts programs that Triton's compiler rejects (a variable
given tiles of two shapes in the two branches of an ``if``, for one) and says nothing of registers, spills or shared
memory. Here steps of small models run on the kernel path with :meth:`triton.runtime.jit.JITFunction.run` replaced:
each launch is bound and specialised by Triton's own binder and argument packing for the target's backend, as a
launch on that GPU would be, compiled by ``triton.compile`` for the target (the wheel's own ptxas), and not run.
Integer tensors among a launch's arguments are zeroed so that codes stay valid indices; every other output holds
whatever its memory held, which no host code here reads. Each distinct variant (kernel, signature, constexprs,
specialisation attributes, options) compiles once per target.

A workload is a model config, a dtype (``bf16`` / ``fp16``: autocast over float32 weights; ``fp32``) and what runs:
``train`` (two chunks, the second reading the carried state, with labels; backward; the codebook update) or ``decode``
(a prompt, then one-token steps). The result per variant (with the index of the workload that first made it): the error if the compile failed, else shared memory and
cuobjdump's resource usage of the cubin (registers per thread; the stack frame per thread, where ptxas puts
register spills). Kernels of :mod:`tvq.ops.kernels` that no workload launched are listed.

    python -m tvq.bench.gpu_compile --arch 90 --arch 80 --json benchmarks/results/gpu_compile/triton39.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import warnings

import torch

from tvq.config import TransformerVQConfig

TINY = dict(vocab_size=64, d_model=32, d_k=16, d_v=64, n_head=1, n_layer=1, n_code=16, block_len=16, mem_len=16)
# the paper's enwik8 sublayer widths (d_model 768, d_k 128, d_v 1536, S = L = M = 512), one layer
ENWIK8 = dict(vocab_size=256, d_model=768, d_k=128, d_v=1536, n_head=1, n_layer=1, n_code=512, block_len=512,
              mem_len=512)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def default_workloads() -> list[dict]:
    """The variants of the tiny model (head types, straight-through rules, the cache's gradient, dropout and
    LayerDrop, padding, the quadratic attention) in every dtype, and the enwik8 widths in bf16: training steps and
    decode steps."""
    tiny = [dict(), dict(head_type="mha", n_head=2), dict(head_type="mqa", n_head=2, d_ff=64),
            dict(straight_through="block", grad_thru_cache=False),
            dict(dropout_res=0.1, dropout_sin=0.1, layerdrop=0.1, cache_bias=True),
            dict(attn_impl="quadratic")]  # (its output gate is the gate's own kernel)
    out = [dict(config={**TINY, **c}, dtype=dt, mode="train", seq_len=48, padded=i == 0)
           for dt in DTYPES for i, c in enumerate(tiny)]
    out += [dict(config=TINY, dtype=dt, mode="decode", seq_len=40) for dt in DTYPES]
    # 2 x 2,048 tokens a chunk: the codebook statistics' walk over the keys splits (its reduction kernel launches too)
    out += [dict(config=ENWIK8, dtype="bf16", mode="train", seq_len=4096),
            dict(config=ENWIK8, dtype="bf16", mode="decode", seq_len=1028)]
    return out


def _all_kernels() -> list[str]:
    """Every ``@triton.jit`` kernel (a ``*_kernel`` name) of :mod:`tvq.ops.kernels`, as module.name."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    from tvq.ops import kernels

    out = []
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"{kernels.__name__}.{info.name}")
        out += [f"{mod.__name__}.{n}" for n, v in vars(mod).items()
                if isinstance(v, JITFunction) and n.endswith("_kernel") and v.module == mod.__name__]
    return sorted(out)


def _cuda_target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


class _Compiler:
    """Replaces ``JITFunction.run`` while active: compiles each new launch variant for every target."""

    def __init__(self, archs: list[int]):
        from triton.compiler import make_backend

        self.targets = [(arch, _cuda_target(arch)) for arch in archs]
        self.backends = {arch: make_backend(t) for arch, t in self.targets}
        self.variants: dict[str, dict] = {}
        self.binders: dict[tuple, object] = {}  # (kernel, arch) -> Triton's argument binder, made once
        self.workload = 0  # index of the workload running

    def run(self, fn, args, kwargs) -> None:
        import triton
        from triton import knobs
        from triton.compiler import ASTSource
        from triton.runtime.jit import create_function_from_signature

        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # as JITFunction.run sets them (3.6, 3.9)
            if hasattr(knobs.compilation, name):
                kwargs[name] = getattr(knobs.compilation, name)
        for arch, target in self.targets:
            backend = self.backends[arch]
            binder = self.binders.get((fn, arch))
            if binder is None:
                binder = self.binders[fn, arch] = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            key = repr((arch, fn.module, fn.__name__, signature, sorted(constexprs.items(), key=str),
                        sorted(attrs.items(), key=str), sorted(options.__dict__.items(), key=str)))
            if key in self.variants:
                self.variants[key]["launches"] += 1
                continue
            entry = {"kernel": f"{fn.module}.{fn.__name__}", "arch": arch, "workload": self.workload, "launches": 1,
                     "signature": {k: v for k, v in signature.items() if v != "constexpr"},
                     "constexprs": {fn.arg_names[p[0]] if len(p) == 1 else str(p): _plain(v)
                                    for p, v in constexprs.items()},
                     "num_warps": options.num_warps, "num_stages": options.num_stages}
            t = time.perf_counter()
            try:
                kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                        options=options.__dict__)
            except Exception as e:  # noqa: BLE001 - the compiler's error is the result
                entry["error"] = f"{type(e).__name__}: {e}"[-4000:]
            else:
                entry["shared_bytes"] = kernel.metadata.shared
                entry.update(_resources(kernel.asm["cubin"]))
            entry["compile_s"] = round(time.perf_counter() - t, 2)
            self.variants[key] = entry
        for a in args:
            if isinstance(a, torch.Tensor) and not (a.is_floating_point() or a.is_complex()):
                a.data.zero_()  # .data: no version bump (autograd saved some of them)

    @contextmanager
    def active(self):
        from triton.runtime.jit import JITFunction

        original = JITFunction.run
        compiler = self

        def run(self, *args, grid, warmup, **kwargs):
            compiler.run(self, args, kwargs)

        JITFunction.run = run
        try:
            yield self
        finally:
            JITFunction.run = original


def _plain(v):
    """A constexpr's value for JSON."""
    return v if isinstance(v, (bool, int, float, str, type(None))) else str(v)


def _cuobjdump() -> Path | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return path if path.is_file() else None


def _resources(cubin: bytes) -> dict:
    """Registers and local memory (bytes per thread) of a cubin's kernel, from cuobjdump's resource usage."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {"registers": int(found.get("REG", -1)), "stack_bytes": int(found.get("STACK", 0)),
            "local_bytes": int(found.get("LOCAL", 0))}


def _run_workload(w: dict) -> None:
    """One workload's steps on the kernel path (launches go to the active :class:`_Compiler`)."""
    from tvq.models.transformer_vq import TransformerVQ

    torch.manual_seed(0)
    model = TransformerVQ(TransformerVQConfig(**w["config"]))
    amp = DTYPES[w["dtype"]]
    V, T = model.config.vocab_size, w["seq_len"]
    ids = torch.randint(0, V, (2, T))
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        if w["mode"] == "train":
            model.train()
            half = T // 2
            mask = None
            if w.get("padded"):
                mask = torch.ones(2, half, dtype=torch.bool)
                mask[1, half - 3:] = False  # right padding in the second row
            first = model(ids[:, :half], labels=ids[:, :half], token_mask=mask)
            out = model(ids[:, half:], state=first.state, labels=ids[:, half:])
            (first.loss + out.loss).backward()
            model.update_codebooks()
        else:
            model.eval()
            with torch.no_grad():
                state = model(ids[:, : T - 4]).state
                dec = model.decoder(state)
                for i in range(T - 4, T):
                    dec.step(ids[:, i])


def compile_all(workloads: list[dict], archs: list[int]) -> dict:
    """Run ``workloads`` with every launch compiled for each arch (sm_<arch>): the variants, the errors and the
    resource figures."""
    import triton

    from tvq.ops import kernels

    if not kernels.HAVE_TRITON:
        raise RuntimeError("gpu_compile needs triton (pip install 'tvq[triton]')")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("gpu_compile compiles for a GPU: run it without TRITON_INTERPRET=1")
    compiler = _Compiler(archs)
    old = kernels._forced
    kernels._forced = True  # the kernel path on CPU tensors, whose launches compile and do not run
    t = time.perf_counter()
    try:
        with compiler.active(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # Triton 3.9's notice
            for i, w in enumerate(workloads):
                compiler.workload = i
                _run_workload(w)
    finally:
        kernels._forced = old
    variants = sorted(compiler.variants.values(), key=lambda e: (e["kernel"], e["arch"]))
    errors = [e for e in variants if "error" in e]
    ok = [e for e in variants if "error" not in e]
    spills = [e for e in ok if e.get("stack_bytes", 0) > 0]
    launched = {e["kernel"] for e in variants}
    return {
        "what": "every Triton launch of the workloads compiled ahead of time for sm_<arch> (not run): errors, "
                "registers and local memory (spills) per thread, shared memory per program",
        "triton": triton.__version__, "torch": torch.__version__, "archs": archs,
        "workloads": [f"{w['mode']} {w['dtype']} seq_len={w['seq_len']} {w['config']}" for w in workloads],
        "seconds": round(time.perf_counter() - t, 1),  # Triton's on-disk cache skips variants compiled before
        "summary": {"variants": len(variants), "kernels": len({e["kernel"] for e in variants}),
                    "errors": len(errors), "with_stack": len(spills),
                    "max_shared_bytes": max((e["shared_bytes"] for e in ok), default=0),
                    "max_registers": max((e.get("registers", 0) for e in ok), default=0)},
        "not_launched": [k for k in _all_kernels() if k not in launched],
        "errors": errors,
        "variants": variants,
    }


def format_summary(result: dict) -> str:
    s = result["summary"]
    lines = [f"triton {result['triton']}, sm_{'/sm_'.join(map(str, result['archs']))}: {s['variants']} variants of "
             f"{s['kernels']} kernels in {result['seconds']} s; {s['errors']} errors, {s['with_stack']} with a "
             f"stack frame (spills), shared <= {s['max_shared_bytes']} B, registers <= {s['max_registers']}"]
    for e in result["errors"]:
        lines.append(f"ERROR {e['kernel']} sm_{e['arch']} (workload {e['workload']}: "
                     f"{result['workloads'][e['workload']][:120]}): {e['error'].splitlines()[-1][:300]}")
    for e in result["variants"]:
        if e.get("stack_bytes", 0) > 0:
            lines.append(f"stack {e['stack_bytes']} B/thread, {e['registers']} registers: {e['kernel']} "
                         f"sm_{e['arch']} num_warps={e['num_warps']} ({result['workloads'][e['workload']][:120]})")
    if result["not_launched"]:
        lines.append("not launched by these workloads: " + ", ".join(result["not_launched"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tvq.bench.gpu_compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", default=None,
                   help="compute capability x10 to compile for (default: 90, H100/H200); repeat for several")
    p.add_argument("--quick", action="store_true", help="the tiny model's bf16 training and decode steps only")
    p.add_argument("--json", type=Path, default=None, help="write the full result here")
    args = p.parse_args(argv)
    workloads = default_workloads()
    if args.quick:
        workloads = [w for w in workloads if w["dtype"] == "bf16" and w["config"] == TINY]
    try:
        result = compile_all(workloads, args.arch or [90])
    except RuntimeError as e:
        print(f"gpu_compile: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result) + "\n")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
