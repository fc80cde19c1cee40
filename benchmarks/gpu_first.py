"""The one script to run when a GPU is lent (issue 24, item 6).

    PYTHONPATH=src python benchmarks/gpu_first.py [--json PATH] [--compile] [--budget SECONDS]
    DEV=cpu PYTHONPATH=src python benchmarks/gpu_first.py --json /tmp/g.json   # CPU dry run, tiny shapes (CI)

Parts, each with its own time budget (work left in a part once over budget is recorded "skipped: budget";
the JSON is rewritten after every measurement, so a kill keeps what was done):
  equivalence  blockwise vs quadratic attention on the device vs float64 CPU, outputs and grads;
               on CUDA with and without the Triton kernels, fp32/fp16/bf16, both straight-through rules, left padding;
               a tiny whole model's logits on the device vs CPU float64; pytest tests/test_golden.py if pytest exists
  train32k     enwik8 shape, B = 1, 32k tokens: vq vs SDPA training tokens/s and peak memory, eager and compiled;
               vq with the fused Triton kernels (tvq.ops.kernels, the default on CUDA when Triton imports) and
               without them (vq_torch: the PyTorch path)
  crossover    the same at 8k and 131k (grad checkpointing at 131k; OOM recorded)
  profile      torch.profiler over one vq training step: top 15 kernels by device time, kernel count
  decode       decode at position 65,536: tvq eager, tvq CUDA graph, SDPA static KV cache
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import contextlib

import torch
import torch.nn.functional as F

DEV = os.environ.get("DEV", "cuda" if torch.cuda.is_available() else "cpu")
CPU = DEV == "cpu"
T0 = time.time()


class Report:
    def __init__(self, path):
        self.path, self.data = path, {"device": DEV, "torch": torch.__version__, "parts": {}}
        if torch.cuda.is_available() and not CPU:
            self.data["gpu"] = torch.cuda.get_device_name()

    def part(self, name):
        return self.data["parts"].setdefault(name, {"status": "running", "results": {}})

    def save(self):
        self.data["elapsed_s"] = round(time.time() - T0, 2)
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1, default=str)
            os.replace(tmp, self.path)


def sync():
    if not CPU:
        torch.cuda.synchronize()


def reset_peak():
    if not CPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb():
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if not CPU else None


def autocast():
    return torch.autocast("cuda" if not CPU else "cpu", dtype=torch.bfloat16, enabled=not CPU)


def is_oom(e):
    return isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(e).lower()


# ------------------------------------------------------------------------------------------ models
def enwik8_overrides():
    if CPU:
        return dict(d_model=32, d_k=8, d_v=64, n_code=16, block_len=32, mem_len=32, n_layer=2)
    return {}


def build(impl, grad_checkpoint=False):
    from tvq.bench.runner import build as bench_build
    from tvq.bench import runner
    ov = enwik8_overrides()
    # keep only fields the config knows (n_layer names differ between versions)
    fields = set(runner.model_config("enwik8", "vq").__dataclass_fields__) if hasattr(
        runner.model_config("enwik8", "vq"), "__dataclass_fields__") else set(ov)
    ov = {k: v for k, v in ov.items() if k in fields}
    return bench_build(impl, "enwik8", grad_checkpoint=grad_checkpoint, overrides=ov or None)


def loss_of(model, ids):
    from tvq.models.transformer_vq import TransformerVQ
    labels = ids.roll(-1, 1)
    if isinstance(model, TransformerVQ):
        return model(ids, labels=labels).loss
    logits, _ = model(ids, None)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def kernels(impl):
    """The Triton kernels off for ``vq_torch`` (the PyTorch path), as chosen by tvq otherwise."""
    from tvq.ops.kernels import use_kernels
    return use_kernels(False) if impl == "vq_torch" else contextlib.nullcontext()


def train_speed(impl, T, compile_=False, grad_checkpoint=False, repeats=3, deadline=None):
    from tvq.ops.kernels import HAVE_TRITON
    model = build("vq" if impl == "vq_torch" else impl, grad_checkpoint).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    step_fn = model
    rec = {"impl": impl, "seq_len": T, "batch": 1, "compiled": compile_, "grad_checkpoint": grad_checkpoint,
           "triton_kernels": impl == "vq" and HAVE_TRITON and not CPU}
    if compile_:
        step_fn = torch.compile(model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 256
    ids = torch.randint(0, min(vocab, 256), (1, T), device=DEV)

    def step():
        with autocast(), kernels(impl):
            loss = loss_of(step_fn, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak()
    t = time.time()
    step()  # warmup (and compile)
    sync()
    rec["first_step_s" if not compile_ else "compile_s"] = round(time.time() - t, 3)
    times = []
    for _ in range(repeats):
        if deadline and time.time() > deadline:
            rec["note"] = "skipped: budget (fewer repeats)"
            break
        sync()
        t = time.time()
        step()
        sync()
        times.append(time.time() - t)
    if times:
        best = min(times)
        rec.update(step_s=round(best, 4), tokens_per_s=round(T / best, 1))
    rec["peak_gb"] = peak_gb()
    del model, opt, step_fn
    return rec


# ------------------------------------------------------------------------------------------ parts
def part_equivalence(rep, budget, args):
    from tvq.ops import blockwise_attention, quadratic_attention
    p = rep.part("equivalence")
    res = p["results"]
    torch.manual_seed(0)
    B, H, T, Dk, Dv, M, L, S = 2, 2, 11, 3, 2, 3, 4, 5  # the shapes of test_rules_match_their_per_pair_definition
    f64 = dict(dtype=torch.float64)
    codebook = torch.randn(H, S, Dk, **f64)
    codes = torch.randint(0, S, (B, H, M + T))
    keys = codebook[torch.arange(H)[:, None], codes]
    values = torch.randn(B, H, M + T, Dv, **f64)
    q = torch.randn(B, H, T, Dk, **f64)
    rel = torch.randn(H, M + 1, Dk, **f64)
    u, vb = torch.randn(H, Dk, **f64), torch.randn(H, Dk, **f64)
    count = torch.tensor([0.0, 1.0, 3.0, 0.0, 2.0], **f64).expand(B, H, S)
    mean = torch.randn(B, H, S, Dv, **f64)
    base = (q, keys, values, rel, u, vb, mean)
    # (straight-through rule, grad_thru_cache, empty slots: an int or one per row (left padding))
    switches = [("block", True, 0), ("window", True, 0), ("window", False, 2), ("block", False, torch.tensor([0, 6]))]

    def run(fn, dtype, device, rule, thru, n_invalid):
        xs = [x.detach().to(device, dtype).requires_grad_() for x in base]
        qq, kk, vv, rr, uu, bb, mm = xs
        ninv = n_invalid.to(device) if isinstance(n_invalid, torch.Tensor) else n_invalid
        out = fn(qq, kk, vv, codes.to(device), n_invalid=ninv, rel=rr, u=uu, v=bb, mem_len=M, block_len=L,
                 agg_cache=True, grad_thru_cache=thru,
                 cache=(codebook.to(device, dtype), count.to(device, dtype), mm), straight_through=rule)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), **f64).to(device, dtype)
        grads = torch.autograd.grad((out * w).sum(), xs)
        return out.detach().double().cpu(), [g.double().cpu() for g in grads]

    tol = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
    ok = True
    from tvq.ops.kernels import HAVE_TRITON, use_kernels
    paths = [("blockwise", blockwise_attention, contextlib.nullcontext), ("quadratic", quadratic_attention,
                                                                          contextlib.nullcontext)]
    if HAVE_TRITON and not CPU:  # "blockwise" ran the Triton kernels (tvq.ops.kernels); the PyTorch path too
        paths.append(("blockwise_torch", blockwise_attention, lambda: use_kernels(False)))
    for rule, thru, ninv in switches:
        case = f"{rule}_thru{int(thru)}_ninv{ninv.tolist() if isinstance(ninv, torch.Tensor) else ninv}"
        ref_out, ref_grads = run(quadratic_attention, torch.float64, "cpu", rule, thru, ninv)
        for name, fn, ctx in paths:
            for dt in (torch.float32, torch.float16, torch.bfloat16):
                dn = str(dt).split(".")[1]
                with ctx():
                    out, grads = run(fn, dt, DEV, rule, thru, ninv)
                scale = ref_out.abs().max().item() + 1e-12
                err = (out - ref_out).abs().max().item() / scale
                gerr = max((g - r).abs().max().item() / (r.abs().max().item() + 1e-12)
                           for g, r in zip(grads, ref_grads))
                good = err <= tol[dn] and gerr <= tol[dn] * 4
                ok &= good
                res[f"{name}_{dn}_{case}"] = {"out_rel_err": err, "grad_rel_err": gerr, "tol": tol[dn], "ok": good}
                rep.save()
    # whole model: tiny config, device fp32 vs CPU float64
    from tvq.config import TransformerVQConfig
    from tvq.models.transformer_vq import TransformerVQ
    from tvq.bench.runner import model_config
    cfg = model_config("enwik8", "vq", {k: v for k, v in dict(
        d_model=32, d_k=8, d_v=64, n_code=16, block_len=16, mem_len=16).items()})
    try:
        cfg = cfg.replace(n_layer=2)
    except Exception:
        pass
    torch.manual_seed(0)
    m64 = TransformerVQ(cfg).double().eval()
    mdev = TransformerVQ(cfg).to(DEV).eval()
    mdev.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in m64.state_dict().items()})
    ids = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        want = m64(ids).logits
        got = mdev(ids.to(DEV)).logits.double().cpu()
    err = (got - want).abs().max().item()
    res["model_logits_fp32_vs_f64"] = {"max_abs_err": err, "tol": 1e-3, "ok": err <= 1e-3}
    ok &= err <= 1e-3
    rep.save()
    try:
        import pytest  # noqa: F401
        if time.time() < budget:
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_golden.py"],
                               capture_output=True, text=True, timeout=max(5, budget - time.time()),
                               env={**os.environ, "PYTHONPATH": "src"})
            res["pytest_golden"] = {"rc": r.returncode, "tail": r.stdout[-400:]}
            ok &= r.returncode == 0
        else:
            res["pytest_golden"] = "skipped: budget"
    except ImportError:
        res["pytest_golden"] = "skipped: pytest not installed"
    except subprocess.TimeoutExpired:
        res["pytest_golden"] = "skipped: budget"
    p["ok"] = bool(ok)


def _train_part(rep, name, lens, budget, args):
    p = rep.part(name)
    for T in lens:
        for impl in ("vq", "vq_torch", "sdpa"):
            for comp in ((False, True) if args.compile or not CPU else (False,)):
                if impl == "vq_torch" and comp:  # compiled: vq only (inductor calls the kernels' custom ops)
                    continue
                key = f"{impl}_{T}_{'compiled' if comp else 'eager'}"
                if time.time() > budget:
                    p["results"][key] = "skipped: budget"
                    rep.save()
                    continue
                gc = T >= (65536 if not CPU else 10**9)
                try:
                    p["results"][key] = train_speed(impl, T, comp, gc, repeats=2 if CPU else 3, deadline=budget)
                except Exception as e:
                    p["results"][key] = "oom" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"
                    if not CPU:
                        torch.cuda.empty_cache()
                rep.save()


def part_train32k(rep, budget, args):
    _train_part(rep, "train32k", [512 if CPU else 32768], budget, args)


def part_crossover(rep, budget, args):
    _train_part(rep, "crossover", [256 if CPU else 8192, 1024 if CPU else 131072], budget, args)


def part_profile(rep, budget, args):
    from torch.profiler import ProfilerActivity, profile
    p = rep.part("profile")
    T = 512 if CPU else 32768
    model = build("vq").to(DEV)
    ids = torch.randint(0, 256, (1, T), device=DEV)

    def step():
        with autocast():
            loss = loss_of(model, ids)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    sync()
    acts = [ProfilerActivity.CPU] + ([] if CPU else [ProfilerActivity.CUDA])
    with profile(activities=acts) as prof:
        step()
        sync()
    evs = prof.key_averages()
    attr = "self_cpu_time_total" if CPU else ("self_device_time_total" if hasattr(evs[0], "self_device_time_total")
                                             else "self_cuda_time_total")
    rows = [e for e in evs if getattr(e, attr, 0) > 0]
    if not CPU:
        kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        p["results"]["kernel_count"] = len(kernels)
    else:
        p["results"]["op_count"] = sum(e.count for e in evs if e.key.startswith("aten::"))
    rows.sort(key=lambda e: -getattr(e, attr))
    p["results"]["seq_len"] = T
    p["results"]["top15"] = [{"name": e.key[:120], "time_us": round(getattr(e, attr), 1), "count": e.count}
                             for e in rows[:15]]
    p["results"]["timing_field"] = attr


def _decode_rate(step, tok, n, deadline):
    step(tok)
    sync()
    t, done = time.time(), 0
    for _ in range(n):
        if time.time() > deadline:
            break
        step(tok)
        done += 1
    sync()
    return round(done / (time.time() - t), 2) if done else "skipped: budget"


def part_decode(rep, budget, args):
    from tvq.bench.runner import synthetic_state
    p = rep.part("decode")
    res = p["results"]
    pos = 512 if CPU else 65536
    n = 8 if CPU else 64
    res["position"] = pos
    dtype = torch.bfloat16 if not CPU else torch.float32
    model = build("vq").to(DEV).eval()
    tok = torch.randint(0, 256, (1, 1), device=DEV)
    with torch.no_grad(), autocast():
        st = synthetic_state(model, 1, pos, torch.float32)
        dec = model.decoder(st)
        res["tvq_eager_tokens_per_s"] = _decode_rate(dec.step, tok, n, budget)
        rep.save()
        if CPU:
            res["tvq_cuda_graph_tokens_per_s"] = "skipped: needs CUDA"
        elif time.time() > budget:
            res["tvq_cuda_graph_tokens_per_s"] = "skipped: budget"
        else:
            try:
                dec = model.decoder(synthetic_state(model, 1, pos, torch.float32), cuda_graph=True)
                res["tvq_cuda_graph_tokens_per_s"] = _decode_rate(dec.step, tok, n, budget)
            except Exception as e:
                res["tvq_cuda_graph_tokens_per_s"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        rep.save()
    del model
    # SDPA with a static, preallocated KV cache
    if time.time() > budget:
        res["sdpa_static_kv_tokens_per_s"] = "skipped: budget"
        return
    sd = build("sdpa").to(DEV).eval()
    blocks = sd.blocks
    H = blocks[0].n_head
    D = blocks[0].qkv.in_features
    Dh = D // H
    cap = pos + n + 2
    kc = [torch.randn(1, H, cap, Dh, device=DEV, dtype=dtype) for _ in blocks]
    vc = [torch.randn(1, H, cap, Dh, device=DEV, dtype=dtype) for _ in blocks]
    cur = [pos]
    emb = next(m for m in sd.modules() if isinstance(m, torch.nn.Embedding))

    def sdpa_step(t):
        x = emb(t).to(dtype)
        i = cur[0]
        for b, k_, v_ in zip(blocks, kc, vc):
            qkv = F.linear(x, b.qkv.weight.to(dtype)).view(1, 1, 3, H, Dh)
            q, k, v = qkv.unbind(2)
            k_[:, :, i] = k[:, 0]
            v_[:, :, i] = v[:, 0]
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k_[:, :, :i + 1], v_[:, :, :i + 1])
            x = x + o.transpose(1, 2).reshape(1, 1, D)
        cur[0] = i + 1
        return x

    with torch.no_grad():
        res["sdpa_static_kv_tokens_per_s"] = _decode_rate(sdpa_step, tok, n, budget)
    res["sdpa_static_kv_note"] = "attention + qkv per layer over a preallocated cache (no MLP/out-proj): a lower bound on SDPA decode cost"


PARTS = [("equivalence", part_equivalence, 60), ("train32k", part_train32k, 80), ("crossover", part_crossover, 90),
         ("profile", part_profile, 30), ("decode", part_decode, 40)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--compile", action="store_true", help="on CPU: also run torch.compile (always on for CUDA)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    ap.add_argument("--parts", default=",".join(n for n, _, _ in PARTS))
    args = ap.parse_args(argv)
    path = args.json or (os.path.join(os.environ["OUT"], "gpu_first.json") if os.environ.get("OUT") else "gpu_first.json")
    rep = Report(path)
    want = args.parts.split(",")
    unknown = [n for n in want if n not in {name for name, _, _ in PARTS}]
    if unknown:
        ap.error(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(n for n, _, _ in PARTS)}")
    for name, fn, secs in PARTS:
        if name not in want:
            continue
        p = rep.part(name)
        start = time.time()
        p["budget_s"] = secs * args.budget_scale
        try:
            fn(rep, start + secs * args.budget_scale, args)
            p["status"] = "ok"
        except Exception as e:
            p["status"] = "oom" if is_oom(e) else "error"
            p["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            p["traceback"] = traceback.format_exc()[-1500:]
        p["elapsed_s"] = round(time.time() - start, 2)
        rep.save()
        print(f"[{name}] {p['status']} in {p['elapsed_s']}s", flush=True)
    print(json.dumps({n: p["results"] for n, p in rep.data["parts"].items()}, indent=1, default=str)[:6000])
    print(f"wrote {path} ({rep.data['elapsed_s']}s)")


if __name__ == "__main__":
    main()
