"""tvq.ops.kernels.KernelOp: a kernel's launcher registered as a custom op, called directly in plain eager mode and
through the op wherever something looks at ops (a dispatch mode, FakeTensor, torch.compile, tensor subclasses,
``DIRECT`` off). A stand-in launcher (no Triton) is enough: what is tested is the routing."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tvq.ops import kernels


@kernels.kernel_op("tvq_test::scaled")
def scaled(x: torch.Tensor, s: float) -> torch.Tensor:
    """x * s, written to a fresh tensor (a stand-in for a kernel launch)."""
    return x * s


@scaled.register_fake
def _(x, s):
    return torch.empty_like(x)


class _Names(TorchDispatchMode):
    """Records the names of the ops dispatched."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def routes(monkeypatch):
    """How many calls went through the custom op ("op") and how many called the launcher directly ("fn")."""
    seen = {"op": 0, "fn": 0}
    op, fn = scaled.op, scaled.fn

    def via_op(*args, **kwargs):
        seen["op"] += 1
        return op(*args, **kwargs)

    def via_fn(*args, **kwargs):
        seen["fn"] += 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(scaled, "op", via_op)
    monkeypatch.setattr(scaled, "fn", via_fn)
    return seen


def test_plain_eager_calls_the_launcher_directly(routes):
    x = torch.arange(4.0)
    assert torch.equal(scaled(x, 2.0), 2 * x)
    assert torch.equal(scaled(torch.nn.Parameter(x), s=3.0), 3 * x)  # parameters and keyword arguments too
    assert routes == {"op": 0, "fn": 2}


def test_a_dispatch_mode_sees_the_op(routes):
    with _Names() as mode:
        out = scaled(torch.arange(3.0), 2.0)
    assert torch.equal(out, torch.tensor([0.0, 2.0, 4.0]))
    assert routes == {"op": 1, "fn": 0} and "tvq_test::scaled" in mode.names


def test_fake_tensors_and_subclasses_take_the_op(routes):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as fake:
        x = fake.from_tensor(torch.zeros(2, 3))
        assert scaled(x, 2.0).shape == (2, 3)
    assert routes == {"op": 1, "fn": 0}


def test_direct_off_takes_the_op(routes, monkeypatch):
    monkeypatch.setattr(kernels, "DIRECT", False)
    assert torch.equal(scaled(torch.ones(2), 4.0), torch.full((2,), 4.0))
    assert routes == {"op": 1, "fn": 0}


def test_compiled_graphs_keep_the_op_opaque():
    """Under torch.compile the op is traced as one node (its fake gives the shape) and runs as the op."""
    seen = []
    fn = scaled.fn
    try:
        scaled.fn = lambda *a, **k: seen.append("fn") or fn(*a, **k)  # would be traced through if called
        compiled = torch.compile(lambda x: scaled(x, 2.0) + 1.0, backend="eager", fullgraph=True)
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 3.0))
    finally:
        scaled.fn = fn
    assert seen == []


def test_the_op_passes_opcheck():
    torch.library.opcheck(scaled.op, (torch.randn(3), 0.5))


def test_host_overhead_benchmark_runs(tmp_path):
    """benchmarks/host_overhead.py at its smallest (no timing is checked: counts and the JSON's shape)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "h.json"
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "benchmarks/host_overhead.py", "--layers", "1", "2", "--seq-len", "128",
                        "--steps", "2", "--warmup", "0", "--json", str(out)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = json.loads(out.read_text())["results"]
    # every layer (two GAU sublayers) adds the same calls; a few run outside the layers
    per_layer = two["kernel_op_calls_per_step"] - one["kernel_op_calls_per_step"]
    assert per_layer > 20 and abs(one["kernel_op_calls_per_step"] - per_layer) <= 4
    for res in (one, two):
        assert len(res["step_ms"]["direct"]) == len(res["step_ms"]["dispatcher"]) == 2
        assert res["median_ms"]["direct"] > 0 and res["median_ms"]["dispatcher"] > 0


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_jit_tracing_records_the_op(routes):
    traced = torch.jit.trace(lambda x: scaled(x, 2.0), torch.ones(2), check_trace=False)
    assert routes == {"op": 1, "fn": 0} and "tvq_test::scaled" in str(traced.graph)
