"""Every kernel op launches what it tells the cost model it launches.

The cost model (:mod:`tvq.bench.cost`) sees a kernel op (:func:`tvq.ops.kernels.kernel_op`) as one opaque call: one
launch, unless the op registered more (:func:`tvq.ops.kernels.register_launches`). A PyTorch op inside a launcher
(a ``.sum`` of partial results, a ``.contiguous()`` that copies, a ``zero_``) is a launch on a GPU that the model would
not count. Here a training step runs with every kernel on (Triton's interpreter on CPU tensors), each kernel op's
launcher runs under a dispatch mode that sees the PyTorch ops inside it, and the Triton launches are counted where the
interpreter runs them: per call, Triton launches plus PyTorch kernels must equal the registered count.
"""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import make_model
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

import triton.runtime.interpreter as interpreter  # noqa: E402

from tvq.bench import cost  # noqa: E402
from tvq.ops import kernels  # noqa: E402
from tvq.ops.kernels import KERNEL_LAUNCHES, KernelOp, use_kernels  # noqa: E402
from tvq.ops.kernels.common import tickets  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _launches_pytorch(func) -> bool:
    """Whether an aten op returning tensors is a kernel on a GPU: not a view or an allocation."""
    name = f"aten.{func.overloadpacket.__name__}"
    return not (func.is_view or name in cost.VIEW_LIKE or name in cost.ALLOCATIONS)


TRITON = "<a Triton launch>"  # on the stack while the interpreter runs a kernel (its own tensor moves not counted)


class _Inside(TorchDispatchMode):
    """Counts the PyTorch kernels run while a kernel op's launcher is on top of the stack."""

    def __init__(self, stack: list):
        super().__init__()
        self.stack = stack

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = any(isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_leaves(out))
        if self.stack and self.stack[-1][0] != TRITON and tensors and _launches_pytorch(func):
            self.stack[-1][1].append(str(func))
        return out


@pytest.mark.parametrize("config", [
    dict(head_type="shga", dropout_sin=0.2, dropout_res=0.3, layerdrop=0.2, cache_bias=True),
    dict(head_type="mqa"),
])
def test_every_launch_is_registered(monkeypatch, config):
    stack, calls = [], []
    real_call, real_grid = KernelOp.__call__, interpreter.GridExecutor.__call__

    def call(self, *args, **kwargs):
        name = str(self.op._qualname)
        stack.append((name, []))
        triton_before = counter[0]
        try:
            out = real_call(self, *args, **kwargs)
        finally:
            name, inner = stack.pop()
        calls.append((name, counter[0] - triton_before, inner, args, kwargs))
        return out

    counter = [0]

    def grid(self, *args, **kwargs):
        counter[0] += 1
        stack.append((TRITON, []))
        try:
            return real_grid(self, *args, **kwargs)
        finally:
            stack.pop()

    monkeypatch.setattr(KernelOp, "__call__", call)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", grid)
    monkeypatch.setattr(kernels, "is_in_torch_dispatch_mode", lambda: False)  # the launchers, called directly
    model = make_model(dtype=torch.float32, n_layer=2, **config).train()
    ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(3))
    tickets(ids.device)  # made once, outside any launcher
    with use_kernels(True), _Inside(stack):
        first = model(ids[:, :24], labels=ids[:, :24])
        out = model(ids[:, 24:], state=first.state, labels=ids[:, 24:])
        (first.loss + out.loss).backward()
    assert calls
    seen = collections.Counter()
    for name, n_triton, inner, args, kwargs in calls:
        seen[name] += 1
        registered = KERNEL_LAUNCHES[name](*args, **kwargs)[0] if name in KERNEL_LAUNCHES else 1
        assert n_triton + len(inner) == registered, (name, n_triton, inner)
    for op in ("tvq_kernels::rms_norm_backward", "tvq_kernels::vq_quantize", "tvq_kernels::query_biases_backward"):
        assert seen[op] >= 1, (op, seen)
