"""``tvq bench``: tokens/s and peak memory of Transformer-VQ against quadratic attention.

Every (impl, mode, length) case runs in a fresh subprocess, so its peak memory is its own and a
case that runs out of memory or over the time budget is reported as such instead of ending the
sweep. Before timing, each case checks its path against the reference on a small float64 input
and refuses to report a speed for a path that is wrong.

- impls: ``vq`` (blockwise Transformer-VQ), ``full`` (the same model, dense attention),
  ``sdpa`` (a standard pre-norm transformer of about the same size on
  ``scaled_dot_product_attention``);
- modes: ``train`` (forward + backward + AdamW step, + codebook update for vq), ``forward``
  (no grad), ``decode`` (one-token steps from a state at a context position; the state is
  synthesised at that position, since the cost of a step does not depend on what it holds).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from tvq.bench.args import BENCH_PRESETS, DTYPE_NAMES, IMPLS, MODES, ints, parse_args
from tvq.config import TransformerVQConfig
from tvq.files import write_text_atomic
from tvq.models.transformer_vq import TransformerVQ
from tvq.overrides import parse_model_overrides as parse_config_overrides
from tvq.state import LayerState, TransformerVQState
from tvq.usage import check_device

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass
class Case:
    impl: str
    mode: str
    seq_len: int  # tokens per sequence (train, forward) or the context position (decode)
    batch_size: int = 1
    preset: str = "bench-small"
    device: str = "cpu"
    dtype: str = "float32"
    warmup: int = 1
    repeats: int = 3
    decode_steps: int = 64
    compile: bool = False
    threads: int = 0  # intra-op CPU threads; 0: torch's default (one per core)
    grad_checkpoint: bool = False  # train: recompute each layer in backward
    model: dict = field(default_factory=dict)  # model config overrides (--set), e.g. {"head_type": "mqa"}


@dataclass
class Record:
    impl: str
    mode: str
    seq_len: int
    batch_size: int
    tokens_per_s: float | None
    peak_mem_bytes: int | None
    device: str
    dtype: str
    torch_version: str
    commit: str
    status: str = "ok"  # ok | oom | timeout | wrong | error
    detail: str = ""
    preset: str = "bench-small"
    compiled: bool = False
    params: int = 0
    threads: int = 0  # intra-op CPU threads (torch.get_num_threads()) the case ran with
    grad_checkpoint: bool = False
    seconds: list[float] = field(default_factory=list)
    process_tokens_per_s: list[float] = field(default_factory=list)  # --processes: each process's median
    model: dict = field(default_factory=dict)  # the model config overrides of the case


class WrongResult(RuntimeError):
    """The path under test disagrees with its reference."""


# ------------------------------------------------------------------ models
def model_config(preset: str, impl: str, overrides: dict | None = None) -> TransformerVQConfig:
    """The preset's config for an impl, with model ``overrides`` (config field -> value) applied."""
    if preset not in BENCH_PRESETS:
        raise ValueError(f"unknown bench preset {preset!r}; choose one of {', '.join(BENCH_PRESETS)}")
    fields = {**BENCH_PRESETS[preset], **(overrides or {})}
    return TransformerVQConfig(**fields, attention="full" if impl == "full" else "vq")


def parse_model_overrides(items: list[str]) -> dict:
    """``--set NAME=VALUE`` strings -> {field: value} of TransformerVQConfig fields (``attention`` is the
    impl's: not settable)."""
    overrides = parse_config_overrides(items)
    if "attention" in overrides:
        raise ValueError("--set attention: expected a model config field other than attention (the impl sets it)")
    return overrides


def build(impl: str, preset: str, grad_checkpoint: bool = False, overrides: dict | None = None) -> torch.nn.Module:
    """The model of an impl; ``grad_checkpoint``: recompute each layer (GAU or block) in backward;
    ``overrides``: model config fields (the sdpa baseline takes its size from the overridden model)."""
    from tvq.bench.baseline import sdpa_like

    cfg = model_config(preset, impl, overrides).replace(grad_checkpoint=grad_checkpoint)
    if impl == "sdpa":
        vq_params = TransformerVQ(cfg).num_parameters()
        model = sdpa_like(vq_params, cfg.vocab_size, cfg.d_model, n_head=max(1, cfg.d_model // 64))
        model.grad_checkpoint = grad_checkpoint
        return model
    return TransformerVQ(cfg)


def logits_of(model, ids, state=None):
    if isinstance(model, TransformerVQ):
        out = model(ids, state=state)
        return out.logits, out.state
    return model(ids, state)


# --------------------------------------------------------------- reference
@torch.no_grad()
def check(impl: str, preset: str, device: str = "cpu", overrides: dict | None = None) -> None:
    """Compare the timed path with its reference on a small float64 input, on the device the case runs
    on (a GPU runs its own code paths: the chunked cache read, its kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tvq.ops import dense_attention, reference_attention

    torch.manual_seed(0)
    if impl == "full":  # the chunked dense op against the reference formula
        B, H, T, P, Dk, Dv, M = 1, 2, 97, 31, 8, 6, 17
        q, keys, values = (torch.randn(B, H, n, d, dtype=torch.float64, device=device)
                           for n, d in ((T, Dk), (P + T, Dk), (P + T, Dv)))
        rel = torch.randn(H, M + 1, Dk, dtype=torch.float64, device=device)
        u, v = torch.randn(2, H, Dk, dtype=torch.float64, device=device)
        got = dense_attention(q, keys, values, rel=rel, u=u, v=v, mem_len=M, chunk=16)
        want = reference_attention(q, keys, values, n_invalid=0, rel=rel, u=u, v=v, mem_len=M, agg_cache=True)
    elif impl == "vq":  # blockwise against the quadratic reference, same weights
        cfg = model_config(preset, impl, overrides).replace(d_model=64, d_k=16, d_v=32, n_layer=1, n_code=32,
                                                            block_len=16, mem_len=24, d_ff=0)
        model = TransformerVQ(cfg).double().to(device).eval()
        ids = torch.randint(0, cfg.vocab_size, (1, 300), device=device)
        got = model(ids).logits
        model.config.attn_impl = "quadratic"
        want = model(ids).logits
    else:  # SDPA's fast kernels against its plain math backend
        model = build("sdpa", preset, overrides=overrides).double().to(device).eval()
        ids = torch.randint(0, 256, (1, 300), device=device)
        got = model(ids)[0]
        with sdpa_kernel(SDPBackend.MATH):
            want = model(ids)[0]
    err = (got - want).abs().max().item()
    if not err < 1e-8:
        raise WrongResult(f"{impl}: max |fast - reference| = {err:.3g} on a float64 check")


# ------------------------------------------------------------------ memory
def _reset_peak(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux)
        f.write("5")
    return _proc_kb("VmRSS") * 1024


def _peak(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return _proc_kb("VmHWM") * 1024


def _proc_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


# ----------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synthetic_state(model: torch.nn.Module, batch_size: int, pos: int, dtype: torch.dtype):
    """A state at position ``pos``: random contents, the exact shapes a real prefix would leave."""
    p = next(model.parameters())
    dev = p.device
    if not isinstance(model, TransformerVQ):  # SDPA key/value cache
        block = model.blocks[0]
        H, Dh = block.n_head, block.qkv.in_features // block.n_head
        return [(torch.randn(batch_size, H, pos, Dh, device=dev, dtype=dtype),
                 torch.randn(batch_size, H, pos, Dh, device=dev, dtype=dtype)) for _ in model.blocks]
    cfg = model.config
    B, H = batch_size, cfg.n_kv_head
    layers = []
    for gau in model.attns:
        if cfg.attention == "full":
            layers.append(LayerState(torch.randn(B, H, pos, cfg.d_k, device=dev, dtype=dtype),
                                     torch.randn(B, H, pos, cfg.head_d_v, device=dev, dtype=dtype)))
            continue
        s = gau.initial_state(B, dtype, dev)
        codes = torch.randint(0, cfg.n_code, s.codes.shape, device=dev)
        layers.append(LayerState(gau.quantizer.codebook().to(dtype)[torch.arange(H, device=dev)[None, :, None], codes],
                                 torch.rand_like(s.values), codes,
                                 torch.full_like(s.cache_count, max(pos - cfg.mem_len, 0) / cfg.n_code),
                                 torch.rand_like(s.cache_mean)))
    return TransformerVQState(layers, pos)


def measure(case: Case) -> Record:
    """Run one case in this process."""
    device, dtype = case.device, DTYPES[case.dtype]
    record = Record(case.impl, case.mode, case.seq_len, case.batch_size, None, None, device, case.dtype,
                    torch.__version__, _commit(), preset=case.preset, compiled=case.compile,
                    threads=torch.get_num_threads(), grad_checkpoint=case.grad_checkpoint, model=case.model)
    check(case.impl, case.preset, device, case.model)
    torch.manual_seed(0)
    model = build(case.impl, case.preset, case.grad_checkpoint, case.model).to(device)
    record.params = sum(p.numel() for p in model.parameters())
    B, T = case.batch_size, case.seq_len
    amp = dtype != torch.float32
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=amp)

    if case.mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, 256, (B, T + 1), device=device)
        fwd = torch.compile(model) if case.compile else model

        def step():
            with autocast:
                if isinstance(model, TransformerVQ):  # the training loss: cross-entropy + commitment
                    loss = fwd(ids[:, :-1], labels=ids[:, 1:]).loss
                else:
                    logits = fwd(ids[:, :-1])[0]
                    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if isinstance(model, TransformerVQ):
                model.update_codebooks()
        n_tokens = B * T
    elif case.mode == "forward":
        model.eval()
        ids = torch.randint(0, 256, (B, T), device=device)
        fwd = torch.compile(model) if case.compile else model

        def step():
            with torch.no_grad(), autocast:
                logits_of(fwd, ids)
        n_tokens = B * T
    else:
        model.eval()
        state0 = synthetic_state(model, B, T, dtype if amp else torch.float32)
        tok = torch.randint(0, 256, (B, 1), device=device)
        vq_decoder = isinstance(model, TransformerVQ) and model.config.attention == "vq"

        def step():
            with torch.no_grad(), autocast:
                if vq_decoder:  # what generation uses: ring buffers, in-place cache
                    decoder = model.decoder(state0, compile=case.compile)
                    for _ in range(case.decode_steps):
                        decoder.step(tok[:, 0])
                    return
                state = state0
                for _ in range(case.decode_steps):
                    _, state = logits_of(model, tok, state)
        n_tokens = B * case.decode_steps

    # peak memory of the whole step (activations, gradients, optimizer state), measured from
    # before the warm-up: the tvq command keeps freed memory, so a later baseline would hide it
    base = _reset_peak(device)
    for _ in range(case.warmup):
        step()
    _sync(device)
    for _ in range(case.repeats):
        t0 = time.perf_counter()
        step()
        _sync(device)
        record.seconds.append(time.perf_counter() - t0)
    record.peak_mem_bytes = max(_peak(device) - base, 0)
    record.tokens_per_s = n_tokens / statistics.median(record.seconds)
    record.process_tokens_per_s = [record.tokens_per_s]
    return record


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_isolated(case: Case, time_budget: float) -> Record:
    """Run a case in a subprocess; report OOM, timeout or a wrong path instead of a speed."""
    cmd = [sys.executable, "-m", "tvq.bench.runner", json.dumps(asdict(case))]
    fail = Record(case.impl, case.mode, case.seq_len, case.batch_size, None, None, case.device, case.dtype,
                  torch.__version__, _commit(), preset=case.preset, compiled=case.compile,
                  grad_checkpoint=case.grad_checkpoint, model=case.model)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=time_budget, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        fail.status, fail.detail = "timeout", f"over the {time_budget:.0f}s budget"
        return fail
    if proc.returncode == 0:
        return Record(**json.loads(proc.stdout.strip().splitlines()[-1]))
    err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
    if "WrongResult" in proc.stderr:
        fail.status = "wrong"
    elif proc.returncode in (-9, 137) or "out of memory" in proc.stderr.lower() or "MemoryError" in proc.stderr:
        fail.status = "oom"
    else:
        fail.status = "error"
    fail.detail = err[:300]
    return fail


def combine(records: list[Record]) -> Record:
    """One case run in several processes -> one record: the median of the processes' tokens/s, the
    largest peak memory, every timing. A failure in any process is the case's result."""
    for i, r in enumerate(records):
        if r.status != "ok":
            if len(records) > 1:
                r.detail = f"process {i + 1} of {len(records)}: {r.detail}"
            return r
    speeds = [r.tokens_per_s for r in records]
    return replace(records[0], tokens_per_s=statistics.median(speeds),
                   peak_mem_bytes=max(r.peak_mem_bytes for r in records),
                   seconds=[t for r in records for t in r.seconds], process_tokens_per_s=speeds)


# ------------------------------------------------------------------ report
def table(records: list[Record]) -> str:
    """Markdown: one row per (mode, seq_len), tokens/s and memory per impl, and the vq ratios."""
    impls = [i for i in IMPLS if any(r.impl == i for r in records)]
    keys = sorted({(r.mode, r.seq_len) for r in records}, key=lambda k: (MODES.index(k[0]), k[1]))
    by = {(r.impl, r.mode, r.seq_len): r for r in records}
    head = ["mode", "T (decode: position)"] + [f"{i} tok/s" for i in impls] + [f"{i} peak MiB" for i in impls]
    head += [f"vq / {i}" for i in impls if i != "vq"] if "vq" in impls else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def speed(r):
        return f"{r.tokens_per_s:,.0f}" if r and r.status == "ok" else (r.status if r else "")

    for mode, T in keys:
        rs = [by.get((i, mode, T)) for i in impls]
        row = [mode, str(T)] + [speed(r) for r in rs]
        row += [f"{r.peak_mem_bytes / 2**20:,.0f}" if r and r.status == "ok" else "" for r in rs]
        vq = by.get(("vq", mode, T))
        for i in impls:
            if i == "vq" or "vq" not in impls:  # ratio columns only beside a vq column
                continue
            other = by.get((i, mode, T))
            ok = vq and other and vq.status == other.status == "ok"
            row.append(f"{vq.tokens_per_s / other.tokens_per_s:.1f}x" if ok else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(records: list[Record], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r.mode == m for r in records)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for impl in IMPLS:
            pts = sorted((r.seq_len, r.tokens_per_s) for r in records
                         if r.impl == impl and r.mode == mode and r.status == "ok")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", title=mode, ylabel="tokens/s",
               xlabel="context position" if mode == "decode" else "sequence length")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    r0 = records[0]
    fig.suptitle(f"{r0.preset}, batch {r0.batch_size}, {r0.dtype}, {r0.device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    """``tvq bench``: parse and check every option (:mod:`tvq.bench.args`), then run the sweep."""
    return run(parse_args(argv))


def run(args) -> int:
    """The sweep of checked arguments ``args``: one isolated run per case, then the table."""
    check_device(args.device, hint=False)
    modes, impls = args.mode.split(","), args.impl.split(",")
    lens, positions = ints(args.seq_lens, "--seq-lens"), ints(args.decode_positions, "--decode-positions")
    overrides = parse_model_overrides(args.overrides)
    for impl in impls:  # a bad combination fails here, not in every case's subprocess
        if impl != "sdpa":
            model_config(args.preset, impl, overrides)
    records = []
    for mode in modes:
        for impl in impls:
            for T in positions if mode == "decode" else lens:
                case = Case(impl, mode, T, args.batch_size, args.preset, args.device, args.dtype, args.warmup,
                            args.repeats, args.decode_steps, args.compile, args.threads, args.grad_checkpoint,
                            overrides)
                r = combine([run_isolated(case, args.time_budget) for _ in range(args.processes)])
                records.append(r)
                speed = f"{r.tokens_per_s:,.0f} tok/s" if r.status == "ok" else f"{r.status}: {r.detail}"
                if r.status == "ok" and args.processes > 1:
                    speed += " (processes: " + ", ".join(f"{v:,.0f}" for v in r.process_tokens_per_s) + ")"
                print(f"{mode:8s} {impl:5s} T={T:<7d} {speed}", file=sys.stderr, flush=True)
    if overrides:
        print("model overrides: " + ", ".join(f"{k}={v}" for k, v in overrides.items()) + "\n")
    print(table(records))
    if args.json:  # checked writable before the sweep
        write_text_atomic(args.json, json.dumps([asdict(r) for r in records], indent=1))
    if args.plot:
        plot(records, args.plot)
    return 0


if __name__ == "__main__":  # one case, in a subprocess of run_isolated
    from tvq.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    case = Case(**json.loads(sys.argv[1]))
    if case.threads:
        torch.set_num_threads(case.threads)
    result = measure(case)
    print(json.dumps(asdict(result)))
