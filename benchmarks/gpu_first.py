"""The one script to run when a GPU is lent (issues 24 and 25).

    PYTHONPATH=src python benchmarks/gpu_first.py [--json PATH] [--compile] [--budget-scale X] [--parts a,b]
    DEV=cpu PYTHONPATH=src python benchmarks/gpu_first.py --json /tmp/g.json   # CPU dry run, tiny shapes (CI)

Parts, in this order, each with its own time budget (work left in a part once over budget is recorded
"skipped: budget"; the JSON is rewritten after every measurement, so a kill keeps what was done):
  equivalence  the Triton kernels first: blockwise attention with the kernels (tvq.ops.kernels, the default on
               CUDA) in bf16, fp16 and fp32 vs float64 on the CPU, outputs and grads, both straight-through rules,
               left padding; then the PyTorch path and the quadratic reference on the device; a tiny whole model
               with the kernels vs without them on the device (loss and every parameter's gradient, fp32 and
               bf16 autocast) and its fp32 logits vs float64 on the CPU
  train32k     enwik8 shape, B = 1, 32k tokens: vq (the kernels), vq_torch (the PyTorch path) and SDPA training
               tokens/s and peak memory, eager
  crossover    the same at 8k and 131k (grad checkpointing at 131k, no vq_torch there; OOM recorded)
  profile      the cost model's step (tvq.bench.cost: enwik8 preset, bf16 autocast, forward with labels,
               backward, update_codebooks) at 8k and 32k under torch.profiler: CUDA kernel count (to set beside
               the cost model's count), the kernels' device time against the step's wall time, top 25 kernels
  decode       decode at position 65,536: tvq eager, tvq CUDA graph, SDPA static KV cache
  graphed      a whole training step (forward, backward, SGD step) captured in one CUDA graph and replayed, vq and
               SDPA at 8k and 32k: the step without host overhead (not run yet on a GPU)
  compiled     torch.compile: vq and SDPA at 32k, then 8k (always on CUDA; on CPU with --compile)
"""
from __future__ import annotations

import argparse
import json
import os
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
        from tvq.ops.kernels import HAVE_TRITON
        if HAVE_TRITON:
            import triton
            self.data["triton"] = triton.__version__

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
    if isinstance(getattr(model, "_orig_mod", model), TransformerVQ):  # also under torch.compile
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
        step_fn = torch.compile(model, dynamic=False)  # one static graph per length (no dynamic recompile)
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
    paths = []
    if HAVE_TRITON and not CPU:  # "blockwise" runs the Triton kernels (tvq.ops.kernels); "blockwise_torch" not
        paths.append(("blockwise", blockwise_attention, contextlib.nullcontext))
        paths.append(("blockwise_torch", blockwise_attention, lambda: use_kernels(False)))
    else:
        paths.append(("blockwise", blockwise_attention, contextlib.nullcontext))
    paths.append(("quadratic", quadratic_attention, contextlib.nullcontext))
    refs = {}
    for name, fn, ctx in paths:
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            dn = str(dt).split(".")[1]
            for rule, thru, ninv in switches:
                case = f"{rule}_thru{int(thru)}_ninv{ninv.tolist() if isinstance(ninv, torch.Tensor) else ninv}"
                if time.time() > budget:
                    res[f"{name}_{dn}_{case}"] = "skipped: budget"
                    continue
                if case not in refs:
                    refs[case] = run(quadratic_attention, torch.float64, "cpu", rule, thru, ninv)
                ref_out, ref_grads = refs[case]
                try:
                    with ctx():
                        out, grads = run(fn, dt, DEV, rule, thru, ninv)
                except Exception as e:
                    ok = False
                    res[f"{name}_{dn}_{case}"] = f"error: {type(e).__name__}: {str(e)[:300]}"
                    rep.save()
                    continue
                scale = ref_out.abs().max().item() + 1e-12
                err = (out - ref_out).abs().max().item() / scale
                gerr = max((g - r).abs().max().item() / (r.abs().max().item() + 1e-12)
                           for g, r in zip(grads, ref_grads))
                good = err <= tol[dn] and gerr <= tol[dn] * 4
                ok &= good
                res[f"{name}_{dn}_{case}"] = {"out_rel_err": err, "grad_rel_err": gerr, "tol": tol[dn], "ok": good}
                rep.save()
    # whole model: tiny config without dropout
    from tvq.models.transformer_vq import TransformerVQ
    from tvq.bench.runner import model_config
    cfg = model_config("enwik8", "vq", dict(d_model=32, d_k=16, d_v=64, n_code=16, block_len=16, mem_len=16,
                                            n_layer=2, dropout_emb=0.0, dropout_sin=0.0, dropout_res=0.0,
                                            layerdrop=0.0))
    torch.manual_seed(0)
    m64 = TransformerVQ(cfg).double().eval()
    ids = torch.randint(0, 256, (2, 64))
    interpret = os.environ.get("TRITON_INTERPRET") == "1"  # on a CPU: the kernels through Triton's interpreter
    if HAVE_TRITON and (interpret or not CPU) and time.time() < budget:
        # the kernels against the PyTorch path on the device: the quantizer, RMSNorm, gate and residual kernels
        # besides the attention ones, forward and backward, training mode (EMA statistics, commit loss)
        mdev = TransformerVQ(cfg).to(DEV).train()
        mdev.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in m64.state_dict().items()})
        for amp in (False, True) if not CPU else (False,):  # the interpreter runs no bf16
            key = f"model_kernels_vs_torch_{'bf16_autocast' if amp else 'fp32'}"
            got = {}
            try:
                for on in (True, False):
                    mdev.zero_grad(set_to_none=True)
                    with use_kernels(on), torch.autocast("cuda" if not CPU else "cpu", dtype=torch.bfloat16, enabled=amp):
                        loss = mdev(ids.to(DEV), labels=ids.roll(-1, 1).to(DEV)).loss
                    loss.backward()
                    got[on] = (loss.item(), {n: q.grad.double().cpu() for n, q in mdev.named_parameters()
                                             if q.grad is not None})
                t = 5e-2 if amp else 1e-4
                lerr = abs(got[True][0] - got[False][0]) / abs(got[False][0])
                gerr = max((got[True][1][n] - g).abs().max().item() / (g.abs().max().item() + 1e-12)
                           for n, g in got[False][1].items())
                good = lerr <= t and gerr <= 4 * t and set(got[True][1]) == set(got[False][1])
                res[key] = {"loss_rel_err": lerr, "grad_rel_err": gerr, "params_with_grad": len(got[False][1]),
                            "tol": t, "ok": good}
            except Exception as e:
                good = False
                res[key] = f"error: {type(e).__name__}: {str(e)[:300]}"
            ok &= good
            rep.save()
    mdev = TransformerVQ(cfg).to(DEV).eval()
    mdev.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in m64.state_dict().items()})
    with torch.no_grad():
        want = m64(ids).logits
        got = mdev(ids.to(DEV)).logits.double().cpu()
    err = (got - want).abs().max().item()
    res["model_logits_fp32_vs_f64"] = {"max_abs_err": err, "tol": 1e-3, "ok": err <= 1e-3}
    ok &= err <= 1e-3
    rep.save()
    p["ok"] = bool(ok)


def _train_part(rep, name, cases, budget, args):
    """``cases``: (seq_len, impl, compiled) in order; grad checkpointing from 64k tokens (on a GPU)."""
    p = rep.part(name)
    for T, impl, comp in cases:
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
    T = 512 if CPU else 32768
    _train_part(rep, "train32k", [(T, impl, False) for impl in ("vq", "vq_torch", "sdpa")], budget, args)


def part_crossover(rep, budget, args):
    short, long_ = (256, 1024) if CPU else (8192, 131072)
    _train_part(rep, "crossover", [(short, impl, False) for impl in ("vq", "vq_torch", "sdpa")]
                + [(long_, impl, False) for impl in ("vq", "sdpa")], budget, args)


def graphed_speed(impl, T, repeats=3):
    """A whole training step (forward, backward, SGD step) captured in one CUDA graph and replayed: the step without
    host overhead (the eager step at 8k is host-bound). PyTorch's whole-network capture recipe: warm-up on a side
    stream, capture with the gradients unset, replay."""
    from tvq.ops.kernels import HAVE_TRITON
    model = build("vq" if impl == "vq_torch" else impl).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    ids = torch.randint(0, 256, (1, T), device=DEV)
    rec = {"impl": impl, "seq_len": T, "batch": 1, "cuda_graph": True,
           "triton_kernels": impl == "vq" and HAVE_TRITON and not CPU}

    def step():
        with autocast(), kernels(impl):
            loss = loss_of(model, ids)
        loss.backward()
        opt.step()

    reset_peak()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    t = time.time()
    with torch.cuda.graph(graph):
        step()
    sync()
    rec["capture_s"] = round(time.time() - t, 3)
    times = []
    for _ in range(repeats):
        sync()
        t = time.time()
        graph.replay()
        sync()
        times.append(time.time() - t)
    best = min(times)
    rec.update(step_s=round(best, 4), tokens_per_s=round(T / best, 1), peak_gb=peak_gb())
    del graph, model, opt
    return rec


def part_graphed(rep, budget, args):
    p = rep.part("graphed")
    if CPU:
        p["status"] = "skipped"
        p["results"]["note"] = "skipped: needs CUDA"
        return
    for T in (8192, 32768):
        for impl in ("vq", "sdpa"):
            key = f"{impl}_{T}_cuda_graph"
            if time.time() > budget:
                p["results"][key] = "skipped: budget"
            else:
                try:
                    p["results"][key] = graphed_speed(impl, T)
                except Exception as e:
                    p["results"][key] = "oom" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"
                    torch.cuda.empty_cache()
            rep.save()


def part_compiled(rep, budget, args):
    p = rep.part("compiled")
    if CPU and not args.compile:
        p["status"] = "skipped"
        p["results"]["note"] = "skipped: on CPU only with --compile"
        return
    lens = (512, 256) if CPU else (32768, 8192)
    _train_part(rep, "compiled", [(T, impl, True) for T in lens for impl in ("vq", "sdpa")], budget, args)


def part_profile(rep, budget, args):
    """The cost model's training step (tvq.bench.cost.measure, mode "train") under the profiler, at two lengths:
    the CUDA kernel count (beside the cost model's), the kernels' summed device time against the step's wall
    time (the share of the step the GPU is busy: eager launch overhead is the rest), top kernels."""
    from torch.profiler import ProfilerActivity, profile

    from tvq.bench.cost import preset_config
    from tvq.models.transformer_vq import TransformerVQ
    p = rep.part("profile")
    cfg = preset_config("enwik8", enwik8_overrides() or None)
    torch.manual_seed(0)
    model = TransformerVQ(cfg).to(DEV).train()
    for T in (256, 512) if CPU else (8192, 32768):
        if time.time() > budget:
            p["results"][str(T)] = "skipped: budget"
            continue
        ids = torch.randint(0, 256, (1, T), device=DEV)

        def step():
            with autocast():
                out = model(ids, labels=ids.roll(-1, 1))
            out.loss.backward()
            model.update_codebooks()
            model.zero_grad(set_to_none=True)

        step()
        step()
        sync()
        t = time.time()
        step()
        sync()
        wall = time.time() - t
        acts = [ProfilerActivity.CPU] + ([] if CPU else [ProfilerActivity.CUDA])
        with profile(activities=acts) as prof:
            step()
            sync()
        res = p["results"][str(T)] = {"step_wall_ms": round(wall * 1e3, 2)}
        if not CPU:
            dev = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
            copies = [e for e in dev if e.name.lower().startswith(("memcpy", "memset"))]
            busy = sum(e.time_range.elapsed_us() for e in dev)
            res.update(kernel_count=len(dev) - len(copies), memcpy_memset_count=len(copies),
                       kernels_device_ms=round(busy / 1e3, 2), gpu_busy_share=round(busy / 1e3 / (wall * 1e3), 3))
            by_name = {}
            for e in dev:
                n, c, us = by_name.get(e.name, (e.name, 0, 0.0))
                by_name[e.name] = (n, c + 1, us + e.time_range.elapsed_us())
            res["top25"] = [{"name": n[:120], "count": c, "time_us": round(us, 1)}
                            for n, c, us in sorted(by_name.values(), key=lambda r: -r[2])[:25]]
        else:
            evs = prof.key_averages()
            res["op_count"] = sum(e.count for e in evs if e.key.startswith("aten::"))
            res["top25"] = [{"name": e.key[:120], "count": e.count, "time_us": round(e.self_cpu_time_total, 1)}
                            for e in sorted(evs, key=lambda e: -e.self_cpu_time_total)[:25]]
        rep.save()
    p["results"]["step"] = "enwik8 preset (dropouts on), bf16 autocast, forward with labels, backward, update_codebooks"


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


PARTS = [("equivalence", part_equivalence, 90), ("train32k", part_train32k, 60), ("crossover", part_crossover, 110),
         ("profile", part_profile, 30), ("decode", part_decode, 40), ("graphed", part_graphed, 60),
         ("compiled", part_compiled, 120)]


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
            if p["status"] == "running":
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
