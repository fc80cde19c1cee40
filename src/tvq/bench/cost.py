"""A GPU cost model that runs on a CPU: what one training step or one decode step of tvq would ask of a GPU.

The real model (:class:`tvq.TransformerVQ`, every line of its code) runs on fake tensors that claim to live
on ``cuda:0`` (``torch._subclasses.FakeTensorMode``: shapes, dtypes and strides are tracked, nothing is
computed), under bfloat16 autocast with PyTorch's CUDA autocast rules, so that it takes its CUDA code paths
(the chunked cache read, no CPU segmenting, no oneDNN fast path). A dispatch mode sees every aten op of the
step, forward and backward, after autograd and autocast and before any kernel, and counts:

- **kernels**: aten calls that would launch work on the device. Views and metadata ops are not kernels
  (:data:`VIEW_LIKE` and every op whose schema says it returns a view: view, _unsafe_view, expand, permute,
  transpose, t, as_strided, slice, select, unsqueeze, squeeze, unflatten, unfold, alias, detach, split,
  split_with_sizes, unbind, ...), nor are allocations without a fill (:data:`ALLOCATIONS`: empty,
  empty_like, new_empty, empty_strided, ...) or ops that return no tensor (promote_types). Each remaining
  aten call counts as one kernel (an op such as ``cat`` or ``index`` may launch a few on a real device; a
  cuBLAS GEMM may launch a split-k reduction too): these are counts of the eager CUDA code path, not timings;
- **GEMM FLOPs by dtype**: mm, addmm, bmm, baddbmm, addbmm, mv, addmv, dot, _scaled_mm (matmul, linear and
  einsum reach the dispatcher as these), 2 M N K each with batch dims, and the share run in float32;
- **operand bytes**: per kernel the bytes of its tensor inputs and outputs (an in-place op's tensor counts
  as read and written; an expanded view counts its distinct elements only), per token, in total and per
  attention sublayer; and **traffic bytes**, the same except that indexing ops (gather, index_select, index,
  embedding; scatter_, index_add_, index_put_, ...) count only the rows they read or write of their large
  operand (:func:`_traffic`);
- **host syncs**: ``.item()``, ``int()``, ``float()``, ``bool()``, ``.tolist()`` of a device tensor (each
  recorded with the line of tvq that asked), ``aten._local_scalar_dense`` from C++, data-dependent shapes
  (nonzero, masked_select, indexing with a boolean mask) and copies to the host;
- **bytes saved for backward** (``torch.autograd.graph.saved_tensors_hooks``), per token, deduplicated by
  storage, parameters apart;
- the **op histogram** (by count and by bytes) and the distinct GEMM shapes, in the JSON.

Special cases (none edits library code; all live in this module):

- A CPU-only build of PyTorch has no CUDA device guard and no CUDA hooks, and autograd asks both for the
  streams of CUDA tensors. A tiny C++ library (:data:`_FAKE_CUDA_SOURCE`, compiled once with the system's
  ``c++`` against torch's headers, about 3 s, cached) registers a do-nothing CUDA guard (one device, one
  stream, no-op events) and CUDA hooks that say "built, not available". PyTorch reads its hooks once, while
  it is imported, so every measurement runs in a fresh child process that loads the library before
  ``import torch``; the caller's process is never touched. Backward runs with autograd's device threads off
  (``set_multithreading_enabled(False)``), on the calling thread.
- ``torch.autocast("cuda")`` refuses to start when CUDA is unavailable: its availability checks are patched
  for the measurement (they run whenever one is constructed, also by activation checkpointing's
  recomputation); the autocast kernels themselves are PyTorch's CUDA ones.
- tvq's custom ops (``tvq::cache_read``, ``tvq::cache_read_backward``, ``tvq::sum_rows``) would run their fake
  (shape-only) registration: the mode runs their Python implementations instead, op by op, so their CUDA
  branches are counted (the composite ops they call, such as ``matmul(out=...)`` and ``reshape``, reach the
  mode undecomposed there and are decomposed as a device would). The fused Triton kernels of
  :mod:`tvq.ops.kernels` (custom ops ``tvq_kernels::*``, chosen for CUDA tensors when Triton is installed, as on
  a GPU; ``kernels=False`` or ``--no-kernels`` measures the PyTorch path) count as one kernel each: operand bytes are their inputs and
  outputs, GEMM FLOPs those their op registered (:func:`tvq.ops.kernels.register_flops`); an op that launches
  several kernels or moves a scratch buffer of its own registers both (:func:`tvq.ops.kernels.register_launches`).
- Reading a device scalar (``item``/``int``/``bool``/``float``, ``_local_scalar_dense``) returns 0 (``False``,
  ``0.0``) after counting a sync; ``tolist`` counts one sync (``FakeTensor.tolist`` would read element by
  element: it is replaced during the measurement) and returns zeros; a boolean-mask index, ``nonzero`` and
  ``masked_select`` count a sync and return a fake result as if every element were selected.
- Per-sublayer attribution: forward hooks on the attention (and MLP) modules, gradient hooks on their
  outputs in backward; in decode, ``tvq.models.decoding._attention_step`` is wrapped (it only marks which
  sublayer runs) for the measurement.

On a CUDA build of PyTorch nothing is faked but the tensors: the child runs with the real CUDA runtime (a GPU
must then be visible, as fake CUDA tensors initialise it).

``python -m tvq.bench.cost --preset enwik8 --mode train --seq-len 8192 --json PATH``; :func:`measure` for
code and tests.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import warnings
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from tvq.usage import int_range
from tvq.config import TransformerVQConfig

MODES = ("train", "decode")
DEFAULT_LEN = {"train": 8192, "decode": 65_536}

# Model shapes. "enwik8" is the paper's enwik8 model as `tvq train --preset enwik8` builds it
# (tvq.training.config.PRESETS, dropouts and the "block" straight-through rule included); "enwik8-nodrop"
# is the same shape without dropout (`tvq bench --preset enwik8`); "bench-small" is `tvq bench`'s default
# model. (tvq.bench may not import tvq.training; tests/test_cost_model.py checks these match.)
PRESETS: dict[str, dict] = {
    "enwik8": dict(vocab_size=256, d_model=768, d_k=128, d_v=1536, n_head=1, n_layer=24, n_code=512,
                   block_len=512, mem_len=512, dropout_sin=0.2, dropout_res=0.5, layerdrop=0.3,
                   straight_through="block"),
    "enwik8-nodrop": dict(vocab_size=256, d_model=768, d_k=128, d_v=1536, n_head=1, n_layer=24, n_code=512,
                          block_len=512, mem_len=512),
    "bench-small": dict(vocab_size=256, d_model=256, d_k=64, d_v=512, n_head=1, n_layer=2, n_code=256,
                        block_len=128, mem_len=128),
}

# ops that only make a new view of existing memory (besides those whose schema says so: OpOverload.is_view)
VIEW_LIKE = frozenset({
    "aten.view", "aten._unsafe_view", "aten.expand", "aten.permute", "aten.transpose", "aten.t", "aten.as_strided",
    "aten.slice", "aten.select", "aten.unsqueeze", "aten.squeeze", "aten.alias", "aten.detach", "aten.split",
    "aten.split_with_sizes", "aten.unbind", "aten.unfold", "aten.diagonal", "aten._reshape_alias", "aten.lift_fresh",
    "aten.view_as", "aten.expand_as", "aten.narrow", "aten.chunk", "aten.unflatten", "aten.flatten", "aten.reshape",
    "aten.real", "aten.imag", "aten.view_as_real", "aten.view_as_complex", "aten._conj", "aten._neg_view",
    "aten.resolve_conj", "aten.resolve_neg", "aten.movedim", "aten.swapaxes", "aten.swapdims",
})
# allocations that launch nothing (a zeros/ones/full is an allocation plus a fill kernel: counted)
ALLOCATIONS = frozenset({
    "aten.empty", "aten.empty_like", "aten.new_empty", "aten.empty_strided", "aten.new_empty_strided",
    "aten.empty_permuted",
})
# fills: kernels that write their output and read no tensor (``new_zeros`` takes the tensor it is called on for its
# dtype and device only; ``zero_`` and ``fill_`` overwrite theirs)
FILLS = frozenset({
    "aten.new_zeros", "aten.new_ones", "aten.new_full", "aten.zeros_like", "aten.ones_like", "aten.full_like",
    "aten.zero_", "aten.fill_", "aten._foreach_zero_",
})
# copies: kernels that read their source (argument 1) and write their destination (argument 0) without reading it
COPIES = frozenset({"aten.copy_", "aten._foreach_copy_"})
# GEMMs: (index of the left operand, index of the right operand) among the op's arguments
GEMMS = {
    "aten.mm": (0, 1), "aten.bmm": (0, 1), "aten.addmm": (1, 2), "aten.baddbmm": (1, 2), "aten.addbmm": (1, 2),
    "aten.mv": (0, 1), "aten.addmv": (1, 2), "aten.dot": (0, 1), "aten.vdot": (0, 1), "aten._scaled_mm": (0, 1),
}
# and their in-place forms: addmm_, baddbmm_, ...
GEMMS.update({f"{k}_": v for k, v in GEMMS.items() if k.startswith(("aten.add", "aten.baddbmm"))})
# Indexing ops touch a few rows of a large operand: the traffic estimate counts those rows, not the whole
# tensor. Reads: of the source (argument 0), as many bytes as the output has (at most the source: repeated
# rows come from cache). Writes in place: the destination (argument 0) is read and written where the update
# (the largest other float operand) lands.
SPARSE_READS = frozenset({"aten.gather", "aten.index_select", "aten.index", "aten.embedding", "aten.take",
                          "aten.take_along_dim"})
SPARSE_WRITES = frozenset({"aten.scatter_", "aten.scatter_add_", "aten.scatter_reduce_", "aten.index_add_",
                           "aten.index_put_", "aten.index_copy_", "aten._index_put_impl_"})
SCALAR_READS = frozenset({"item", "__int__", "__bool__", "__float__", "__index__", "__complex__", "tolist"})

ATTENTION_MODULES = ("tvq/ops/", "tvq/layers/vq.py")  # the VQ attention core, for the "parts" split
# modules under tvq/ops/ whose kernels are the rest of a sublayer, which a dense model has too (norms, the GAU's
# activation and gate, the residual add, the projections' GEMMs)
REST_MODULES = ("tvq/ops/kernels/rms_norm.py", "tvq/ops/kernels/gate.py", "tvq/ops/kernels/residual.py",
                "tvq/ops/kernels/residual_norm.py", "tvq/ops/linear.py")
NONDETERMINISTIC_CUMSUM = "aten.cumsum of floats (no deterministic CUDA kernel: raises in deterministic mode)"
INDUCTOR_NOTE = ("skipped: inductor generates Triton kernels for CUDA tensors, which needs a GPU (and Triton) "
                 "to compile; run the cost model's train mode under torch.compile on a GPU machine")


# --------------------------------------------------------------------------- the fake CUDA runtime
_FAKE_CUDA_SOURCE = r"""
// A do-nothing CUDA runtime for PyTorch's CPU-only builds, so that fake tensors on "cuda:0" can go
// through autograd: one device, one stream, events that are never waited on. Registered when the
// library is loaded, which must happen before `import torch` (PyTorch reads its CUDA hooks once).
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace {
using c10::Device;
using c10::DeviceIndex;
using c10::DeviceType;
using c10::Stream;

struct FakeCUDAGuard final : c10::impl::DeviceGuardImplInterface {
  static Device dev(Device d) { return Device(DeviceType::CUDA, d.index() < 0 ? 0 : d.index()); }
  DeviceType type() const override { return DeviceType::CUDA; }
  Device exchangeDevice(Device) const override { return Device(DeviceType::CUDA, 0); }
  Device getDevice() const override { return Device(DeviceType::CUDA, 0); }
  void setDevice(Device) const override {}
  void uncheckedSetDevice(Device) const noexcept override {}
  Stream getStream(Device d) const override { return Stream(Stream::DEFAULT, dev(d)); }
  Stream getDefaultStream(Device d) const override { return Stream(Stream::DEFAULT, dev(d)); }
  Stream getStreamFromGlobalPool(Device d, bool) const override { return Stream(Stream::DEFAULT, dev(d)); }
  Stream getNewStream(Device d, int) const override { return Stream(Stream::DEFAULT, dev(d)); }
  Stream exchangeStream(Stream s) const override { return Stream(Stream::DEFAULT, dev(s.device())); }
  void destroyEvent(void*, const DeviceIndex) const noexcept override {}
  void record(void** event, const Stream&, const DeviceIndex, const c10::EventFlag) const override {
    *event = nullptr;
  }
  void block(void*, const Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  DeviceIndex deviceCount() const noexcept override { return 1; }
  bool queryStream(const Stream&) const override { return true; }
  void synchronizeStream(const Stream&) const override {}
  void synchronizeEvent(void*) const override {}
  void synchronizeDevice(const DeviceIndex) const override {}
  void recordDataPtrOnStream(const c10::DataPtr&, const Stream&) const override {}
};

struct FakeCUDAHooks final : at::CUDAHooksInterface {
  explicit FakeCUDAHooks(at::CUDAHooksArgs) {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return false; }
  bool hasPrimaryContext(DeviceIndex) const override { return true; }
  void init() const override {}
  DeviceIndex deviceCount() const override { return 1; }
  void setCurrentDevice(DeviceIndex) const override {}
  DeviceIndex getCurrentDevice() const override { return 0; }
  DeviceIndex exchangeDevice(DeviceIndex) const override { return 0; }
  DeviceIndex maybeExchangeDevice(DeviceIndex) const override { return 0; }
  DeviceIndex current_device() const override { return 0; }
};

FakeCUDAGuard fake_guard;
c10::impl::DeviceGuardImplRegistrar fake_guard_registrar(DeviceType::CUDA, &fake_guard);
}  // namespace

namespace at {
C10_REGISTER_CLASS(CUDAHooksRegistry, CUDAHooks, FakeCUDAHooks)
}

extern "C" int tvq_fake_cuda_version() { return 1; }
"""


def _cache_dir() -> Path:
    """Where the compiled fake CUDA runtime is kept: $TVQ_COST_CACHE, else ~/.cache/tvq/cost (or a temporary
    directory where that cannot be written)."""
    root = Path(os.environ.get("TVQ_COST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "tvq", "cost"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"tvq-cost-{os.getuid() if hasattr(os, 'getuid') else 0}"


def needs_fake_cuda() -> bool:
    """Whether this PyTorch lacks CUDA, so that the measuring process needs :data:`_FAKE_CUDA_SOURCE`."""
    return torch.version.cuda is None and torch.version.hip is None


def fake_cuda_library() -> Path:
    """The compiled fake CUDA runtime for this PyTorch (built once, about 3 s, then cached)."""
    torch_dir = Path(torch.__file__).resolve().parent
    key = hashlib.sha256(f"{_FAKE_CUDA_SOURCE}|{torch.__version__}|{torch_dir}|{sys.version}".encode()).hexdigest()[:16]
    out = _cache_dir() / f"fake_cuda_{key}.so"
    if out.is_file():
        return out
    from torch.utils.cpp_extension import include_paths

    out.parent.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "c++")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "fake_cuda.cpp"
        src.write_text(_FAKE_CUDA_SOURCE)
        lib = Path(tmp) / out.name
        errors = []
        for std in ("c++20", "c++17"):
            cmd = [cxx, "-O1", "-shared", "-fPIC", f"-std={std}", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                   *(f"-I{p}" for p in include_paths()), str(src), f"-L{torch_dir / 'lib'}",
                   f"-Wl,-rpath,{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", "-o", str(lib)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True)
            except FileNotFoundError:
                raise RuntimeError(f"the GPU cost model needs a C++ compiler ({cxx!r}, or set CXX) on a CPU-only "
                                   "PyTorch, to build its fake CUDA runtime") from None
            if proc.returncode == 0:
                os.replace(lib, out)
                return out
            errors.append(proc.stderr[-2000:])
        raise RuntimeError("could not build the fake CUDA runtime of the GPU cost model:\n" + "\n".join(errors))


# ----------------------------------------------------------------------- measuring in a child process
_CHILD = r"""
import ctypes, json, os, sys
lib = os.environ.get("TVQ_COST_LIB")
if lib:
    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)  # before torch: it reads its CUDA hooks once
from tvq.bench.cost import _run_specs
specs = json.loads(open(sys.argv[1]).read())
result = _run_specs(specs)
with open(sys.argv[2], "w") as f:
    json.dump(result, f)
"""


def measure(config: TransformerVQConfig | dict, seq_len: int, batch_size: int = 1, mode: str = "train",
            **options) -> dict:
    """Count one step of ``config`` on fake CUDA tensors (see the module's docstring) -> the result dict.

    mode ``"train"``: forward with labels over ``seq_len`` tokens per row, backward, then
    ``model.update_codebooks()``; ``"decode"``: one-token steps of :meth:`tvq.TransformerVQ.decoder` from a
    state at position ``seq_len``. Options: ``amp`` (default True: bfloat16 autocast), ``decode_steps``
    (default 2), ``top`` (histogram rows, default 40), ``log_step`` (train: also read the codebook metrics,
    as a logging step does), ``deterministic`` (under ``torch.use_deterministic_algorithms(True)``; the
    meta's special cases count the float cumsums, which have no deterministic CUDA kernel), ``kernels``
    (default True: the Triton kernels where Triton is installed, as on a GPU; False: the PyTorch path). Runs
    in a fresh child process."""
    return measure_many([dict(config=config, seq_len=seq_len, batch_size=batch_size, mode=mode, **options)])[0]


def measure_many(specs: list[dict], timeout: float | None = 1800) -> list[dict]:
    """:func:`measure` for several specs (dicts of its arguments) in one child process."""
    specs = [_normalise(s) for s in specs]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the directory holding the tvq package
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("TVQ_COST_LIB", None)
    if needs_fake_cuda():
        env["TVQ_COST_LIB"] = str(fake_cuda_library())
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "specs.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(specs))
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(spec_path), str(out_path)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out_path.is_file():
            raise RuntimeError(f"cost model child process failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        return json.loads(out_path.read_text())


def _normalise(spec: dict) -> dict:
    spec = {"batch_size": 1, "mode": "train", **spec}
    cfg = spec["config"]
    if isinstance(cfg, TransformerVQConfig):
        cfg = cfg.to_dict()
    cfg = TransformerVQConfig.from_dict(dict(cfg)).to_dict()  # validated
    if cfg["attention"] != "vq":
        raise ValueError("the cost model measures attention='vq' models")
    spec["config"] = cfg
    if spec["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {spec.get('mode')!r}")
    for name in ("seq_len", "batch_size", "decode_steps"):
        if name == "decode_steps" and name not in spec:
            continue
        if not isinstance(spec.get(name), int) or isinstance(spec.get(name), bool) or spec[name] < 1:
            raise ValueError(f"{name} must be an int >= 1, got {spec.get(name)!r}")
    return spec


# ops with a CUDA kernel of their own in a CUDA build (silu_backward_out, _fused_rms_norm_cuda and its
# backward), but only a CompositeImplicitAutograd fallback in a CPU wheel, which autograd would run op by op
# above the fake tensors (silu_backward as 7 kernels)
NATIVE_CUDA_KERNELS = ("silu_backward", "_fused_rms_norm", "_fused_rms_norm_backward")


def _register_native_cuda_kernels():
    """In the child: give those ops a CUDA kernel, so they reach the fake tensors (and the recorder) whole,
    as on a GPU. The kernel never runs: fake tensors answer from the op's meta function."""
    lib = torch.library.Library("aten", "IMPL")

    def unreachable(*args, **kwargs):
        raise RuntimeError("the cost model's stand-in CUDA kernel ran on real data")

    for name in NATIVE_CUDA_KERNELS:
        lib.impl(name, unreachable, "CUDA")
    return lib


def _run_specs(specs: list[dict]) -> list[dict]:
    """In the child: measure each spec."""
    if needs_fake_cuda() and torch._C._accelerator_getAccelerator() != torch.device("cuda"):
        raise RuntimeError("the fake CUDA runtime is not loaded: run through tvq.bench.cost.measure")
    lib = _register_native_cuda_kernels()  # kept alive while measuring
    try:
        return [_measure_here(**s) for s in specs]
    finally:
        lib._destroy()


# --------------------------------------------------------------------------------- the recorder
def _unique_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor shows (an expanded view counts its source once)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _traffic(name: str, args, inputs: list, outputs: list) -> int:
    """Bytes an op moves, estimated: its operand bytes, except that indexing ops count only the rows they
    read or write of their large operand (:data:`SPARSE_READS`, :data:`SPARSE_WRITES`)."""
    if name in SPARSE_READS and args and isinstance(args[0], torch.Tensor):
        src = args[0]
        others = [t for t in inputs if t is not src]
        out = sum(_unique_bytes(t) for t in outputs)
        return sum(_unique_bytes(t) for t in others) + min(_unique_bytes(src), out) + out
    if name in SPARSE_WRITES and args and isinstance(args[0], torch.Tensor):
        dst = args[0]
        others = [t for t in inputs if t is not dst]
        updates = [t for t in others if t.is_floating_point() or t.dtype == dst.dtype]
        touched = min(max((_unique_bytes(t) for t in updates), default=0), _unique_bytes(dst))
        return sum(_unique_bytes(t) for t in others) + 2 * touched
    return sum(_unique_bytes(t) for t in inputs) + sum(_unique_bytes(t) for t in outputs)


def _tensors(tree) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes in place (its schema's ``(a!)`` arguments): the outputs of one that returns
    nothing (``torch._foreach_mul_`` and the other in-place multi-tensor ops)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            out += _tensors(args[i] if i < len(args) else kwargs.get(arg.name))
    return out


# CUDA's multi-tensor apply (ATen/native/cuda/MultiTensorApply.cuh): one launch takes at most this many tensors
# per list (by the number of lists the op reads or writes; fewer with a list of scalars) and 320 chunks of 65,536
# elements
_MTA_MAX_TENSORS = (110, 64, 48, 36, 30)
_MTA_MAX_TENSORS_SCALARLIST = (96, 64, 48, 36, 30)
_MTA_MAX_CHUNKS, _MTA_CHUNK = 320, 65536


def _foreach_launches(args) -> int:
    """Kernel launches of a ``torch._foreach_*`` op on CUDA: its lists packed into launches by the limits above
    (a lower bound: the packing is greedy and per list)."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    if not lists:
        return 1
    depth = min(len(lists), len(_MTA_MAX_TENSORS))
    scalars = any(isinstance(a, (list, tuple)) and a and not isinstance(a[0], torch.Tensor) for a in args)
    max_tensors = (_MTA_MAX_TENSORS_SCALARLIST if scalars else _MTA_MAX_TENSORS)[depth - 1]
    chunks = sum(-(-t.numel() // _MTA_CHUNK) for t in lists[0])
    return max(1, -(-len(lists[0]) // max_tensors), -(-chunks // _MTA_MAX_CHUNKS))


def _placeholder(dtype: torch.dtype):
    if dtype == torch.bool:
        return False
    return 0.0 if (dtype.is_floating_point or dtype.is_complex) else 0


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _site() -> str:
    """The innermost line of tvq (outside this module) on the Python stack; in the autograd engine, the
    innermost tvq line of the forward that made the node being run, as "backward of <site> (<node>)"
    (recorded by anomaly mode during the measured forward)."""
    here = os.path.abspath(__file__)
    pkg = os.path.dirname(os.path.dirname(here))  # .../tvq
    dispatch = os.path.join(pkg, "ops", "kernels", "__init__.py")  # KernelOp.__call__: the kernel's caller is the site
    f = sys._getframe(1)
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if fn.startswith(pkg + os.sep) and fn != here and not (fn == dispatch and f.f_code.co_name == "__call__"):
            return f"tvq/{os.path.relpath(fn, pkg)}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    node = torch._C._current_autograd_node()
    if node is None:
        return "outside tvq (autograd engine)"
    for entry in reversed(node.metadata.get("traceback_") or []):
        m = _FRAME.search(entry)
        if m and os.path.abspath(m[1]).startswith(pkg + os.sep) and os.path.abspath(m[1]) != here:
            return f"backward of tvq/{os.path.relpath(os.path.abspath(m[1]), pkg)}:{m[2]} ({m[3]}) [{node.name()}]"
    return f"outside tvq (autograd engine) [{node.name()}]"


class _Stats:
    def __init__(self):
        self.kernels = 0
        self.bytes = 0
        self.traffic = 0  # the estimate of _traffic
        self.flops: Counter = Counter()  # dtype name -> FLOPs
        self.ops: Counter = Counter()  # op -> calls
        self.op_bytes: Counter = Counter()  # op -> bytes
        self.syncs = 0

    def add(self, other: "_Stats") -> None:
        self.kernels += other.kernels
        self.bytes += other.bytes
        self.traffic += other.traffic
        self.flops.update(other.flops)
        self.ops.update(other.ops)
        self.op_bytes.update(other.op_bytes)
        self.syncs += other.syncs

    def summary(self, tokens: int | None = None) -> dict:
        total = sum(self.flops.values())
        d = {"kernels": self.kernels, "operand_bytes": self.bytes, "traffic_bytes": self.traffic,
             "gemm_flops": dict(self.flops),
             "gemm_flops_total": total, "fp32_share": (self.flops.get("float32", 0) / total) if total else 0.0,
             "syncs": self.syncs}
        if tokens:
            d["operand_bytes_per_token"] = self.bytes / tokens
            d["traffic_bytes_per_token"] = self.traffic / tokens
        return d


def _make_recorder():
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class Recorder(TorchDispatchMode):
        """Counts every aten op below autograd and autocast; see the module's docstring."""

        def __init__(self):
            super().__init__()
            self.phase = "setup"
            self.scope = None  # ("attn", i) / ("mlp", i) while a sublayer runs, else None
            self.phases: dict[str, _Stats] = {}
            self.scopes: dict[tuple, _Stats] = {}  # (phase, kind, index) -> stats
            self.sync_sites: Counter = Counter()  # (phase, kind, site) -> n
            self.views = Counter()
            self.allocations = Counter()
            self.special = Counter()
            self.non_kernels = Counter()  # ops that return no tensor (prim.device, promote_types)
            self.gemms: Counter = Counter()  # (phase, op, shape a, shape b, dtype) -> calls
            self.gemm_flops: Counter = Counter()
            self.byte_sites: Counter = Counter()  # (phase, op, site) -> operand bytes
            self.count_sites: Counter = Counter()  # (phase, op, site) -> kernels
            self.parts: dict[tuple, _Stats] = {}  # (phase, "attention" or "rest") -> stats

        def _stats(self) -> list[_Stats]:
            out = [self.phases.setdefault(self.phase, _Stats())]
            if self.scope is not None:
                out.append(self.scopes.setdefault((self.phase, *self.scope), _Stats()))
            return out

        def sync(self, kind: str) -> None:
            for s in self._stats():
                s.syncs += 1
            self.sync_sites[(self.phase, kind, _site())] += 1

        def kernel(self, name: str, inputs: list, outputs: list, flops: tuple | None = None, args=None,
                   launches: int = 1, scratch: int = 0) -> None:
            nbytes = sum(_unique_bytes(t) for t in inputs) + sum(_unique_bytes(t) for t in outputs) + scratch
            traffic = (nbytes if args is None else _traffic(name, args, inputs, outputs)) + scratch
            site = _site()
            self.byte_sites[(self.phase, name, site)] += nbytes
            self.count_sites[(self.phase, name, site)] += launches
            part = "attention" if any(m in site for m in ATTENTION_MODULES) and not any(
                m in site for m in REST_MODULES) else "rest"
            for s in [*self._stats(), self.parts.setdefault((self.phase, part), _Stats())]:
                s.kernels += launches
                s.bytes += nbytes
                s.traffic += traffic
                s.ops[name] += 1
                s.op_bytes[name] += nbytes
                if flops is not None:
                    s.flops[flops[0]] += flops[1]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = str(func.overloadpacket)
            kernel_op = func.namespace == "tvq_kernels"  # a fused kernel: one kernel, answered by its fake
            if func.namespace == "tvq":  # our custom ops: their real (CUDA-branch) code, op by op
                from torch._library.custom_ops import OPDEFS

                opdef = OPDEFS.get(func._schema.name)
                if opdef is not None:
                    self.special[f"{name} run op by op"] += 1
                    with self:
                        return opdef._init_fn(*args, **kwargs)
            if func.namespace == "aten" and func.has_kernel_for_dispatch_key(
                    torch._C.DispatchKey.CompositeImplicitAutograd) and not func.has_kernel_for_dispatch_key(
                    torch._C.DispatchKey.CUDA) and any("Tensor" in str(r.type) for r in func._schema.returns):
                # reached us below autograd (inside a custom op): run its decomposition, as a device would
                self.special[f"{name} decomposed (CompositeImplicitAutograd)"] += 1
                with self:
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            if func is aten._local_scalar_dense.default:
                self.sync("_local_scalar_dense")
                return _placeholder(args[0].dtype)
            if name in ("aten.nonzero", "aten.masked_select") or (
                    func is aten.index.Tensor and any(i is not None and i.dtype in (torch.bool, torch.uint8)
                                                      for i in args[1])):
                return self._data_dependent(func, name, args, kwargs)
            if name in ("aten._to_copy", "aten.copy_"):
                dst = kwargs.get("device") if name == "aten._to_copy" else args[0].device
                src = args[0] if name == "aten._to_copy" else args[1]
                if dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu":
                    self.sync("copy to host")
            out = func(*args, **kwargs)
            if func.is_view or name in VIEW_LIKE:
                self.views[(self.phase, name)] += 1
                return out
            if name in ALLOCATIONS:
                self.allocations[(self.phase, name)] += 1
                return out
            outputs = _tensors(out) or _written(func, args, kwargs)  # an in-place op may return nothing
            if not outputs:
                self.non_kernels[name] += 1
                return out
            if all(t.device.type == "meta" for t in outputs):
                self.non_kernels[f"{name} (meta)"] += 1  # shapes only (zero_states' templates): no device work
                return out
            inputs = [] if name in FILLS else _tensors(args[1]) if name in COPIES else _tensors(
                (args, {k: v for k, v in kwargs.items() if k != "out"}))
            flops, launches, scratch = None, 1, 0
            if kernel_op:
                from tvq.ops.kernels import KERNEL_FLOPS, KERNEL_LAUNCHES

                count = KERNEL_FLOPS.get(func._schema.name)
                flops = count(*args, **kwargs) if count is not None else None
                if func._schema.name in KERNEL_LAUNCHES:
                    launches, scratch = KERNEL_LAUNCHES[func._schema.name](*args, **kwargs)
            elif name in GEMMS:
                i, j = GEMMS[name]
                a, b = args[i], args[j]
                dtype = str(a.dtype).removeprefix("torch.")
                flops = (dtype, 2 * a.numel() * (b.shape[-1] if b.dim() >= 2 else 1))
                self.gemms[(self.phase, name, tuple(a.shape), tuple(b.shape), dtype)] += 1
            if name == "aten.cumsum" and (outputs[0].is_floating_point() or outputs[0].is_complex()):
                self.special[NONDETERMINISTIC_CUMSUM] += 1
            if name.startswith("aten._foreach_"):
                launches = _foreach_launches(args)
            self.kernel(name, inputs, outputs, flops, args, launches, scratch)
            return out

        def _data_dependent(self, func, name, args, kwargs):
            """A data-dependent output shape: a sync on a GPU; the fake result selects everything."""
            self.sync(f"{name} (data-dependent shape)")
            self.special[f"{name} (data-dependent shape: everything selected)"] += 1
            x = args[0]
            if name == "aten.nonzero":
                out = torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device)
                self.kernel(name, [x], [out])
                return out
            if name == "aten.masked_select":
                n = torch.broadcast_shapes(x.shape, args[1].shape)
                out = torch.empty((math.prod(n),), dtype=x.dtype, device=x.device)
                self.kernel("aten.nonzero", [args[1]], [])
                self.kernel(name, [x, args[1]], [out])
                return out
            idx = list(args[1])
            masks = [k for k, i in enumerate(idx) if i is not None and i.dtype in (torch.bool, torch.uint8)]
            if len(masks) != 1 or any(i is not None for k, i in enumerate(idx) if k not in masks):
                raise NotImplementedError("cost model: indexing with a boolean mask and other indices")
            p, m = masks[0], idx[masks[0]]
            shape = (*x.shape[:p], m.numel(), *x.shape[p + m.dim():])
            out = torch.empty(shape, dtype=x.dtype, device=x.device)
            pos = torch.empty((m.numel(), m.dim()), dtype=torch.long, device=x.device)
            self.kernel("aten.nonzero", [m], [pos])
            self.kernel(name, [x, pos], [out])
            return out

    return Recorder()


def _make_scalar_reads(recorder):
    """A function mode that turns scalar reads of device tensors into counted syncs with placeholder values."""
    from torch.overrides import TorchFunctionMode

    class ScalarReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in SCALAR_READS and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cuda":
                t = args[0]
                if name == "tolist":
                    return t.tolist()  # FakeTensor's, replaced by _one_sync_tolist
                recorder.sync(f".{name}()" if not name.startswith("__") else f"{name.strip('_')}()")
                value = _placeholder(t.dtype)
                if name in ("__int__", "__index__"):
                    return int(value)
                if name == "__float__":
                    return float(value)
                if name == "__bool__":
                    return bool(value)
                return value
            return func(*args, **(kwargs or {}))

    return ScalarReads()


@contextlib.contextmanager
def _one_sync_tolist(recorder):
    """``FakeTensor.tolist`` reads element by element (one ``item`` each); a device tensor's ``tolist`` is one
    copy to the host: count one sync and return zeros."""
    from torch._subclasses.fake_tensor import FakeTensor

    original = FakeTensor.tolist

    def tolist(self):
        if self.device.type == "cpu":
            return original(self)
        recorder.sync(".tolist()")
        value = _placeholder(self.dtype)
        for size in reversed(self.shape):
            value = [value if not isinstance(value, list) else list(value) for _ in range(size)]
        return value

    FakeTensor.tolist = tolist
    try:
        yield
    finally:
        FakeTensor.tolist = original


@contextlib.contextmanager
def _cuda_autocast_allowed():
    """Answer yes to ``torch.autocast("cuda")``'s "is CUDA there?" checks, which it runs whenever one is
    constructed (ours, and those activation checkpointing makes to recompute a sublayer under the same
    autocast state); the autocast kernels are PyTorch's own CUDA ones."""
    from unittest import mock

    with mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        yield


@contextlib.contextmanager
def _cuda_autocast(dtype: torch.dtype):
    ctx = torch.autocast("cuda", dtype=dtype)
    if not ctx._enabled:
        raise RuntimeError("cuda autocast did not enable")
    with ctx:
        yield


# ------------------------------------------------------------------------------------ one measurement
def _fake_model(cfg: TransformerVQConfig, fake_mode, device):
    from torch._subclasses.fake_tensor import FakeTensor

    from tvq.models.transformer_vq import TransformerVQ

    def fake(t):
        return FakeTensor(fake_mode, torch.empty(t.shape, dtype=t.dtype, device="meta"), device)

    with torch.device("meta"):
        model = TransformerVQ(cfg)
    for mod in model.modules():
        for n, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[n] = torch.nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for n, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[n] = fake(b)
    return model, fake


def _measure_here(config: dict, seq_len: int, batch_size: int = 1, mode: str = "train", amp: bool = True,
                  decode_steps: int = 2, top: int = 40, meta: dict | None = None, log_step: bool = False,
                  deterministic: bool = False, kernels: bool = True) -> dict:
    from tvq.ops.kernels import HAVE_TRITON, use_kernels

    with _deterministic(deterministic), use_kernels(False) if not kernels else contextlib.nullcontext():
        result = _measure_deterministic_or_not(config, seq_len, batch_size, mode, amp, decode_steps, top, meta,
                                               log_step, deterministic)
    result["meta"]["kernels"] = kernels and HAVE_TRITON
    return result


@contextlib.contextmanager
def _deterministic(on: bool):
    """torch.use_deterministic_algorithms(on) for the measurement, restored after it."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _measure_deterministic_or_not(config, seq_len, batch_size, mode, amp, decode_steps, top, meta, log_step,
                                  deterministic) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = TransformerVQConfig.from_dict(config)
    t0 = time.perf_counter()
    device = torch.device("cuda:0")
    fake_mode = FakeTensorMode()
    model, fake = _fake_model(cfg, fake_mode, device)
    B, T = batch_size, seq_len
    rec = _make_recorder()
    reads = _make_scalar_reads(rec)
    amp_ctx = (lambda: _cuda_autocast(torch.bfloat16)) if amp else contextlib.nullcontext
    saved = {"bytes": 0, "param_bytes": 0, "tensors": 0, "by_scope": Counter()}
    storages: set = set()
    params = {id(p) for p in model.parameters()}

    def pack(t):
        if id(t) in params:
            saved["param_bytes"] += t.untyped_storage().nbytes()
            return t
        key = t.untyped_storage()._cdata
        if key not in storages:
            storages.add(key)
            n = t.untyped_storage().nbytes()
            saved["bytes"] += n
            saved["tensors"] += 1
            saved["by_scope"]["other" if rec.scope is None else f"{rec.scope[0]}"] += n
        return t

    def unpack(t):
        return t

    scope_stack: list = []

    def set_scope(scope):
        def hook(grad):
            rec.scope = scope
        return hook

    def pre_hook(kind, i):
        def hook(module, args):
            scope_stack.append(rec.scope)
            rec.scope = (kind, i)
            if rec.phase == "forward" and kind == "attn" and i == 0 and isinstance(args[0], torch.Tensor) \
                    and args[0].requires_grad:
                args[0].register_hook(set_scope(None))  # backward leaves the first sublayer
        return hook

    def post_hook(kind, i):
        def hook(module, args, out):
            rec.scope = scope_stack.pop() if scope_stack else None
            x = out[0] if isinstance(out, tuple) else out
            if rec.phase == "forward" and isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(set_scope((kind, i)))  # backward enters this sublayer
        return hook

    handles = []
    for i, attn in enumerate(model.attns):
        handles += [attn.register_forward_pre_hook(pre_hook("attn", i)),
                    attn.register_forward_hook(post_hook("attn", i))]
    for i, mlp in enumerate(model.mlps or ()):
        handles += [mlp.register_forward_pre_hook(pre_hook("mlp", i)), mlp.register_forward_hook(post_hook("mlp", i))]

    result_extra = {}
    with fake_mode, torch.autograd.set_multithreading_enabled(False), _cuda_autocast_allowed(), rec, reads, \
            _one_sync_tolist(rec):
        if mode == "train":
            model.train()
            ids = fake(torch.empty(B, T, dtype=torch.long))
            labels = fake(torch.empty(B, T, dtype=torch.long))
            # a first step, not counted: it fills what later steps reuse (the sinusoid table in the compute dtype,
            # the codebooks the update refreshes in one batch), as in training from the second step on
            rec.phase = "warmup"
            with amp_ctx(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                model(ids, labels=labels).loss.backward()
            model.update_codebooks()
            model.zero_grad(set_to_none=True)
            rec.special.clear()
            rec.non_kernels.clear()
            rec.phase = "forward"
            # anomaly mode keeps each autograd node's forward stack, so backward ops are attributed to sites
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack), amp_ctx(), warnings.catch_warnings(), \
                    torch.autograd.detect_anomaly(check_nan=False):
                warnings.simplefilter("ignore", UserWarning)
                out = model(ids, labels=labels)
            rec.scope = None
            logits_dtype = str(out.logits.dtype).removeprefix("torch.")
            rec.phase = "backward"
            out.loss.backward()
            rec.scope = None
            rec.phase = "update"
            metrics = model.update_codebooks()
            if log_step:  # a logging step also reads the codebook metrics
                dict(metrics)
            result_extra["logits_dtype"] = logits_dtype
            phases = ("forward", "backward", "update")
            tokens = B * T
        else:
            import tvq.models.decoding as decoding

            model.eval()
            step_calls = [0]
            original = decoding._attention_step

            def attention_step(*args, **kwargs):  # only marks which sublayer the ops belong to
                previous = rec.scope
                rec.scope = ("attn", step_calls[0] % cfg.n_attn)
                step_calls[0] += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    rec.scope = previous

            decoding._attention_step = attention_step
            try:
                with torch.no_grad():
                    rec.phase = "setup"
                    state = model.initial_state(B)
                    state.pos = T  # the state of a context of T tokens (its contents do not change the cost)
                    with amp_ctx():
                        dec = model.decoder(state)
                    tokens_in = fake(torch.empty(B, dtype=torch.long))
                    rec.phase = "decode"
                    for _ in range(decode_steps):
                        with amp_ctx():
                            logits = dec.step(tokens_in)
            finally:
                decoding._attention_step = original
            result_extra["logits_dtype"] = str(logits.dtype).removeprefix("torch.")
            phases = ("decode",)
            tokens = B * decode_steps
    for h in handles:
        h.remove()
    if amp and not any(st.flops.get("bfloat16") for st in rec.phases.values()):
        raise RuntimeError("bfloat16 autocast did not take effect: no GEMM ran in bfloat16")

    total = _Stats()
    for p in phases:
        total.add(rec.phases.get(p, _Stats()))
    n_attn = cfg.n_attn
    attn_stats = _Stats()
    per_phase_attn = {}
    for p in phases:
        s = _Stats()
        for i in range(n_attn):
            s.add(rec.scopes.get((p, "attn", i), _Stats()))
        per_phase_attn[p] = s
        attn_stats.add(s)
    mlp_stats = _Stats()
    for p in phases:
        for i in range(n_attn):
            mlp_stats.add(rec.scopes.get((p, "mlp", i), _Stats()))

    steps = decode_steps if mode == "decode" else 1

    def per_sublayer(s: _Stats) -> dict:
        """Per attention sublayer and step (decode: per step of B tokens)."""
        d = s.summary()
        n = n_attn * steps
        out = {k: (v / n if isinstance(v, (int, float)) and k != "fp32_share" else v) for k, v in d.items()}
        out["gemm_flops"] = {k: v / n for k, v in d["gemm_flops"].items()}
        out["operand_bytes_per_token"] = s.bytes / n_attn / tokens
        out["traffic_bytes_per_token"] = s.traffic / n_attn / tokens
        return out

    def per_step(s: _Stats) -> dict:
        """Per step (decode: per step of batch_size tokens), bytes per token."""
        d = s.summary(tokens)
        for k in ("kernels", "operand_bytes", "traffic_bytes", "gemm_flops_total", "syncs"):
            d[k] = d[k] / steps
        d["gemm_flops"] = {k: v / steps for k, v in d["gemm_flops"].items()}
        return d

    def table(counter: Counter, other: Counter) -> list:
        return [[name, counter[name], other[name]] for name, _ in counter.most_common(top)]

    syncs = [{"phase": p, "kind": k, "site": s, "count": n} for (p, k, s), n in sorted(rec.sync_sites.items())
             if p in phases]
    gemms = sorted(([p, op, list(a), list(b), dt, n] for (p, op, a, b, dt), n in rec.gemms.items() if p in phases),
                   key=lambda r: -r[5] * 2 * math.prod(r[2]) * (r[3][-1] if len(r[3]) > 1 else 1))
    summary = total.summary(tokens)
    summary.update({
        "tokens": tokens,
        "steps": steps,
        "kernels_per_step": total.kernels / steps,
        "syncs_per_step": total.syncs / steps,
        "kernels_per_token": total.kernels / tokens,
        "syncs_per_token": total.syncs / tokens,
        "gemm_flops_per_token": summary["gemm_flops_total"] / tokens,
    })
    if mode == "train":
        summary["saved_for_backward_bytes"] = saved["bytes"]
        summary["saved_for_backward_bytes_per_token"] = saved["bytes"] / tokens
        summary["saved_for_backward_tensors"] = saved["tensors"]
        summary["saved_parameter_bytes"] = saved["param_bytes"]
        summary["saved_by_scope"] = dict(saved["by_scope"])
    result = {
        "meta": {
            **(meta or {}),
            "tool": "tvq.bench.cost",
            "what": "counts of the eager CUDA code path on fake tensors (nothing computed): not timings",
            "mode": mode, "seq_len": T, "batch_size": B, "deterministic": deterministic,
            "decode_steps": decode_steps if mode == "decode" else None,
            "position": T if mode == "decode" else None,
            "amp": "bfloat16 autocast (cuda)" if amp else "none (float32)",
            "device": "fake cuda:0", "torch": torch.__version__, "config": cfg.to_dict(),
            "n_attn": n_attn, "parameters": sum(p.numel() for p in model.parameters()),
            "step": ("forward with labels (autocast), loss.backward(), model.update_codebooks()"
                     + (", its metrics read (a logging step)" if log_step else "") if mode == "train"
                     else f"{decode_steps} x VQDecoder.step(tokens) under autocast, eval, no grad, B={B}; "
                          "per-token figures are their mean"),
            "excluded_views": sorted(VIEW_LIKE) + ["any op whose schema returns a view (OpOverload.is_view)"],
            "excluded_allocations": sorted(ALLOCATIONS),
            "special_cases": dict(rec.special),
            "not_kernels": dict(rec.non_kernels),
            "inductor": INDUCTOR_NOTE,
            "seconds": round(time.perf_counter() - t0, 2),
            **result_extra,
        },
        "summary": summary,
        "phases": {p: rec.phases.get(p, _Stats()).summary(tokens) for p in phases},
        "per_sublayer": {
            "what": "per attention sublayer and step (decode: per step of batch_size tokens): the mean over the "
                    "sublayers of the ops run inside them (module hooks in forward, gradient hooks in backward; "
                    "decode: inside tvq.models.decoding._attention_step); *_bytes_per_token per token. "
                    "outside_sublayers: the rest per step (embedding, head, loss, input checks, the initial "
                    "state, the codebook update; decode: the state writes)",
            "total": per_sublayer(attn_stats),
            **{p: per_sublayer(s) for p, s in per_phase_attn.items() if s.kernels},
            "mlp": per_sublayer(mlp_stats) if model.mlps is not None else None,
            "outside_sublayers": per_step(_outside(total, attn_stats, mlp_stats)),
        },
        "syncs": syncs,
        "views": sum(v for (p, _), v in rec.views.items() if p in phases),
        "allocations": sum(v for (p, _), v in rec.allocations.items() if p in phases),
        "ops_by_count": table(total.ops, total.op_bytes),
        "ops_by_bytes": [[name, total.ops[name], b] for name, b in total.op_bytes.most_common(top)],
        "bytes_by_site": [[phase, name, site, b] for (phase, name, site), b in rec.byte_sites.most_common()
                          if phase in phases][:top],
        "kernels_by_site": [[phase, name, site, n] for (phase, name, site), n in rec.count_sites.most_common()
                            if phase in phases][:top],
        "parts": {
            "what": "the step split by where its ops come from: 'attention' = " + ", ".join(ATTENTION_MODULES)
                    + " but " + ", ".join(REST_MODULES) + " (the VQ attention core that a dense model replaces by its attention kernel; backward ops "
                      "by the forward line that made them), 'rest' = everything else",
            **{part: _sum_stats(s for (phase, p), s in rec.parts.items() if p == part and phase in phases)
               .summary(tokens) for part in ("attention", "rest")}},
        "sublayer_ops_by_count": [[name, n / n_attn / steps, attn_stats.op_bytes[name] / n_attn / steps]
                                  for name, n in attn_stats.ops.most_common(top)],
        "gemms": gemms[:top],
    }
    return result


def _sum_stats(stats) -> _Stats:
    total = _Stats()
    for s in stats:
        total.add(s)
    return total


def _outside(total: _Stats, *parts: _Stats) -> _Stats:
    s = _Stats()
    s.kernels = total.kernels - sum(p.kernels for p in parts)
    s.bytes = total.bytes - sum(p.bytes for p in parts)
    s.traffic = total.traffic - sum(p.traffic for p in parts)
    s.syncs = total.syncs - sum(p.syncs for p in parts)
    s.flops = Counter(total.flops)
    for p in parts:
        s.flops.subtract(p.flops)
    s.flops = Counter({k: v for k, v in s.flops.items() if v})
    return s


# ----------------------------------------------------------------------------------------------- CLI
def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def preset_config(name: str, overrides: dict | None = None) -> TransformerVQConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return TransformerVQConfig.from_dict({**PRESETS[name], **(overrides or {})})


def format_table(result: dict) -> str:
    m, s, ps = result["meta"], result["summary"], result["per_sublayer"]["total"]
    MB = 1e6
    lines = [f"tvq GPU cost model: {m.get('preset') or 'custom'} {m['mode']} "
             f"{'position' if m['mode'] == 'decode' else 'tokens'} {m['seq_len']:,} x batch {m['batch_size']}, "
             f"{m['amp']}, {m['n_attn']} attention sublayers (counts of the eager CUDA path, not timings)"]
    if m["mode"] == "train":
        rows = [
            ("kernels / step", f"{s['kernels']:,}"),
            *((f"  {p}", f"{result['phases'][p]['kernels']:,}") for p in result["phases"]),
            ("kernels / sublayer (fwd+bwd)", f"{ps['kernels']:.0f}"),
            ("GEMM FLOPs / step", f"{s['gemm_flops_total']:.3e}"),
            ("fp32 share of GEMM FLOPs", f"{100 * s['fp32_share']:.1f}%"),
            ("operand MB / token", f"{s['operand_bytes_per_token'] / MB:.2f}"),
            ("operand MB / token / sublayer", f"{ps['operand_bytes_per_token'] / MB:.3f}"),
            ("traffic MB / token (sparse indexing)", f"{s['traffic_bytes_per_token'] / MB:.2f}"),
            ("host syncs / step", f"{s['syncs']}"),
            ("saved for backward MB / token", f"{s['saved_for_backward_bytes_per_token'] / MB:.3f}"),
        ]
    else:
        rows = [
            ("kernels / step", f"{s['kernels_per_step']:,.0f}"),
            ("kernels / step / sublayer", f"{ps['kernels']:.1f}"),
            ("GEMM FLOPs / token", f"{s['gemm_flops_per_token']:.3e}"),
            ("fp32 share of GEMM FLOPs", f"{100 * s['fp32_share']:.1f}%"),
            ("operand MB / token", f"{s['operand_bytes_per_token'] / MB:.2f}"),
            ("operand MB / token / sublayer", f"{ps['operand_bytes_per_token'] / MB:.3f}"),
            ("traffic MB / token (sparse indexing)", f"{s['traffic_bytes_per_token'] / MB:.2f}"),
            ("host syncs / step", f"{s['syncs_per_step']:g}"),
        ]
    width = max(len(r[0]) for r in rows)
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    if result["syncs"]:
        lines.append("  syncs by site:")
        lines += [f"    {r['count']:>4} x {r['kind']} at {r['site']} [{r['phase']}]" for r in result["syncs"]]
    return "\n".join(lines)


def _load() -> dict:
    info = {"loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    try:
        info["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["uptime"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tvq.bench.cost", description=(
        "GPU cost model on a CPU: kernels, GEMM FLOPs by dtype, operand bytes, host syncs and saved activations "
        "of one training or decode step on fake CUDA tensors under bf16 autocast (counts, not timings)."))
    p.add_argument("--preset", default="bench-small", choices=sorted(PRESETS))
    p.add_argument("--mode", default="train", choices=MODES)
    p.add_argument("--seq-len", type=int_range(1), default=None,
                   help="train: tokens per row (default 8192); decode: the context position (default 65536)")
    p.add_argument("--batch-size", type=int_range(1), default=1)
    p.add_argument("--decode-steps", type=int_range(1), default=2, help="decode: steps counted (their mean is reported)")
    p.add_argument("--no-amp", action="store_true", help="no autocast: the float32 model as it is")
    p.add_argument("--log-step", action="store_true", help="train: also read the codebook metrics (a logging step)")
    p.add_argument("--deterministic", action="store_true", help="under torch.use_deterministic_algorithms(True)")
    p.add_argument("--no-kernels", action="store_true",
                   help="the PyTorch path, not the fused Triton kernels (which are counted when Triton is installed)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a model config field")
    p.add_argument("--json", type=Path, default=None, help="write the full result here")
    p.add_argument("--top", type=int_range(1), default=40, help="rows of the op histograms in the JSON")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            p.error(f"--set expects NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip().removeprefix("model.")] = _parse_value(value)
    try:
        cfg = preset_config(args.preset, overrides)
    except ValueError as e:
        p.error(str(e))
    seq_len = args.seq_len or DEFAULT_LEN[args.mode]
    given = argv if argv is not None else sys.argv[1:]
    command = "python -m tvq.bench.cost " + " ".join(shlex.quote(a) for a in given)
    meta = {"preset": args.preset, "overrides": overrides, "command": command, "load_before": _load()}
    result = measure(cfg, seq_len, args.batch_size, args.mode, amp=not args.no_amp, decode_steps=args.decode_steps,
                     top=args.top, meta=meta, log_step=args.log_step, deterministic=args.deterministic,
                     kernels=not args.no_kernels)
    result["meta"]["load_after"] = _load()
    print(format_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
