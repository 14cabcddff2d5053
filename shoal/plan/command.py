"""`shoal plan pretrain|finetune FLAGS`: the training command line a user is about to run, planned.

It takes exactly the flags of `shoal pretrain` / `shoal finetune` (the stage's own
`add_arguments`, and the same recipe resolution), plus `--gpu`, `--num_tokens` and `--json`, and
prints per GPU the memory by what holds it, whether it fits, the expected speed and time, the
checkpoint size and up to three better layouts. Nothing is launched and nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.distributed.float8 import float8_plan
from shoal.errors import ShoalError
from shoal.models import ModelConfig
from shoal.plan.counts import ParamCounts, count_parameters
from shoal.plan.estimate import Estimate, Workload, check_modelled, saved_weight_bytes
from shoal.plan.hardware import GIB, GpuKind, gpu_kind
from shoal.plan.layouts import Candidate, better_layouts, plan_layout
from shoal.plan.options import ACCEPTS_OVERRIDES, add_arguments  # noqa: F401 - flags without torch, re-exported


@dataclass
class Plan:
    stage: str
    model: ModelConfig
    model_source: str
    counts: ParamCounts
    gpu: GpuKind
    world_size: int
    work: Workload
    parallel: Any  # the recipe's ParallelConfig, as asked
    estimate: Estimate | None  # None when the layout cannot run
    refusal: str | None
    alternatives: list[Candidate]
    steps_source: str
    notes: list[str]


def _model_for(recipe) -> tuple[ModelConfig, str]:
    """The model shape: the starting checkpoint's shoal.json when it is here, else the preset."""
    from shoal.models import get_preset

    ckpt = recipe.model.checkpoint
    if ckpt and (Path(ckpt) / "shoal.json").is_file():
        from shoal.checkpoint.format import read_model_config

        return read_model_config(ckpt), f"checkpoint {ckpt}"
    if recipe.model.preset:
        note = f" (checkpoint {ckpt} not found here)" if ckpt else ""
        return get_preset(recipe.model.preset), f"preset {recipe.model.preset}{note}"
    raise ShoalError("shoal plan needs the model's shape: pass --model PRESET / --model_size 8B, "
                     "or --nemo_model CKPT for a checkpoint on this machine")


def _steps(recipe, stage: str, num_tokens: float | None) -> tuple[int | None, str]:
    """Training steps: --max_steps, else --num_tokens, else one epoch of the pretraining data."""
    t, seq = recipe.train, recipe.data.seq_length
    if t.max_steps:
        return t.max_steps, "--max_steps"
    per_step = t.global_batch_size * seq
    if num_tokens:
        return max(1, int(num_tokens // per_step)), f"--num_tokens {num_tokens:,.0f}"
    if stage == "pretrain" and recipe.data.dataset_path:
        from shoal.data.gpt_dataset import parse_blend
        from shoal.data.indexed import IndexedDataset

        prefixes, _ = parse_blend(recipe.data.dataset_path)
        tokens = sum(int(IndexedDataset(p).sequence_lengths.sum()) for p in prefixes)
        split = [float(x) for x in recipe.data.split.replace("/", ",").split(",")]
        train_tokens = tokens * split[0] / sum(split)
        return max(1, int(train_tokens // per_step)), f"one epoch of --dataset_path ({train_tokens:,.0f} training tokens)"
    return None, "unknown: pass --max_steps or --num_tokens"


def build_plan(recipe, stage: str, gpu: GpuKind, num_tokens: float | None = None) -> Plan:
    """The plan of a resolved recipe on its own layout (recipe.launch's num_nodes × num_gpus ranks)."""
    cfg, source = _model_for(recipe)
    p = recipe.peft
    method = "none" if p is None else ("dora" if p.use_dora else "lora")
    rank, targets = (p.rank, p.target_modules) if p is not None else (16, ())
    counts = count_parameters(cfg, method, rank, targets)
    precision = recipe.train.precision if recipe.train.precision != "auto" else "bf16"
    if float8_plan(recipe.train.fp8, recipe.train.fp8_recipe) is not None:
        check_modelled(cfg, "fp8")  # refused at once, not planned as bf16 nor blamed on the layout
    work = Workload(stage=stage, seq_length=recipe.data.seq_length, micro_batch_size=recipe.train.micro_batch_size,
                    global_batch_size=recipe.train.global_batch_size, precision=precision,
                    compile=recipe.parallel.compile, peft=method, peft_rank=rank,
                    save_optimizer=recipe.checkpoint.save_optimizer,
                    adapter_only_checkpoints=recipe.checkpoint.adapter_only)
    world = recipe.launch.world_size
    steps, steps_source = _steps(recipe, stage, num_tokens)
    notes = []
    if precision == "fp32":
        notes.append("precision fp32 (shoal's CPU default) planned as asked; on GPU shoal trains in bf16 by default")
    try:
        current, refusal = plan_layout(cfg, counts, recipe.parallel, work, gpu, world, steps), None
    except ShoalError as err:
        current, refusal = None, str(err)
    alternatives = better_layouts(cfg, counts, recipe.parallel, work, gpu, world, current)
    return Plan(stage, cfg, source, counts, gpu, world, work, recipe.parallel, current, refusal, alternatives,
                steps_source, notes)


# -- output ------------------------------------------------------------------------------------------

def _gib(x: float) -> str:
    return f"{x / GIB:7.1f} GiB"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d " if d else "") + f"{h}:{m:02d}:{s:02d}"


def _summary_line(est: Estimate, work: Workload) -> str:
    return (f"{est.layout.describe()}, micro batch {work.micro_batch_size}: {est.memory.total / GIB:.1f} GiB/GPU, "
            f"{est.speed.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, step {est.speed.step_seconds:.2f} s")


def render_text(plan: Plan) -> str:
    c, w = plan.counts, plan.work
    out = [f"shoal plan: {plan.stage} of a {plan.model.family} model ({plan.model_source}): "
           f"{c.total / 1e9:.2f}B parameters, {c.trainable / 1e9:.3g}B trainable"
           + (f" ({w.peft}, rank {w.peft_rank})" if w.peft != "none" else ""),
           f"on {plan.world_size} × {plan.gpu.name} ({plan.gpu.memory_bytes / GIB:.1f} GiB, "
           f"{plan.gpu.peak_flops / 1e12:.0f} TFLOP/s bf16); seq {w.seq_length}, micro batch {w.micro_batch_size}, "
           f"global batch {w.global_batch_size}, {w.precision}"]
    est = plan.estimate
    if est is None:
        out.append(f"this layout cannot run: {plan.refusal}")
    else:
        m, s = est.memory, est.speed
        micro = w.global_batch_size // (w.micro_batch_size * est.layout.dp)
        sync = ("once per step (unsharded fp32 gradients)" if m.deferred_gradient_sync else
                "every micro-batch" if est.layout.fsdp and micro > 1 else "n/a")
        out += [f"layout: {est.layout.describe()}; {micro} micro-batches per rank per step; FSDP gradient sync {sync}",
                "memory per GPU (estimated peak):",
                f"  {_parameters_label(w, est.layout):40s}{_gib(m.parameters)}",
                f"  gradients (fp32)                        {_gib(m.gradients)}",
                f"  optimizer state (AdamW, 2 × fp32)       {_gib(m.optimizer)}",
                f"  bf16 weight copies for compute          {_gib(m.working_copies)}",
                f"  activations ({(est.layout.activation_checkpointing + ' checkpointing)'):26s}{_gib(m.activations)}",
                f"  logits and loss                         {_gib(m.logits_loss)}",
                f"  = allocated by torch                    {_gib(m.allocated)}",
                f"  framework overhead (CUDA context, NCCL,  {_gib(m.overhead)}",
                "    allocator slack)",
                f"  total                                   {_gib(m.total)} of {m.capacity / GIB:.1f} GiB: "
                + (f"fits ({100 * m.total / m.capacity:.0f}% used)" if m.fits else "DOES NOT FIT"),
                f"speed: {s.tokens_per_s_per_gpu:,.0f} tokens/s/GPU (MFU {100 * s.mfu:.1f}%), "
                f"{s.tokens_per_s_per_gpu * plan.world_size:,.0f} tokens/s in all, step {s.step_seconds:.2f} s"]
        out += [f"  {n}" for n in s.notes]
        if est.steps:
            out.append(f"run: {est.steps:,} steps ({plan.steps_source}), "
                       f"{est.steps * w.global_batch_size * w.seq_length:,.0f} tokens: {_duration(est.run_seconds)} "
                       "(training steps only; validation and checkpoint writes not counted)")
        else:
            out.append(f"run: length {plan.steps_source}")
        weights = saved_weight_bytes(c, w)
        what = "fp32 weights" if weights == 4 * c.total else "fp32 adapters (the base is not copied)"
        out.append(f"checkpoint on disk: {est.checkpoint_bytes / 1e9:.2f} GB "
                   f"({what} {weights / 1e9:.2f} GB" + (f" + optimizer {(est.checkpoint_bytes - weights) / 1e9:.2f} GB)"
                                                               if est.checkpoint_bytes > weights else ")"))
        out += [f"  note: {n}" for n in m.notes + plan.notes]
    if plan.alternatives:
        out.append("better layouts (estimated; same GPUs and global batch):" if est and est.memory.fits else
                   "layouts that fit (estimated; same GPUs and global batch):")
        for i, cand in enumerate(plan.alternatives, 1):
            flags = " ".join(cand.flags(plan.parallel, w))
            out.append(f"  {i}. {_summary_line(cand.estimate, cand.work)}\n     change: {flags}")
    elif est is None or not est.memory.fits:
        # Weights, gradients and AdamW state alone (16 bytes per trained parameter, 4 per frozen one)
        # shard at best over every GPU: a floor on how many are needed.
        floor = (16 * c.trainable + 4 * c.frozen) / (0.9 * plan.gpu.memory_bytes)
        out.append(f"no layout of {plan.world_size} GPUs fits this model, batch and sequence. Weights, gradients and "
                   f"AdamW state alone need at least {max(1, -int(-floor // 1))} × {plan.gpu.name}; use more GPUs "
                   "(--num_nodes), --peft lora, a shorter --seq_length, or a larger GPU kind (--gpu)")
    return "\n".join(out)


def brief(plan: Plan) -> str:
    """One line for a training run's log: planned peak memory and speed, to set beside the measured."""
    est = plan.estimate
    if est is None:
        return f"shoal plan: this layout cannot run: {plan.refusal}"
    m, s = est.memory, est.speed
    return (f"shoal plan: estimated {m.allocated / GIB:.1f} GiB/GPU allocated ({m.total / GIB:.1f} with overhead, "
            f"{'fits' if m.fits else 'DOES NOT FIT'} in {m.capacity / GIB:.0f}), {s.tokens_per_s_per_gpu:,.0f} tokens/s/GPU "
            f"(MFU {100 * s.mfu:.1f}% from {s.reference.name})")


def plan_dict(plan: Plan) -> dict[str, Any]:
    def est_dict(est: Estimate) -> dict[str, Any]:
        m, s = est.memory, est.speed
        return {
            "layout": dataclasses.asdict(est.layout) | {"dp": est.layout.dp},
            "memory_gib": {k: getattr(m, k) / GIB for k in ("parameters", "gradients", "optimizer", "working_copies",
                                                             "activations", "logits_loss", "allocated", "overhead",
                                                             "total", "capacity")},
            "fits": m.fits, "deferred_gradient_sync": m.deferred_gradient_sync,
            "mfu": s.mfu, "tokens_per_s_per_gpu": s.tokens_per_s_per_gpu, "step_seconds": s.step_seconds,
            "mfu_reference": {"name": s.reference.name, "source": s.reference.source, "mfu": s.reference.mfu},
            "steps": est.steps, "run_seconds": est.run_seconds, "checkpoint_bytes": est.checkpoint_bytes,
            "notes": m.notes + s.notes,
        }

    return {
        "stage": plan.stage, "model_source": plan.model_source, "gpu": plan.gpu.name, "world_size": plan.world_size,
        "parameters": plan.counts.total, "trainable_parameters": plan.counts.trainable,
        "workload": dataclasses.asdict(plan.work), "steps_source": plan.steps_source,
        "estimate": est_dict(plan.estimate) if plan.estimate else None, "refusal": plan.refusal,
        "alternatives": [est_dict(c.estimate) | {"micro_batch_size": c.work.micro_batch_size,
                                                 "flags": c.flags(plan.parallel, plan.work)}
                         for c in plan.alternatives],
        "notes": plan.notes,
    }


def main(args: argparse.Namespace) -> int:
    from shoal.config.resolve import resolve_recipe

    gpu = gpu_kind(args.gpu)
    # The one place the training recipe is resolved; a plan needs no start checkpoint on this machine.
    recipe = resolve_recipe(args, args.stage, locate_start=False)
    plan = build_plan(recipe, args.stage, gpu, args.num_tokens)
    print(json.dumps(plan_dict(plan), indent=1) if args.json else render_text(plan))
    fits = plan.estimate is not None and plan.estimate.memory.fits
    return 0 if fits else 1


def _parameters_label(work: Workload, layout) -> str:
    # Without FSDP a LoRA/DoRA base is kept in bf16 (shoal.train.engine.store_frozen_in).
    if work.peft != "none" and work.precision == "bf16" and not layout.fsdp:
        return "parameters (fp32 adapters, bf16 base)"
    return "parameters (fp32 master weights)"
