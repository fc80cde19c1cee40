"""What the Triton kernels share: tile sizes, how their ``tl.dot`` products run for a dtype, and the launch-wide
reduction of per-program partial sums by the launch's last program (:func:`last_program`)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1). Host code calls this and :func:`cdiv`, not Triton's: those
    are constexpr functions (Triton 3.9) whose every host call costs 3-4 us on the 2-core CPU, several per launch."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (a >= 0, b > 0)."""
    return -(-a // b)


def tile(n: int, most: int) -> int:
    """A tile size for a dim of n: a power of two, at least 16 (``tl.dot``'s minimum), at most ``most``."""
    return max(16, min(most, next_power_of_2(n)))


def dot_options(dtype: torch.dtype) -> dict:
    """The meta-parameters of a kernel's products for operands of ``dtype``: PRECISION "ieee" for float32 (exact,
    as PyTorch's float32 matmul without TF32), else the operands' own tensor-core product; UPCAST True for
    bfloat16 in Triton's interpreter, whose ``tl.dot`` multiplies the raw bits of bfloat16 operands (Triton 3.9):
    there the kernels cast them to float32 first (and PRECISION is "ieee")."""
    upcast = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    return dict(UPCAST=upcast, PRECISION="ieee" if dtype == torch.float32 or upcast else "tf32")


@triton.jit
def last_program(ticket_ptr, n_programs):
    """Whether this program is the last of its launch to get here: the one that then sums the others' partial
    results in the same launch (a reduction over the whole grid without a second kernel, nor a zeroed output for
    atomics: CUB's and CUDA's "threadfence reduction"). Each program takes a ticket, an atomic add with acquire-
    release order at GPU scope after a barrier of the program's threads, so every program's stores before its
    ticket are visible to the program holding the last one, which puts the counter back to 0 for the next launch.
    Call it once per program, after storing the partial results; the last program reads them with loads that
    bypass L1 (``cache_modifier=".cg"``). ticket_ptr: :func:`tickets`' counter."""
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    last = ticket == n_programs - 1
    tl.store(ticket_ptr, 0, mask=last)
    return last


_TICKETS: dict[tuple, Tensor] = {}


def tickets(device: torch.device) -> Tensor:
    """The int32 counter :func:`last_program` takes tickets from, zero between launches: one per device and CUDA
    stream (launches on one stream run one after another; two streams' would mix their tickets). Made once (one
    fill) and kept; each launch leaves it at zero."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counter = _TICKETS.get(key)
    if counter is None:
        counter = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter
