#!/usr/bin/env bash
# The CUDA sweep of the speed issue, in stages that each fit a 10-minute run:
#   bash benchmarks/gpu_sweep.sh STAGE [OUT_DIR]     (OUT_DIR defaults to benchmarks/results)
# STAGE:
#   small      bench-small, bfloat16, batch 1: train + forward of vq, full and sdpa, 2k..131k tokens
#   compiled   the same for vq with torch.compile
#   decode     bench-small decode at positions 1024 and 65536 (eager and compiled vq; full; sdpa)
#   enwik8     the paper's 190M enwik8 shape, bfloat16, batch 1: train of vq, full and sdpa at 8k, 32k, 131k,
#              every model recomputing each layer in backward (B = 8 at 131k could not fit: ~38 KB per token
#              and GAU x 48 GAUs x 8 x 131k; at B = 1 with checkpointing it fits 80-140 GB)
# Runs from the checkout with nothing installed (PYTHONPATH=src python -m tvq); every stage is wrapped in
# `timeout $STAGE_BUDGET` (default 540 s) so it ends inside a 10-minute run. For a first look on a lent GPU
# run benchmarks/gpu_first.py instead (~5 minutes, all parts).
#   context    context parallelism over every GPU of the machine (needs 2 or more): nccl, one GPU per rank,
#              bench-small bfloat16 training steps of one sequence of 128k..1M tokens on 1, 2, 4, 8 ranks:
#              tokens/s, peak memory per rank, bytes sent against ring attention (python -m tvq.bench.context)
#   recall     tvq recall at larger sizes on the GPU: the CPU default (window 32, 256 tokens) trained to a
#              plateau with and without benchmarks/recall_config.json, then window 128 over 1024-token
#              sequences (d_model 256, n_code 256): answers up to 8 windows back
# Lengths a baseline cannot run come out as oom / timeout, not dropped.
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${STAGE_BUDGET:-540}
py() { timeout --signal=INT --kill-after=20 "$budget" env PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} python "$@"; }
tvq() { py -m tvq "$@"; }
stage=${1:?usage: gpu_sweep.sh small|compiled|decode|enwik8|context|recall [OUT_DIR]}
out=${2:-benchmarks/results}
mkdir -p "$out"
common=(--device cuda --dtype bfloat16 --repeats 5 --warmup 2 --time-budget 120)
lens=2048,8192,32768,65536,131072

case "$stage" in
  small)
    tvq bench "${common[@]}" --mode train,forward --impl vq,full,sdpa --seq-lens "$lens" \
      --json "$out/cuda_bench_small.json" --plot "$out/cuda_bench_small.png" ;;
  compiled)
    tvq bench "${common[@]}" --mode train,forward --impl vq --seq-lens "$lens" --compile \
      --json "$out/cuda_bench_small_compiled.json" ;;
  decode)
    tvq bench "${common[@]}" --mode decode --impl vq,full,sdpa --decode-positions 1024,65536 \
      --decode-steps 256 --json "$out/cuda_bench_small_decode.json"
    tvq bench "${common[@]}" --mode decode --impl vq --decode-positions 1024,65536 --decode-steps 256 \
      --compile --json "$out/cuda_bench_small_decode_compiled.json" ;;
  enwik8)
    tvq bench "${common[@]}" --preset enwik8 --batch-size 1 --mode train --impl vq,full,sdpa --grad-checkpoint \
      --seq-lens 8192,32768,131072 --repeats 3 --warmup 1 --time-budget 150 \
      --json "$out/cuda_enwik8_b1.json" --plot "$out/cuda_enwik8_b1.png" ;;
  context)
    n_gpu=$(env PYTHONPATH=src python -c "import torch; print(torch.cuda.device_count())")
    if [ "$n_gpu" -lt 2 ]; then
      echo "gpu_sweep.sh context: needs 2 or more GPUs, this machine has $n_gpu" >&2
      exit 2
    fi
    ranks=1
    for c in 2 4 8; do if [ "$c" -le "$n_gpu" ]; then ranks="$ranks,$c"; fi; done
    py -m tvq.bench.context --device cuda --dtype bfloat16 --ranks "$ranks" --seq-lens 131072,524288,1048576 \
      --steps 3 --warmup 1 --json "$out/cuda_context_parallel.json" ;;
  recall)
    mkdir -p "$out/recall"
    tvq recall --device cuda --steps 3000 --no-progress \
      --json "$out/recall/cuda_default_3000.json" --plot "$out/recall/cuda_default_3000.png"
    tvq recall --device cuda --steps 3000 --no-progress --variants vq --config benchmarks/recall_config.json \
      --json "$out/recall/cuda_default_3000_tuned.json"
    big=(--seq-len 1024 --max-dist 1021 --n-pairs 32 --n-keys 64 --n-filler 31 --batch-size 32 --steps 2000
         --set-all model.d_model=256 --set-all model.d_v=512 --set-all model.n_code=256
         --set-all model.block_len=128 --set-all model.mem_len=128)
    tvq recall --device cuda "${big[@]}" --no-progress \
      --json "$out/recall/cuda_window128.json" --plot "$out/recall/cuda_window128.png"
    tvq recall --device cuda "${big[@]}" --no-progress --variants vq --config benchmarks/recall_config.json \
      --json "$out/recall/cuda_window128_tuned.json" ;;
  *)
    echo "gpu_sweep.sh: unknown stage '$stage' (small, compiled, decode, enwik8, context, recall)" >&2
    exit 2 ;;
esac
