#!/usr/bin/env bash
# One device session: CUDA correctness, GPU benchmarks, and the CPU benchmark pinned to 2 cores.
# Usage: OUT=folder bash benchmarks/device_run.sh [quick]
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"; LOG="$OUT/log.txt"
QUICK=${1:-}
# SCALE < 1 shortens every stage's time limit (cases a stage has not reached are then left out)
if [ -n "$QUICK" ]; then R="--repeats 2 --warmup 1 --memory-steps 1"; T=0.3; else R=""; T=${SCALE:-1}; fi
stage() { local limit=$1; shift; echo "== $* ($(date +%T))" >>"$LOG"; timeout "$(python3 -c "print(int($limit*$T)+5)")" "$@" >>"$LOG" 2>&1; echo "== exit $?" >>"$LOG"; }
pip install --no-deps --no-build-isolation -e . -q >>"$LOG" 2>&1 || echo "pip failed" >>"$LOG"
(nvidia-smi --query-gpu=name,memory.total --format=csv; lscpu | grep 'Model name'; nproc) >>"$LOG" 2>&1
DEV=cuda; python3 -c "import torch,sys; sys.exit(not torch.cuda.is_available())" || DEV=cpu
stage 40 python3 benchmarks/cuda_check.py --device $DEV --json "$OUT/cuda_check.json"
stage 120 python3 benchmarks/step.py --device $DEV --no-memory $R --json "$OUT/step_gpu.json" \
  --cases paper-mlp-64,deep-mlp-32,paper-cnn-64,paper-mlp-1024,tiny-gpt2,deep-mlp-8,deep-mlp-16
stage 55 taskset -c 0,1 python3 benchmarks/step.py --device cpu --threads 2 $R --json "$OUT/step_cpu2.json" \
  --cases paper-mlp-64
stage 45 taskset -c 0,1 python3 benchmarks/step.py --device cpu --threads 2 --directions 1 --memory-only --memory-steps 2 $R \
  --json "$OUT/memory_cpu2.json" --cases deep-mlp-32
stage 40 python3 benchmarks/step.py --device $DEV --memory-only --memory-steps 2 $R --json "$OUT/memory_gpu.json" \
  --cases paper-mlp-64,deep-mlp-32
stage 35 taskset -c 0,1 python3 benchmarks/step.py --device cpu --threads 2 --directions 1 --no-memory $R \
  --json "$OUT/step_cpu2_k1.json" --cases paper-mlp-1024,paper-cnn-64
