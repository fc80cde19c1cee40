"""Fused Triton kernels: the blockwise attention (``scores``, ``cache_scan``: the cache's per-block means, and the
state's cache after the chunk, ``window_values``: the window's and the cache's share of the output, and the GAU's
output gate), the per-code sums and the state's cache fold where the scan does not write it (``code_sums``), the
quantizer (``vq_codes``: the nearest codeword, the straight-through key, the error and key norms), the queries'
Transformer-XL biases (``query_bias``), the key list of a chunk, its carried window joined with the chunk, and each
block's cache counts (``window_join``), and the rest of a sublayer (``rms_norm``, ``gate``: the GAU's SiLU (with
the query/key norms) and, off the blockwise path, its gate, ``residual``: dropout, LayerDrop and the residual add,
``residual_norm``: that add joined with the next sublayer's norm, ``dropout_linear``: the relative embeddings'
dropout inside their GEMM), and what they share (``common``: tiles, products, reductions across a launch's
programs). Each has a PyTorch twin in :mod:`tvq.ops` or :mod:`tvq.layers` (the reference it is tested against,
outputs and gradients, and the fallback wherever Triton or a GPU is missing).

They are chosen automatically for CUDA tensors in float32, float16 or bfloat16 when Triton imports.
``use_kernels(True)`` forces them for CPU tensors too (which needs ``TRITON_INTERPRET=1`` set before Triton is
imported: how the tests run them without a GPU), ``use_kernels(False)`` turns them off (benchmarks compare both).

Each launcher is a torch.library custom op (:func:`kernel_op`), which is how torch.compile, FakeTensor and the cost
model see it; in plain eager mode it is called directly (:class:`KernelOp`), because the op's dispatch costs more host
time than the rest of the call (``benchmarks/host_overhead.py``).
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from typing import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

HAVE_TRITON = importlib.util.find_spec("triton") is not None
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_forced: bool | None = None

# custom op name ("tvq_kernels::...") -> its GEMM FLOPs for given arguments, (dtype name, FLOPs): how the cost model
# (tvq.bench.cost) counts a kernel that it cannot look into
KERNEL_FLOPS: dict[str, Callable[..., tuple[str, int]]] = {}


# custom op name -> (launches, scratch bytes) for given arguments, for an op that launches more than one kernel or
# moves a scratch buffer of its own through HBM (written and read inside the op); absent: one launch, no scratch
KERNEL_LAUNCHES: dict[str, Callable[..., tuple[int, int]]] = {}


class KernelOp:
    """A kernel's launcher ``fn`` and the torch.library custom op ``op`` registered for it (:func:`kernel_op`).

    Calling it runs the op where something looks at ops: torch.compile, FakeTensor and every other dispatch mode
    (the cost model, :mod:`tvq.bench.cost`, counts kernels there), ``torch.jit.trace``, tensor subclasses (DTensor).
    Elsewhere, plain eager mode, it calls ``fn`` directly: the same Python, without the dispatcher's round trip
    through a boxed Python kernel, which costs ~45-60 us of host time per call on the 2-core CPU
    (``benchmarks/host_overhead.py``), where an enwik8 training step makes ~1,200 calls (25 a sublayer). ``op`` is
    what ``torch.library.opcheck`` checks."""

    def __init__(self, op, fn: Callable):
        self.op, self.fn = op, fn
        self.__name__, self.__doc__ = fn.__name__, fn.__doc__

    def register_fake(self, fake: Callable) -> Callable:
        return self.op.register_fake(fake)

    def __call__(self, *args, **kwargs):
        plain = all(type(a) in _PLAIN for a in (*args, *kwargs.values()) if isinstance(a, Tensor))
        if plain and DIRECT and not (torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
                                     or torch.jit.is_tracing()):
            return self.fn(*args, **kwargs)
        return self.op(*args, **kwargs)


_PLAIN = (Tensor, torch.nn.Parameter)  # no subclass: FakeTensor, DTensor and the like take the op
DIRECT = True  # KernelOp's direct calls in plain eager mode (off: every call through the dispatcher, to compare)


def kernel_op(name: str):
    """Decorator: ``fn`` (a function that launches Triton kernels, outputs not aliasing its inputs) registered as the
    custom op ``name``, returned as a :class:`KernelOp` (``register_fake`` as on the op)."""
    def register(fn: Callable) -> KernelOp:
        return KernelOp(torch.library.custom_op(name, mutates_args=())(fn), fn)
    return register


def register_flops(op_name: str):
    """Decorator: ``fn(*args, **kwargs) -> (dtype name, FLOPs)`` of the kernel op ``op_name``, for the cost model."""
    def register(fn):
        KERNEL_FLOPS[op_name] = fn
        return fn
    return register


def register_launches(op_name: str):
    """Decorator: ``fn(*args, **kwargs) -> (launches, scratch bytes)`` of the kernel op ``op_name``, for the cost
    model (scratch: bytes of the op's own temporaries written and read back, beyond its inputs and outputs)."""
    def register(fn):
        KERNEL_LAUNCHES[op_name] = fn
        return fn
    return register


def kernels_enabled(x: Tensor) -> bool:
    """Whether the Triton path runs for tensors like ``x``: CUDA (or forced), a Triton dtype, Triton installed."""
    if not HAVE_TRITON or x.dtype not in KERNEL_DTYPES:
        return False
    return x.is_cuda if _forced is None else _forced


def graph_capturing(t: Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of t's device (False on a CPU-only build): a
    value drawn on the host then is frozen into every replay (the residual kernel's dropout seed), and a cache kept
    across steps would hold the graph's own memory."""
    return t.is_cuda and torch.backends.cuda.is_built() and torch.cuda.is_current_stream_capturing()


@contextmanager
def use_kernels(enabled: bool):
    """Force the Triton kernels on (also for CPU tensors, through the interpreter) or off inside the block."""
    global _forced
    if enabled and not HAVE_TRITON:
        raise ValueError("use_kernels(True): triton is not installed (pip install 'tvq[triton]')")
    if enabled and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        raise ValueError("use_kernels(True) without a GPU needs TRITON_INTERPRET=1 set before triton is imported")
    old, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = old
