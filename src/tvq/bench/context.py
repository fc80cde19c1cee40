"""Context parallelism on this machine: a training step of one long sequence on 1, 2, 4, ... gloo processes.

For each (processes C, length T), C fresh processes (``torch.multiprocessing``, gloo on localhost) each hold
T / C tokens of one sequence and run warm-up and timed training steps (forward, backward, the gradient
all-reduce, AdamW, the codebook update) with :class:`tvq.parallel.ContextParallel`. Reported per case: the
median step time and tokens/s of the whole sequence; per rank, the peak memory (resident memory of its
process on a CPU, allocated memory on a GPU) and the part the steps added (the peak minus the memory held
after building the model and the data); the bytes
each rank sent in the exchange's collectives, counted as they were sent, beside :func:`tvq.parallel.traffic`
(the same count, computed) and what ring attention would send for the same model and length.

    python -m tvq.bench.context --ranks 1,2,4 --seq-lens 32768,65536,131072 --json out.json
    python -m tvq.bench.context --device cuda --dtype bfloat16 --ranks 1,2,4,8 ...   # nccl, one GPU per rank

On a CPU the processes share its cores (``--threads`` intra-op threads each); tokens/s then says what the
exchange and the split cost on one machine, not what C devices would gain. The memory per rank is what
a device would need.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tvq.bench.args import BENCH_PRESETS, ints
from tvq.config import TransformerVQConfig
from tvq.files import write_text_atomic
from tvq.models.transformer_vq import TransformerVQ
from tvq.runtime import tune_cpu_allocator
from tvq.usage import ArgumentParser, UsageError, check_writable_file, int_range, run_command


def _rss() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, n_ranks: int, port: int, config: dict, seq_len: int, steps: int, warmup: int,
          threads: int, device: str, dtype: str, out: str) -> None:
    """One rank of one case: its chunk of the sequence, ``warmup`` + ``steps`` training steps."""
    from tvq import parallel
    from tvq.parallel import ContextParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    cuda = device == "cuda"
    if not cuda:
        tune_cpu_allocator()  # as the tvq command does: freed activations stay mapped (tvq.runtime)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=n_ranks,
                            **({"device_id": dev} if cuda else {}))
    cp = ContextParallel() if n_ranks > 1 else None
    sent = []  # bytes this rank sends in the exchange, counted as ring collectives send them
    gather, reduce_scatter = parallel._gather, dist.reduce_scatter_single

    def counting_gather(piece, group):
        sent.append(piece.numel() * piece.element_size() * (n_ranks - 1))
        return gather(piece, group)

    def counting_reduce_scatter(buf, grad, **kwargs):
        sent.append(buf.numel() * buf.element_size() * (n_ranks - 1))
        return reduce_scatter(buf, grad, **kwargs)

    parallel._gather, dist.reduce_scatter_single = counting_gather, counting_reduce_scatter
    torch.manual_seed(0)
    model = TransformerVQ(TransformerVQConfig(**config)).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config["vocab_size"], (1, seq_len + 1), generator=g)  # (1, T + 1), the same on every rank
    T = seq_len // n_ranks
    mine = slice(rank * T, (rank + 1) * T)
    inputs, labels = ids[:, :-1][:, mine].to(dev), ids[:, 1:][:, mine].to(dev)  # (1, T / C)
    del ids
    autocast = torch.autocast(dev.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else _rss()
    times, losses = [], []
    for i in range(warmup + steps):
        sent.clear()
        dist.barrier()
        t0 = time.perf_counter()
        with autocast:
            out_ = model(inputs, labels=labels, context=cp)
        out_.loss.backward()
        for p in model.parameters():
            if p.grad is not None and n_ranks > 1:
                dist.all_reduce(p.grad)
                p.grad /= n_ranks
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_codebooks(all_reduce=dist.all_reduce if n_ranks > 1 else None)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            losses.append(out_.loss.item())
        del out_
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
    record = {"rank": rank, "step_s": times, "loss": losses, "sent_bytes": sum(sent), "peak": peak, "base": base}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def run_case(config: dict, n_ranks: int, seq_len: int, steps: int, warmup: int, threads: int,
             device: str = "cpu", dtype: str = "float32") -> dict:
    """One (C, T) case in C fresh processes (on CUDA: one GPU each, nccl) -> its record."""
    from tvq.parallel import traffic

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(n_ranks, _free_port(), config, seq_len, steps, warmup, threads, device, dtype, tmp),
                 nprocs=n_ranks)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(n_ranks)]
    step_s = statistics.median(max(r["step_s"][i] for r in ranks) for i in range(steps))
    computed = traffic(TransformerVQConfig(**config), 1, seq_len, n_ranks, dtype_bytes=2 if dtype != "float32" else 4,
                       cache_bytes=4)
    gib = 2.0**30
    return {
        "device": device, "dtype": dtype, "ranks": n_ranks, "seq_len": seq_len, "tokens_per_rank": seq_len // n_ranks, "threads_per_rank": threads,
        "step_s": step_s, "tokens_per_s": seq_len / step_s,
        "loss": ranks[0]["loss"],
        "peak_gib": [r["peak"] / gib for r in ranks],
        "step_peak_gib": [(r["peak"] - r["base"]) / gib for r in ranks],
        "sent_bytes": [r["sent_bytes"] for r in ranks],
        "sent_bytes_computed": computed["tvq"] if n_ranks > 1 else 0,
        "ring_attention_bytes": computed["ring"] if n_ranks > 1 else 0,
    }


def longest(records: list[dict]) -> dict | None:
    """The longest measured sequence whose per-rank step memory with the most processes is below that of one
    process on some shorter measured sequence: with that per-rank budget one process cannot hold it (it
    needed more already at the shorter length, and memory grows with length) and the most processes can."""
    most = max(r["ranks"] for r in records)
    if most == 1:
        return None
    one = {r["seq_len"]: max(r["step_peak_gib"]) for r in records if r["ranks"] == 1}
    many = {r["seq_len"]: max(r["step_peak_gib"]) for r in records if r["ranks"] == most}
    best = None
    for T, need in sorted(many.items()):
        over = [t for t, m in one.items() if t <= T and m > need]  # one process already needs more at t <= T
        if over:
            budget_at = max(over)
            held = [t for t, m in one.items() if m <= need]
            best = {"seq_len": T, "ranks": most, "budget_gib": need,
                    "one_process_needs_gib": one[budget_at], "at_seq_len": budget_at,
                    "one_process_holds": max(held) if held else None}
    return best


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m tvq.bench.context", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2,4", help="comma-separated numbers of processes (default 1,2,4)")
    p.add_argument("--seq-lens", default="32768,65536,131072", help="comma-separated sequence lengths")
    p.add_argument("--preset", default="bench-small", choices=sorted(BENCH_PRESETS), help="model shape")
    p.add_argument("--steps", type=int_range(1), default=2, help="timed steps per case (default 2)")
    p.add_argument("--warmup", type=int_range(0), default=1, help="untimed steps first (default 1)")
    p.add_argument("--threads", type=int_range(1), default=None,
                   help="intra-op threads per process (default: the cores shared out, at least 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (gloo, peak resident memory) or cuda (one GPU per rank, nccl, peak allocated memory)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="autocast dtype")
    p.add_argument("--json", help="write the records here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    ranks, lens = ints(args.ranks, "--ranks"), ints(args.seq_lens, "--seq-lens")
    config = dict(BENCH_PRESETS[args.preset])
    for C in ranks:
        for T in lens:
            if T % C:
                raise UsageError(f"--seq-lens {T} is not a multiple of --ranks {C}")
            try:
                TransformerVQConfig(**config).check_context_chunk(T // C)
            except ValueError as e:
                raise UsageError(f"--ranks {C} with --seq-lens {T}: {e}") from None
    if args.json:
        check_writable_file(args.json, "--json")
    if args.device == "cuda" and max(ranks) > torch.cuda.device_count():
        raise UsageError(f"--ranks {max(ranks)} needs {max(ranks)} CUDA devices; there are {torch.cuda.device_count()}")
    cores = os.cpu_count() or 1
    load = os.getloadavg()
    records = []
    for C in ranks:
        threads = args.threads or max(1, cores // C)
        for T in lens:
            rec = run_case(config, C, T, args.steps, args.warmup, threads, args.device, args.dtype)
            records.append(rec)
            print(f"C={C} T={T}: {rec['tokens_per_s']:,.0f} tokens/s, step {rec['step_s']:.2f} s, "
                  f"step peak per rank {max(rec['step_peak_gib']):.2f} GiB (process {max(rec['peak_gib']):.2f}), "
                  f"sent {max(rec['sent_bytes']) / 2**20:.2f} MiB/rank (ring attention "
                  f"{rec['ring_attention_bytes'] / 2**20:.0f} MiB)", flush=True)
    result = {"preset": args.preset, "device": args.device, "dtype": args.dtype, "config": config, "cores": cores, "load_before": load,
              "load_after": os.getloadavg(), "torch": torch.__version__, "records": records,
              "longest": longest(records), "command": " ".join(["python -m tvq.bench.context", *argv])}
    if result["longest"]:
        lo = result["longest"]
        print(f"longest: {lo['seq_len']} tokens on {lo['ranks']} ranks at {lo['budget_gib']:.2f} GiB per rank; "
              f"one process needs {lo['one_process_needs_gib']:.2f} GiB already at {lo['at_seq_len']}")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
