"""Data-parallel training on torch.distributed: the process group, DDP / FSDP2, state gathering.

``tvq train`` under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) runs one
process per device; a plain ``tvq train`` is the single-process case and creates no group.

Global rows. The sampler draws the global batch of ``batch_size`` rows for each step. Rank ``r``
of ``N`` takes rows ``[r * B/N, (r + 1) * B/N)``, and its micro-batch ``m`` of ``A = grad_accum``
is rows ``r * B/N + [m * b, (m + 1) * b)`` with ``b = B / (N * A)``. The carried attention state
follows its rows, so a checkpoint stores it as row blocks in global row order (rank 0's
micro-batches, then rank 1's, ...), and any ``(N, A)`` can slice its rows back out exactly.

Context parallelism (``context_parallel = C``): ranks ``d C .. d C + C - 1`` form data-parallel group
``d`` of ``N / C``; it takes rows as one rank does above, and its rank ``c`` the ``c``-th ``1/C`` of every
update segment of them, exchanging per attention sublayer on a process group of its own
(:class:`tvq.parallel.ContextParallel`). DDP and FSDP reduce over the whole world, the codebook statistics
too; the carried state is the same on the ranks of a group, and a checkpoint keeps one copy of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tvq.parallel import ContextParallel
from tvq.runtime import env_rank
from tvq.state import LayerState, TransformerVQState


@dataclasses.dataclass
class Cluster:
    """Where this process stands: its rank among ``world_size`` processes, its device and mode.

    ``mode`` is ``"single"`` (no process group), ``"ddp"`` or ``"fsdp"``.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mode: str
    cp: int = 1  # ranks per context-parallel group
    context: ContextParallel | None = None  # this rank's group, when cp > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "single"

    @property
    def fsdp(self) -> bool:
        return self.mode == "fsdp"

    def rows(self, batch_size: int) -> slice:
        """This rank's contiguous slice of the global batch (that of its context-parallel group)."""
        n, group = batch_size * self.cp // self.world_size, self.rank // self.cp
        return slice(group * n, (group + 1) * n)

    def chunk(self, update_len: int) -> slice:
        """This rank's contiguous slice of an update segment: all of it unless context-parallel."""
        n = update_len // self.cp
        return slice(self.rank % self.cp * n, (self.rank % self.cp + 1) * n)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def first_on_each_node(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on each node's local rank 0 first (downloads and tokenizer
        caches are filled once), then on the node's other ranks."""
        if self.local_rank != 0:
            self.barrier()
        result = fn(*args, **kwargs)
        if self.local_rank == 0:
            self.barrier()
        return result

    def all_reduce(self):
        """The sum over ranks for ``update_codebooks(all_reduce=...)``; None when single-process."""
        return dist.all_reduce if self.distributed else None

    def mean(self, *values: Tensor) -> Tensor:
        """The mean over ranks of each 0-dim value, stacked (float64, on the values' device; no read-back)."""
        t = torch.stack([v.double() for v in values])  # (n,)
        if self.distributed:
            dist.all_reduce(t)
            t /= self.world_size
        return t

    def wrap(self, model: nn.Module, bf16: bool) -> nn.Module:
        """The module to call for training: ``DistributedDataParallel(model)``; or ``model`` itself,
        sharded in place with FSDP2 (bf16 parameters and compute, fp32 reduction and master
        weights when ``bf16``); or ``model`` unchanged when single-process."""
        if self.mode == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            # codebooks are updated identically on every rank: no buffer broadcast needed
            return nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            # the carried state is returned as views; it is only ever detached, never modified in place
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
            for layer in [*model.attns, *(model.mlps or ())]:  # each attention sublayer and MLP (mha, mqa)
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def grad_sync(self, net: nn.Module, sync: bool):
        """Context for one micro-batch's forward and backward: skip the gradient all-reduce
        unless ``sync`` (the last micro-batch of a step)."""
        if self.mode == "ddp" and not sync:
            return net.no_sync()
        if self.mode == "fsdp":
            net.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def full_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Full (unsharded) model and optimizer state dicts in CPU memory on rank 0 (empty on
        the others). The optimizer's is keyed by parameter name, whatever the wrapping."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(model, options=options),
                get_optimizer_state_dict(model, optimizer, options=options))

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a full optimizer state dict from :meth:`full_state_dicts` (sharding it for FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def gather_objects(self, obj) -> list | None:
        """``[obj of rank 0, obj of rank 1, ...]`` on rank 0, None on the others."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def gather_states(self, states: list[TransformerVQState]) -> list[TransformerVQState] | None:
        """This rank's micro-batch states, gathered to rank 0 in CPU memory as row blocks in
        global row order (rank 0's micro-batches, then rank 1's, ...); None on other ranks."""
        if not self.distributed:
            return [s.to(device="cpu") for s in states]

        def gather(tensors: list[torch.Tensor]):
            t = tensors[0].contiguous()
            parts = [torch.empty_like(t) for _ in range(self.world_size)] if self.is_main else None
            dist.gather(t, parts, dst=0)
            return [p.cpu() for p in parts] if self.is_main else None

        # one tensor at a time, so rank 0 never holds more than world_size copies of one on device
        gathered = [combine([s], gather) for s in states]  # fields: per-rank lists
        if not self.is_main:
            return None
        return [combine([g], lambda per_rank, r=r: per_rank[0][r])  # one copy per context-parallel group
                for r in range(0, self.world_size, self.cp) for g in gathered]


def combine(states: list[TransformerVQState], fn) -> TransformerVQState:
    """A state whose every tensor is ``fn([the corresponding tensor of each state])``."""
    names = [f.name for f in dataclasses.fields(LayerState)]
    layers = []
    for group in zip(*(s.layers for s in states)):
        fields = [[getattr(layer, n) for layer in group] for n in names]
        layers.append(LayerState(*(None if ts[0] is None else fn(ts) for ts in fields)))
    return TransformerVQState(layers, states[0].pos)


def select_rows(blocks: list[TransformerVQState], start: int, stop: int) -> TransformerVQState:
    """Rows ``start:stop`` of the global state stored as consecutive row ``blocks``."""
    parts, offset = [], 0
    for block in blocks:
        lo, hi = max(start - offset, 0), min(stop - offset, block.batch_size)
        if lo < hi:
            parts.append(combine([block], lambda ts, lo=lo, hi=hi: ts[0][lo:hi]))
        offset += block.batch_size
    if offset < stop:
        raise ValueError(f"the checkpoint's attention state has {offset} rows; rows {start}:{stop} were asked for")
    return combine(parts, torch.cat)


@contextlib.contextmanager
def cluster(parallel: str, batch_size: int, grad_accum: int, timeout_s: int, device: str | None = None,
            context_parallel: int = 1):
    """Join the process group when launched by torchrun (``WORLD_SIZE`` set): nccl on CUDA,
    gloo on CPU, with collectives timing out after ``timeout_s`` seconds; leave it on exit.

    A process group that already exists (made by the caller) is used as it is. Yields the
    :class:`Cluster`. Raises ``ValueError`` before joining when ``context_parallel`` does not divide
    the world size, or ``batch_size`` does not split into ``world_size / context_parallel * grad_accum``
    equal micro-batches.
    """
    launched = "WORLD_SIZE" in os.environ or dist.is_initialized()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = env_rank(), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world % context_parallel:
        raise ValueError(f"context_parallel {context_parallel} does not divide the {world} ranks; run a multiple "
                         f"of {context_parallel} processes")
    n_dp = world // context_parallel  # data-parallel groups
    if batch_size % (n_dp * grad_accum):
        where = f"{world} ranks" if context_parallel == 1 else f"{n_dp} groups of {context_parallel} ranks"
        raise ValueError(f"batch_size {batch_size} does not split over {where} x grad_accum {grad_accum}; "
                         f"use a batch_size divisible by {n_dp * grad_accum}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if launched and dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    own_group = launched and not dist.is_initialized()
    if own_group:
        # torch.distributed.nn's functions take group=WORLD as a default argument: imported once
        # the group exists (FSDP and DDP import it lazily), they would hold the group until exit
        importlib.import_module("torch.distributed.nn")

        # a failed or timed-out NCCL collective kills the process (torchrun then stops the job)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    try:
        context = None
        if context_parallel > 1:  # every rank makes every group; DDP and FSDP keep the world group
            groups = [dist.new_group(list(range(d * context_parallel, (d + 1) * context_parallel)))
                      for d in range(n_dp)]
            context = ContextParallel(groups[rank // context_parallel])
        yield Cluster(rank, world, local_rank, dev, parallel if launched else "single", context_parallel, context)
        if own_group:
            dist.barrier()  # every rank is done with its collectives before any leaves the group
    except RuntimeError as e:
        if launched:
            e.add_note(f"tvq: rank {rank} of {world} stopped. If a collective failed, another rank failed first "
                       f"(see its log) or did not answer within dist_timeout = {timeout_s} s.")
        raise
    finally:
        if own_group:
            leave_process_group()


# torch's caches that keep device meshes, and through them the process group, alive: DTensor's
# sharding propagation (Python and C++), mesh topologies and redistribution plans (torch 2.13;
# an entry that a torch version lacks is skipped)
_MESH_CACHE_CLEARS = (
    ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),
    ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear"),
    ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
    ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
)


def leave_process_group() -> None:
    """Destroy the default process group so that it is freed now, not at interpreter exit.

    The group's C++ object, and for gloo its worker threads, lives while anything holds it: models
    and optimizers in reference cycles (DDP, FSDP2), the device meshes in DTensor's caches, and
    ``torch.distributed.nn`` if imported after the group was made (which :func:`cluster` avoids).
    Freed during interpreter finalization, it now and then aborts a process that has finished its
    work ("terminate called without an active exception"). So the caches are emptied and the
    cycles collected before the group is destroyed.
    """
    if "torch.distributed.tensor" in sys.modules:  # DTensors were made
        for module, path in _MESH_CACHE_CLEARS:
            try:
                clear = importlib.import_module(module)
            except ImportError:
                continue
            for name in path.split("."):
                clear = getattr(clear, name, None)
            if clear is not None:
                clear()
    gc.collect()
    dist.destroy_process_group()
