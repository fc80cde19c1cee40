"""What the Triton kernels share: tile sizes, how their ``tl.dot`` products run for a dtype, and the launch-wide
reduction of per-program partial sums by the launch's last program (:func:`last_program`)."""

from __future__ import annotations

import math
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


@triton.jit
def tree_sum(part_ptr, tree_ptr, out_ptr, ticket_ptr, pid, n_prog, D, G, BD: tl.constexpr, BG: tl.constexpr):
    """The sums over a launch's programs of two float32 partial rows, part (2, n_prog, D) -> out (2, D), in the launch
    itself, by a two-level tree of last programs (:func:`last_program`): the last of each group of G programs (pid //
    G; G about sqrt(n_prog)) adds up its group's rows into tree (2, n_groups, D), and the last of those the groups'
    rows. Each level reads about sqrt(n_prog) rows, BG at a time, in a fixed order (deterministic): a few round trips
    to L2 where one program reading all n_prog rows would take n_prog / BG (the persistent kernels' 2 programs per SM:
    264 on an H100). Call once per program after storing its rows; ticket_ptr: :func:`tickets`' counters (1 +
    n_groups of them: the groups' from ticket_ptr + 1)."""
    d = tl.arange(0, BD)
    d_ok = d < D
    grp = pid // G
    lo = grp * G
    n_in = tl.minimum(G, n_prog - lo)
    if last_program(ticket_ptr + 1 + grp, n_in):
        n_groups = tl.cdiv(n_prog, G)
        s0, s1 = _sum_rows(part_ptr, n_prog * D, lo, n_in, D, BD, BG)
        tl.store(tree_ptr + grp * D + d, s0, mask=d_ok)
        tl.store(tree_ptr + (n_groups + grp) * D + d, s1, mask=d_ok)
        if last_program(ticket_ptr, n_groups):
            s0, s1 = _sum_rows(tree_ptr, n_groups * D, 0, n_groups, D, BD, BG)
            tl.store(out_ptr + d, s0, mask=d_ok)
            tl.store(out_ptr + D + d, s1, mask=d_ok)


@triton.jit
def _sum_rows(ptr, half, lo, n, D, BD: tl.constexpr, BG: tl.constexpr):
    """The sums of rows lo .. lo + n - 1 of D float32 at ptr and at ptr + half (two (BD,) results), BG rows at a
    time in order, read past L1 (other programs wrote them: :func:`last_program`)."""
    d = tl.arange(0, BD)
    a0 = tl.zeros((BG, BD), dtype=tl.float32)
    a1 = tl.zeros((BG, BD), dtype=tl.float32)
    for i0 in range(0, n, BG):
        i = i0 + tl.arange(0, BG)
        ok = (i < n)[:, None] & (d < D)[None, :]
        rows = (lo + i)[:, None] * D + d[None, :]
        a0 += tl.load(ptr + rows, mask=ok, other=0.0, cache_modifier=".cg")
        a1 += tl.load(ptr + half + rows, mask=ok, other=0.0, cache_modifier=".cg")
    return tl.sum(a0, axis=0), tl.sum(a1, axis=0)


def tree_args(n_prog: int, D: int, BD: int, elements: int, like: Tensor, on: bool = True) -> dict:
    """:func:`tree_sum`'s host side for n_prog programs' rows of D on ``like``'s device: the partial sums ``part``
    (2, n_prog, D) and the result ``out`` (2, D), float32, the scratch ``tree`` (2, n_groups, D) and ``ticket``
    counters, ``G``, and ``BG`` (rows per load: BG BD at most ``elements``, the kernel's own tile). ``on`` False:
    ``like`` for every pointer (never touched) and an empty (0,) result."""
    if not on:
        return dict(part=like, out=like.new_empty(0, dtype=torch.float32), tree=like, ticket=like, G=1, BG=1)
    G = math.isqrt(max(n_prog - 1, 0)) + 1  # ceil(sqrt(n_prog))
    n_groups = -(-n_prog // G)
    f32 = dict(dtype=torch.float32, device=like.device)
    return dict(part=torch.empty(2, n_prog, D, **f32), out=torch.empty(2, D, **f32),
                tree=torch.empty(2, n_groups, D, **f32), ticket=tickets(like.device, 1 + n_groups), G=G,
                BG=max(1, min(elements // BD, 1 << max(G - 1, 0).bit_length())))


TICKETS = 1024  # counters per device and stream
_TICKETS: dict[tuple, Tensor] = {}


def tickets(device: torch.device, n: int = 1) -> Tensor:
    """The int32 counters :func:`last_program` takes tickets from (n of them used), zero between launches: one set
    per device and CUDA stream (launches on one stream run one after another; two streams' would mix their
    tickets). Made once (one fill) and kept; each launch leaves them at zero."""
    if n > TICKETS:
        raise ValueError(f"tickets: at most {TICKETS} counters, {n} asked")
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _TICKETS.get(key)
    if counters is None:
        counters = _TICKETS[key] = torch.zeros(TICKETS, dtype=torch.int32, device=device)
    return counters
