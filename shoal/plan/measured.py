"""Throughput and memory that shoal's own benchmarks measured (bench/RESULTS.md, bench/results/).

`shoal plan` takes its MFU from here: the figure of the benchmarked configuration nearest to the
planned one (see `shoal.plan.estimate.estimate_speed`). Memory figures are kept beside them only
so the plan's tests can compare the memory formulas against them; the formulas never read them.
Every row names the file its numbers come from. Rows marked `superseded` were measured before a
later change to shoal (dense document masks, replaced by varlen attention; whole logits, replaced by
the chunked output layer + loss in one process) and are not used as references; they stay for the record.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    name: str
    source: str  # bench/results file (and the RESULTS.md table the figure is quoted in)
    gpu: str  # shoal.plan.hardware.GPUS key
    preset: str
    stage: str  # "pretrain" (also bench/train.py and bench/scale.py) or "finetune" (packed SFT)
    peft: str  # "none" | "lora" | "dora"
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    num_gpus: int
    tp: int
    activation_checkpointing: str
    gradient_sync: str  # "auto" or an explicit parallel.fsdp_gradient_sync
    mfu: float
    tokens_per_s_per_gpu: float
    memory_gib: float  # torch.cuda.max_memory_allocated
    superseded: bool = False


def _m(*args, **kwargs) -> Measurement:
    return Measurement(*args, **kwargs)


MEASUREMENTS: list[Measurement] = [
    # bench/train.py: one GPU, Llama-3.2-1B shape, seq 4096, micro batch 4, compiled layers and loss.
    # (The first three measured the whole [tokens, vocab] logits, before the chunked output layer + loss.)
    _m("1b_1gpu_h100", "bench/results/train_1b_h100.json", "h100", "llama32_1b", "pretrain", "none",
       4096, 4, 4, 1, 1, "none", "auto", 0.5370, 58842, 44.41, superseded=True),
    _m("1b_1gpu_h200", "bench/results/train_1b_h200.json", "h200", "llama32_1b", "pretrain", "none",
       4096, 4, 4, 1, 1, "none", "auto", 0.5470, 59941, 44.41, superseded=True),
    _m("1b_1gpu_chunked_h200", "bench/results/train_1b_h200_chunked_loss.json", "h200", "llama32_1b", "pretrain",
       "none", 4096, 4, 4, 1, 1, "none", "auto", 0.5216, 57153, 38.98),
    # bench/scale.py on 4 × H100: FSDP2 over 1, 2, 4 GPUs (micro batch 4 per GPU, one per step).
    _m("1b_fsdp1_h100", "bench/results/scale_h100x4_1b_and_hf8b.jsonl", "h100", "llama32_1b", "pretrain", "none",
       4096, 4, 4, 1, 1, "none", "auto", 0.5399, 59165, 44.41, superseded=True),
    _m("1b_fsdp2_h100", "bench/results/scale_h100x4_1b_and_hf8b.jsonl", "h100", "llama32_1b", "pretrain", "none",
       4096, 4, 8, 2, 1, "none", "auto", 0.5090, 55777, 34.74),
    _m("1b_fsdp4_h100", "bench/results/scale_h100x4_1b_and_hf8b.jsonl", "h100", "llama32_1b", "pretrain", "none",
       4096, 4, 16, 4, 1, "none", "auto", 0.4744, 51980, 31.29),
    _m("8b_fsdp4_full_h100", "bench/results/scale_h100x4_shoal8b.jsonl", "h100", "llama31_8b", "pretrain", "none",
       8192, 1, 4, 4, 1, "full", "auto", 0.4802, 7777, 35.23),
    _m("8b_tp2fsdp2_full_h100", "bench/results/scale_h100x4_shoal8b.jsonl", "h100", "llama31_8b", "pretrain", "none",
       8192, 1, 2, 4, 2, "full", "auto", 0.4043, 6548, 33.53),
    _m("8b_fsdp4_selective_h100", "bench/results/scale_h100x4_shoal8b.jsonl", "h100", "llama31_8b", "pretrain",
       "none", 8192, 1, 4, 4, 1, "selective", "auto", 0.5679, 9198, 52.13),
    # bench/seed_recipe.sh: the seed's 8B command lines (TP2, recipe llama31_8b: selective, compiled),
    # from shoal's own metrics.jsonl: the peak memory, and the throughput RESULTS.md quotes (a value
    # within the steps after the first; RESULTS.md calls it the median, which it is not for every row).
    _m("seed_pretrain_tp2_h200", "bench/results/seed_pretrain_tp2_h200x2.jsonl", "h200", "llama31_8b", "pretrain",
       "none", 8192, 1, 16, 2, 2, "selective", "auto", 0.513, 8301, 81.12),
    _m("seed_pretrain_tp2dp2_h200", "bench/results/seed_pretrain_tp2dp2_h200x4.jsonl", "h200", "llama31_8b",
       "pretrain", "none", 8192, 1, 32, 4, 2, "selective", "auto", 0.509, 8250, 49.53),
    _m("seed_finetune_full_tp2_dense_h200", "bench/results/seed_finetune_full_tp2_h200x2.jsonl", "h200",
       "llama31_8b", "finetune", "none", 2048, 1, 128, 2, 2, "selective", "auto", 0.234, 4505, 66.32,
       superseded=True),
    _m("seed_finetune_full_tp2_h200", "bench/results/seed_finetune_full_tp2_h200x2_varlen.jsonl", "h200",
       "llama31_8b", "finetune", "none", 2048, 1, 128, 2, 2, "selective", "auto", 0.328, 6315, 66.32),
    _m("seed_finetune_full_tp2dp2_every_h200", "bench/results/seed_finetune_full_tp2dp2_h200x4_sync_every.jsonl",
       "h200", "llama31_8b", "finetune", "none", 2048, 1, 128, 4, 2, "selective", "every_micro_batch", 0.143,
       2747, 35.61),
    _m("seed_finetune_full_tp2dp2_h200", "bench/results/seed_finetune_full_tp2dp2_h200x4.jsonl", "h200",
       "llama31_8b", "finetune", "none", 2048, 1, 128, 4, 2, "selective", "auto", 0.213, 4096, 47.41),
    _m("seed_finetune_lora_tp2_dense_h200", "bench/results/seed_finetune_lora_tp2_h200x2.jsonl", "h200",
       "llama31_8b", "finetune", "lora", 2048, 1, 128, 2, 2, "selective", "auto", 0.177, 3413, 21.15,
       superseded=True),
    _m("seed_finetune_lora_tp2dp2_h200", "bench/results/seed_finetune_lora_tp2dp2_h200x4.jsonl", "h200",
       "llama31_8b", "finetune", "lora", 2048, 1, 128, 4, 2, "selective", "auto", 0.211, 4061, 16.29),
]
