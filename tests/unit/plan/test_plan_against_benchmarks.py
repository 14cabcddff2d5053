"""The planner against every memory and throughput figure shoal's benchmarks measured.

The table below is transcribed from bench/RESULTS.md, with the configuration each figure was
measured in; the test first checks each figure against the raw file it came from (read here with
plain json), then compares the estimator with it. Memory is the estimator's allocated peak against
`torch.cuda.max_memory_allocated`; throughput is leave-one-out: the row itself is removed from the
estimator's references, so each speed estimate comes from the other benchmarks.

Targets: ±10% memory, ±15% throughput. Rows that miss are listed with the reason; the test fails
if a listed row starts to pass (update the list) or an unlisted row misses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoal.models.presets import get_preset
from shoal.plan.counts import count_parameters
from shoal.plan.estimate import Layout, Workload, estimate
from shoal.plan.hardware import GIB, GPUS
from shoal.plan.measured import MEASUREMENTS

BENCH = Path(__file__).resolve().parents[3] / "bench" / "results"
MEMORY_TARGET, SPEED_TARGET = 0.10, 0.15
SEED_LORA = {"rank": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}  # recipe llama31_8b, finetune

# name, file, how to find the record, (stage, preset, peft, seq, micro batch, global batch, GPUs, TP,
# checkpointing, gradient sync), measured GiB, measured tokens/s/GPU
TABLE = [
    ("1b_1gpu_h100", "train_1b_h100.json", "shoal_compile", ("pretrain", "llama32_1b", "none", 4096, 4, 4, 1, 1, "none", "auto"), 44.41, 58842),
    ("1b_1gpu_h200", "train_1b_h200.json", "shoal_compile", ("pretrain", "llama32_1b", "none", 4096, 4, 4, 1, 1, "none", "auto"), 44.41, 59941),
    ("1b_1gpu_chunked_h200", "train_1b_h200_chunked_loss.json", "shoal_compile", ("pretrain", "llama32_1b", "none", 4096, 4, 4, 1, 1, "none", "auto"), 38.98, 57153),
    ("1b_fsdp1_h100", "scale_h100x4_1b_and_hf8b.jsonl", {"impl": "shoal", "gpus": 1}, ("pretrain", "llama32_1b", "none", 4096, 4, 4, 1, 1, "none", "auto"), 44.41, 59165),
    ("1b_fsdp2_h100", "scale_h100x4_1b_and_hf8b.jsonl", {"impl": "shoal", "gpus": 2}, ("pretrain", "llama32_1b", "none", 4096, 4, 8, 2, 1, "none", "auto"), 34.74, 55777),
    ("1b_fsdp4_h100", "scale_h100x4_1b_and_hf8b.jsonl", {"impl": "shoal", "gpus": 4, "preset": "llama32_1b"}, ("pretrain", "llama32_1b", "none", 4096, 4, 16, 4, 1, "none", "auto"), 31.29, 51980),
    ("8b_fsdp4_full_h100", "scale_h100x4_shoal8b.jsonl", {"tp": 1, "activation_checkpointing": "full"}, ("pretrain", "llama31_8b", "none", 8192, 1, 4, 4, 1, "full", "auto"), 35.23, 7777),
    ("8b_tp2fsdp2_full_h100", "scale_h100x4_shoal8b.jsonl", {"tp": 2}, ("pretrain", "llama31_8b", "none", 8192, 1, 2, 4, 2, "full", "auto"), 33.53, 6548),
    ("8b_fsdp4_selective_h100", "scale_h100x4_shoal8b.jsonl", {"activation_checkpointing": "selective"}, ("pretrain", "llama31_8b", "none", 8192, 1, 4, 4, 1, "selective", "auto"), 52.13, 9198),
    ("seed_pretrain_tp2_h200", "seed_pretrain_tp2_h200x2.jsonl", None, ("pretrain", "llama31_8b", "none", 8192, 1, 16, 2, 2, "selective", "auto"), 81.12, 8301),
    ("seed_pretrain_tp2dp2_h200", "seed_pretrain_tp2dp2_h200x4.jsonl", None, ("pretrain", "llama31_8b", "none", 8192, 1, 32, 4, 2, "selective", "auto"), 49.53, 8250),
    ("seed_finetune_full_tp2_dense_h200", "seed_finetune_full_tp2_h200x2.jsonl", None, ("finetune", "llama31_8b", "none", 2048, 1, 128, 2, 2, "selective", "auto"), 66.32, 4505),
    ("seed_finetune_full_tp2_h200", "seed_finetune_full_tp2_h200x2_varlen.jsonl", None, ("finetune", "llama31_8b", "none", 2048, 1, 128, 2, 2, "selective", "auto"), 66.32, 6315),
    ("seed_finetune_full_tp2dp2_every_h200", "seed_finetune_full_tp2dp2_h200x4_sync_every.jsonl", None, ("finetune", "llama31_8b", "none", 2048, 1, 128, 4, 2, "selective", "every_micro_batch"), 35.61, 2747),
    ("seed_finetune_full_tp2dp2_h200", "seed_finetune_full_tp2dp2_h200x4.jsonl", None, ("finetune", "llama31_8b", "none", 2048, 1, 128, 4, 2, "selective", "auto"), 47.41, 4096),
    ("seed_finetune_lora_tp2_dense_h200", "seed_finetune_lora_tp2_h200x2.jsonl", None, ("finetune", "llama31_8b", "lora", 2048, 1, 128, 2, 2, "selective", "auto"), 21.15, 3413),
    ("seed_finetune_lora_tp2dp2_h200", "seed_finetune_lora_tp2dp2_h200x4.jsonl", None, ("finetune", "llama31_8b", "lora", 2048, 1, 128, 4, 2, "selective", "auto"), 16.29, 4061),
]

KNOWN_MEMORY_MISSES = {
    "seed_pretrain_tp2dp2_h200": "+12%: once-per-step FSDP sync at seq 8192; the peak at the loss counts the "
                                 "accumulated fp32 gradients plus every activation, which the run never held at once",
}
KNOWN_SPEED_MISSES = {
    # Each of the three is the only benchmark of its regime, so leaving it out leaves no reference like it:
    "seed_finetune_full_tp2_h200": "only fine-tuning run without FSDP; the nearest (TP2 × FSDP2, sync every "
                                   "micro-batch) pays FSDP's per-micro-batch gathers",
    "seed_finetune_full_tp2dp2_every_h200": "only run syncing FSDP every 2,048-token micro-batch",
    "seed_finetune_full_tp2dp2_h200": "its nearest is the run without FSDP, which does not re-gather weights",
    # Superseded: measured with the dense document mask that varlen attention replaced.
    "seed_finetune_full_tp2_dense_h200": "superseded (dense document mask), not modelled",
    "seed_finetune_lora_tp2_dense_h200": "superseded (dense document mask), not modelled",
}
KNOWN_MEMORY_MISSES |= {
    # Superseded: one process held the whole [tokens, vocab] logits before the chunked loss.
    "1b_1gpu_h100": "superseded (whole logits, before the chunked output layer + loss)",
    "1b_1gpu_h200": "superseded (whole logits, before the chunked output layer + loss)",
    "1b_fsdp1_h100": "superseded (whole logits, before the chunked output layer + loss)",
    "seed_finetune_lora_tp2_dense_h200": "superseded (dense document mask; frozen base then held in fp32)",
}


def raw_figures(file: str, selector) -> tuple[float, tuple[float, float]]:
    """(memory GiB, (lowest, highest) tokens/s/GPU) as the benchmark wrote them: bench/train.py's
    JSON and bench/scale.py's records hold one figure; a training run's metrics.jsonl holds one per
    step: its peak memory, and the range of the steps after the first (RESULTS.md quotes a figure
    from that range; not always the median it says, see the module docstring of shoal.plan.measured)."""
    path = BENCH / file
    if file.endswith(".json"):
        result = json.loads(path.read_text())["results"][selector]
        return result["memory_gib"], (result["tokens_per_s_per_gpu"],) * 2
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if selector is not None:
        (record,) = [r for r in records if all(r.get(k) == v for k, v in selector.items())]
        return record["memory_gib"], (record["tokens_per_s_per_gpu"],) * 2
    steps = [r for r in records if "tokens_per_s_per_gpu" in r]
    after_first = [r["tokens_per_s_per_gpu"] for r in steps[1:]]
    return max(r["memory_gib"] for r in steps), (min(after_first), max(after_first))


def planned(name: str, config: tuple, gpu: str):
    stage, preset, peft, seq, mb, gbs, gpus, tp, mode, sync = config
    cfg = get_preset(preset)
    counts = count_parameters(cfg, peft, SEED_LORA["rank"], SEED_LORA["targets"])
    layout = Layout(world_size=gpus, tp=tp, activation_checkpointing=mode, gradient_sync=sync)
    work = Workload(stage, seq, mb, gbs, "bf16", compile=True, peft=peft, peft_rank=SEED_LORA["rank"])
    return estimate(cfg, counts, layout, work, GPUS[gpu], exclude=name)


def test_table_matches_the_raw_benchmark_files_and_the_estimators_references():
    references = {m.name: m for m in MEASUREMENTS}
    assert set(references) == {row[0] for row in TABLE}
    for name, file, selector, _config, memory, tokens in TABLE:
        raw_memory, (low, high) = raw_figures(file, selector)
        assert raw_memory == pytest.approx(memory, abs=0.01), name
        assert low - 1 <= tokens <= high + 1, name
        ref = references[name]
        assert (ref.memory_gib, round(ref.tokens_per_s_per_gpu)) == (memory, tokens), name
        assert ref.source == f"bench/results/{file}"


def test_estimates_against_every_measured_figure(capsys):
    lines = ["| benchmark | memory measured | estimated | error | tokens/s/GPU measured | estimated (leave-one-out) | error |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    failures = []
    for name, _file, _, config, memory, tokens in TABLE:
        gpu = name.rsplit("_", 1)[1]
        est = planned(name, config, gpu)
        mem_err = est.memory.allocated / GIB / memory - 1
        speed_err = est.speed.tokens_per_s_per_gpu / tokens - 1
        lines.append(f"| {name} | {memory:.1f} GiB | {est.memory.allocated / GIB:.1f} GiB | {100 * mem_err:+.1f}% | "
                     f"{tokens:,} | {est.speed.tokens_per_s_per_gpu:,.0f} | {100 * speed_err:+.1f}% |")
        for kind, err, target, known in (("memory", mem_err, MEMORY_TARGET, KNOWN_MEMORY_MISSES),
                                          ("speed", speed_err, SPEED_TARGET, KNOWN_SPEED_MISSES)):
            if (abs(err) > target) != (name in known):
                failures.append(f"{name} {kind}: error {100 * err:+.1f}% "
                                + ("is listed as a miss but is within target" if name in known else "misses the target"))
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert not failures, failures
