#!/usr/bin/env bash
# The GPU machine's share of the work, in one call: GPU tests, then scaling benchmarks.
#   bash bench/gpu_suite.sh tests|scale1b|scale8b|train1   (results under $OUT, or ./bench_out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
GPUS=$(nvidia-smi -L | wc -l)
run() { echo "+ $*"; "$@" 2>&1 | grep -v -E "Warning|warnings.warn|^ *$" ; }
for what in "$@"; do
  case $what in
    tests)
      run python3 -m pytest -q -m gpu tests/gpu -x -p no:cacheprovider | tee -a "$OUT/gpu_tests.log" ;;
    train1)  # one GPU: shoal against transformers (bench/train.py)
      CUDA_VISIBLE_DEVICES=0 run python3 bench/train.py --variants hf_compile,shoal_compile --warmup 4 --steps 12 \
        --output "$OUT/train_1b.json" ;;
    scale1b)  # Llama-3.2-1B shape, seq 4096, micro batch 4, FSDP2, on 1, 2 and 4 GPUs
      for n in 1 2 4; do [ "$n" -le "$GPUS" ] || continue
        run torchrun --standalone --nproc_per_node "$n" bench/scale.py --impl shoal --preset llama32_1b \
          --seq_length 4096 --micro_batch_size 4 --compile --output "$OUT/scale.jsonl"
      done ;;
    scale8b)  # Llama-3.1-8B shape, seq 8192, 4 GPUs: shoal FSDP2, shoal TP2 x FSDP2, transformers FSDP2
      run torchrun --standalone --nproc_per_node "$GPUS" bench/scale.py --impl hf --preset llama31_8b \
        --seq_length 8192 --micro_batch_size 1 --activation_checkpointing full --compile --steps 6 --output "$OUT/scale.jsonl"
      run torchrun --standalone --nproc_per_node "$GPUS" bench/scale.py --impl shoal --preset llama31_8b \
        --seq_length 8192 --micro_batch_size 1 --activation_checkpointing full --compile --steps 6 --output "$OUT/scale.jsonl"
      run torchrun --standalone --nproc_per_node "$GPUS" bench/scale.py --impl shoal --preset llama31_8b \
        --seq_length 8192 --micro_batch_size 1 --tp 2 --activation_checkpointing full --compile --steps 6 --output "$OUT/scale.jsonl"
      ;;
  esac
done
[ -f "$OUT/scale.jsonl" ] && cat "$OUT/scale.jsonl"
exit 0
