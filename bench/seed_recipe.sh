#!/usr/bin/env bash
# The seed's Llama-3.1-8B workflow on one GPU host, with the seed's own flags (TP=2), on a
# random-weight 8B-shaped model and the demo's data (no hub access on the GPU machine):
#   bash bench/seed_recipe.sh prepare    # random HF checkpoint, shoal import, corpus + preprocess, SFT set
#   bash bench/seed_recipe.sh pretrain   # shoal pretrain --executor local (TP=2), weights-only checkpoint
#   bash bench/seed_recipe.sh lora       # shoal finetune --peft lora from the pretraining checkpoint, export, load
#   bash bench/seed_recipe.sh full       # shoal finetune (full) from it, export, load
# Throughput (tokens/s/GPU, MFU, memory) is what shoal's own metrics.jsonl records; results under $OUT.
# GBS, steps and GPU count come from the environment (defaults sized for 2 GPUs and a 10-minute call);
# FINETUNE_FROM (a checkpoint; default the pretraining run's last), TAG (experiment name suffix) and
# SKIP_EXPORT=1 serve benchmark-only fine-tuning runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
W=${SEED_WORK:-/tmp/shoal_seed}; mkdir -p "$W"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
TP=${TP:-2}; PP=1; CP=1
PRETRAIN_GBS=${PRETRAIN_GBS:-16}; PRETRAIN_STEPS=${PRETRAIN_STEPS:-8}
FINETUNE_GBS=${FINETUNE_GBS:-128}; FINETUNE_STEPS=${FINETUNE_STEPS:-4}
shoal() { echo "+ shoal $*"; python3 -m shoal "$@"; }
seed_flags() {  # the seed's flags, as in its README
  echo --executor local --num_nodes 1 --num_gpus "$NUM_GPUS" --model_size 8B \
       --tensor_model_parallel_size "$TP" --pipeline_model_parallel_size $PP --context_parallel_size $CP
}
latest() { ls -d "$W/results/$1/checkpoints/"*-last; }
summary() {  # median of the training records after the first two (compile warm-up) steps
  python3 - "$1" "$2" <<'PY' | tee -a "$OUT/summary.txt"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
train = [r for r in rows if "tokens_per_s_per_gpu" in r or "tps_per_gpu" in r]
keys = sorted({k for r in train for k in r})
steady = train[2:] or train
med = {k: statistics.median(r[k] for r in steady if isinstance(r.get(k), (int, float))) for k in keys
       if any(isinstance(r.get(k), (int, float)) for r in steady)}
print(sys.argv[2], json.dumps(med))
PY
}
load_check() {  # the export loads in transformers with no extra flags and runs
  python3 - "$1" <<'PY' | tee -a "$OUT/summary.txt"
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map="cuda")
ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt")
ids = (ids["input_ids"] if hasattr(ids, "keys") else ids).to("cuda")
out = model.generate(ids, max_new_tokens=8, do_sample=False)
print("export", sys.argv[1], "loads:", type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e9,
      "B params; generated", out.shape[1] - ids.shape[1], "tokens; logits finite:",
      bool(torch.isfinite(model(ids).logits).all()))
PY
}
df -h "$W" /dev/shm | tee -a "$OUT/summary.txt"
for what in "$@"; do
  start=$(date +%s)
  case $what in
    prepare)
      python3 - "$W/hf" <<'PY'
import shutil, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, LlamaConfig
from shoal.models import get_preset, to_hf_config
out = Path(sys.argv[1]); shutil.rmtree(out, ignore_errors=True)
cfg = LlamaConfig(**{k: v for k, v in to_hf_config(get_preset("llama31_8b")).items() if k != "model_type"})
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
model.save_pretrained(out, max_shard_size="5GB")
for f in Path("shoal/demo/assets/tokenizer").iterdir():  # a small tokenizer with a chat template
    shutil.copy(f, out / f.name)
print("random HF checkpoint:", sorted(p.name for p in out.iterdir()))
PY
      shoal import --source "$W/hf" --output_path "$W/ckpt/llama31_8b" --overwrite
      rm -rf "$W/hf"
      python3 -m shoal.demo.corpus --corpus "$W/raw/corpus.jsonl" --num-documents 20000 --overwrite
      python3 -c "from shoal.demo.corpus import write_instruction_set as w; w('$W/sft', sizes=(60000, 2000, 200), overwrite=True)"
      shoal preprocess --input "$W/raw/corpus.jsonl" --json-keys text --tokenizer "$W/ckpt/llama31_8b" \
        --output-prefix "$W/preprocessed/corpus" --append-eod --workers 16 --overwrite ;;
    pretrain)
      shoal pretrain $(seed_flags) --experiment llama31_pretraining --results_dir "$W/results" \
        --hf_model_id meta-llama/Llama-3.1-8B-Instruct --nemo_model "$W/ckpt/llama31_8b" \
        --max_steps "$PRETRAIN_STEPS" --global_batch_size "$PRETRAIN_GBS" --dataset_path "$W/preprocessed" \
        --checkpoint.save_optimizer=false 2>&1 | grep -v -i warn | tail -40
      cp "$W/results/llama31_pretraining/metrics.jsonl" "$OUT/pretrain_metrics.jsonl"
      summary "$OUT/pretrain_metrics.jsonl" pretrain ;;
    lora|full)
      peft=(); [ "$what" = lora ] && peft=(--peft lora)
      exp="llama31_finetuning_$what${TAG:-}"; rm -rf "$W/results/$exp"
      shoal finetune $(seed_flags) --experiment "$exp" --results_dir "$W/results" \
        --hf_model_id meta-llama/Llama-3.1-8B-Instruct --nemo_model "${FINETUNE_FROM:-$(latest llama31_pretraining)}" \
        "${peft[@]}" --max_steps "$FINETUNE_STEPS" --global_batch_size "$FINETUNE_GBS" --dataset_path "$W/sft" \
        --checkpoint.save_optimizer=false 2>&1 | grep -v -i warn | tail -40
      cp "$W/results/$exp/metrics.jsonl" "$OUT/finetune_${what}${TAG:-}_metrics.jsonl"
      summary "$OUT/finetune_${what}${TAG:-}_metrics.jsonl" "finetune_$what${TAG:-}"
      if [ -z "${SKIP_EXPORT:-}" ]; then
        shoal export --source "$(latest "$exp")" --output_path "$W/hf_export_$what" --overwrite
        load_check "$W/hf_export_$what"
      fi
      rm -rf "$W/hf_export_$what" "$W/results/$exp/checkpoints" ;;
  esac
  echo "$what: $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
done
