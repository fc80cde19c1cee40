"""Memory of Hugging Face ``generate`` with a tvq model: the cache's size and the process's peak memory
after N generated tokens, for Transformer-VQ and for the same model with dense attention.

Each case runs in a fresh process (bench-small weights, random, float32, CPU, batch 1, a 16-token
prompt, greedy, exactly N new tokens). ``cache_bytes`` counts every tensor the returned cache holds;
``peak_rss_growth`` is the growth of the process's peak RSS (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``) over its RSS before ``generate``.

    python benchmarks/hf_generate_memory.py --json benchmarks/results/hf_generate_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BENCH_SMALL = dict(vocab_size=256, d_model=256, d_k=64, d_v=512, n_head=1, n_layer=2, n_code=256,
                   block_len=128, mem_len=128)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(attention: str, n_new: int) -> dict:
    import torch

    from tvq import TransformerVQConfig
    from tvq.hf import TransformerVQForCausalLM, TransformerVQHFConfig

    torch.manual_seed(0)
    config = TransformerVQHFConfig.from_tvq(TransformerVQConfig(**BENCH_SMALL, attention=attention))
    model = TransformerVQForCausalLM(config).eval()
    prompt = torch.randint(1, 256, (1, 16))
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm up
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status("VmRSS")
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                             return_dict_in_generate=True)
        seconds = time.perf_counter() - t0
    cache = out.past_key_values
    return {"attention": attention, "new_tokens": n_new, "positions": cache.get_seq_length(),
            "cache_bytes": cache.nbytes(), "peak_rss_growth": _status("VmHWM") - before,
            "ms_per_token": 1000 * seconds / n_new}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="10,100,1000")
    p.add_argument("--attention", default="vq,full")
    p.add_argument("--json")
    p.add_argument("--case", nargs=2, metavar=("ATTENTION", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]))))
        return
    rows = []
    for attention in args.attention.split(","):
        for n in map(int, args.tokens.split(",")):
            out = subprocess.run([sys.executable, __file__, "--case", attention, str(n)], check=True,
                                 capture_output=True, text=True, env=dict(os.environ, TVQ_KEEP_MALLOC="1"))
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": BENCH_SMALL, "load": os.getloadavg(), "cases": rows}, f, indent=2)


if __name__ == "__main__":
    main()
