"""The ahead-of-time GPU compile of the kernel path (tvq.bench.gpu_compile): every Triton launch of a tiny model's bf16
training and decode steps compiles for sm_90 with Triton's own compiler and ptxas (the interpreter the other kernel
tests run in accepts programs the compiler rejects), and a kernel the compiler rejects is reported. In a child
process: the tests' TRITON_INTERPRET=1 (conftest) would make every kernel an interpreted function."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

SRC = str(Path(__file__).resolve().parents[1] / "src")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not PTXAS.is_file(), reason="this triton has no bundled ptxas")


def run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def test_the_kernel_path_compiles_for_sm90(tmp_path):
    out = tmp_path / "compile.json"
    proc = run(["-m", "tvq.bench.gpu_compile", "--quick", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == [] and result["archs"] == [90]
    kernels = {e["kernel"].rsplit(".", 2)[-2] for e in result["variants"]}
    # every family of kernels a training step and a decode step launch
    assert {"scores", "cache_scan", "window_values", "window_join", "code_sums", "vq_codes", "query_bias", "gate",
            "rms_norm", "residual"} <= kernels
    assert all(e["registers"] > 0 and e["shared_bytes"] >= 0 for e in result["variants"])


def test_a_kernel_the_compiler_rejects_is_reported(tmp_path):
    """A variable given tiles of two shapes in the two branches of an ``if``: the interpreter runs it, the compiler
    does not (the bug the first version of the GAU activation's fused norm had)."""
    script = tmp_path / "bad.py"
    script.write_text(textwrap.dedent('''
        import json
        import torch
        import triton
        import triton.language as tl
        from tvq.bench.gpu_compile import _Compiler

        @triton.jit
        def two_tiles_kernel(x_ptr, n):
            pid = tl.program_id(0)
            if pid < n:
                i = tl.arange(0, 8)
            else:
                i = tl.arange(0, 16)
            tl.store(x_ptr + i, tl.load(x_ptr + i) + 1.0)

        @triton.jit
        def fine_kernel(x_ptr, n, B: tl.constexpr):
            i = tl.arange(0, B)
            tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2.0, mask=i < n)

        compiler = _Compiler([90])
        with compiler.active():
            x = torch.zeros(16)
            two_tiles_kernel[(2,)](x, 1)
            fine_kernel[(1,)](x, 16, B=16)
            fine_kernel[(1,)](x, 16, B=16)  # the same variant: compiled once, counted twice
        print(json.dumps(list(compiler.variants.values())))
    '''))
    proc = run([str(script)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    variants = {e["kernel"].rsplit(".", 1)[-1]: e for e in json.loads(proc.stdout.splitlines()[-1])}
    assert "Mismatched type" in variants["two_tiles_kernel"]["error"]
    fine = variants["fine_kernel"]
    assert "error" not in fine and fine["launches"] == 2 and fine["constexprs"] == {"B": 16}
    assert fine["signature"] == {"x_ptr": "*fp32", "n": "i32"}
