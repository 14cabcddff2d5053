#!/usr/bin/env bash
# `shoal plan`'s estimate against a real run, on this GPU: each run prints the estimate at its start and
# the measured peak memory and tokens/s/GPU after its first steps (shoal/train/expectations.py).
#   bash bench/plan_check.sh        (results in $OUT/plan_check.log)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}; mkdir -p "$OUT"; WORK=${WORK:-/tmp/plan_check}; mkdir -p "$WORK"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 - "$WORK/data" <<'PY'
import sys, numpy as np
from pathlib import Path
from shoal.data.indexed import IndexedDatasetWriter
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
with IndexedDatasetWriter(out / "random_text_document", dtype=np.int32) as w:
    for _ in range(4000):
        w.add_document(rng.integers(0, 128000, size=int(rng.integers(2000, 12000))))
PY
run() {  # name, then pretrain flags
  name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/plan_check.log"
  timeout 240 python3 -m shoal pretrain --experiment "$name" --results_dir "$WORK/results" --dataset_path "$WORK/data" \
    --max_steps 6 --train.log_interval=1 --train.warmup_steps=0 --train.val_check_interval=null \
    --checkpoint.save_optimizer=false --logging.report=false "$@" 2>&1 \
    | grep -E "shoal plan:|shoal: measured|step [0-9]+/|error" | tee -a "$OUT/plan_check.log"
}
run p1b_s4096_m2 --model llama32_1b --seq_length 4096 -g 2 -m 2 --parallel.compile=true
run p3b_s2048_m2_sel --model llama32_3b --seq_length 2048 -g 2 -m 2 --parallel.compile=true --parallel.activation_checkpointing=selective
run p1b_s8192_m1_full --model llama32_1b --seq_length 8192 -g 1 -m 1 --parallel.compile=true --parallel.activation_checkpointing=full
