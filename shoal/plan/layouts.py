"""From a recipe to planned layouts: the layout the recipe asks for, and better ones to try.

A layout is checked with the training code's own `check_parallel_layout` (the same refusal the
run would give), then estimated. Alternatives vary tensor, pipeline and context parallel sizes,
the checkpointing mode and the micro batch; those that fit are ranked by estimated tokens/s/GPU.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from shoal.config.parallel import ParallelConfig
from shoal.distributed.layout_checks import check_parallel_layout
from shoal.errors import ShoalError
from shoal.models import ModelConfig
from shoal.plan.counts import ParamCounts
from shoal.plan.estimate import Estimate, Layout, Workload, estimate
from shoal.plan.hardware import GpuKind


@dataclass
class Candidate:
    parallel: ParallelConfig
    work: Workload
    estimate: Estimate

    def flags(self, base: ParallelConfig, base_work: Workload) -> list[str]:
        """The command-line changes that turn `base` into this candidate."""
        p, out = self.parallel, []
        if p.tensor_model_parallel_size != base.tensor_model_parallel_size:
            out.append(f"--tensor_model_parallel_size {p.tensor_model_parallel_size}")
        if p.pipeline_model_parallel_size != base.pipeline_model_parallel_size:
            out.append(f"--pipeline_model_parallel_size {p.pipeline_model_parallel_size}")
        if p.context_parallel_size != base.context_parallel_size:
            out.append(f"--context_parallel_size {p.context_parallel_size}")
        if p.activation_checkpointing != base.activation_checkpointing:
            out.append(f"--parallel.activation_checkpointing={p.activation_checkpointing}")
        if self.work.micro_batch_size != base_work.micro_batch_size:
            out.append(f"--micro_batch_size {self.work.micro_batch_size}")
        return out


def layout_for(parallel: ParallelConfig, world_size: int) -> Layout:
    """The resolved sizes of a parallel section on `world_size` ranks (after it has been checked)."""
    return Layout(
        world_size=world_size,
        tp=parallel.tensor_model_parallel_size,
        pp=parallel.pipeline_model_parallel_size,
        cp=parallel.context_parallel_size,
        dp_replicate=parallel.replicate_size,
        sequence_parallel=parallel.sequence_parallel,
        stages_per_rank=parallel.stages_per_rank,
        activation_checkpointing=parallel.activation_checkpointing,
        gradient_sync=parallel.fsdp_gradient_sync,
        reshard_after_forward=parallel.fsdp_reshard_after_forward,
    )


def plan_layout(cfg: ModelConfig, counts: ParamCounts, parallel: ParallelConfig, work: Workload, gpu: GpuKind,
                world_size: int, steps: int | None = None) -> Estimate:
    """Check the layout as training would (ShoalError if it cannot run), then estimate it."""
    check_parallel_layout(parallel, world_size, cfg, seq_length=work.seq_length,
                          global_batch_size=work.global_batch_size, micro_batch_size=work.micro_batch_size)
    layout = layout_for(parallel, world_size)
    if layout.activation_checkpointing == "auto":  # as training resolves it, against this GPU's memory
        from shoal.plan.checkpointing import choose_activation_checkpointing

        mode = choose_activation_checkpointing(cfg, counts, layout, work, gpu.memory_bytes).mode
        layout = dataclasses.replace(layout, activation_checkpointing=mode)
    return estimate(cfg, counts, layout, work, gpu, steps=steps)


def better_layouts(cfg: ModelConfig, counts: ParamCounts, parallel: ParallelConfig, work: Workload, gpu: GpuKind,
                   world_size: int, current: Estimate | None, limit: int = 3) -> list[Candidate]:
    """Up to `limit` layouts that fit, fastest first, each faster than `current` (or any, if it
    does not fit or cannot run); one per (TP, PP, CP) split, its best checkpointing and micro batch.

    Pipeline and context parallelism are proposed only when no tensor/data-parallel layout fits:
    shoal has not benchmarked their speed, and a guess should not outrank a measurement."""
    sizes = [s for s in (1, 2, 4, 8) if world_size % s == 0]
    found = _search(cfg, counts, parallel, work, gpu, world_size, current, sizes, (1,), (1,))
    if not found:
        found = _search(cfg, counts, parallel, work, gpu, world_size, current, sizes, (1, 2, 4), (1, 2))
    best: dict[tuple[int, int, int], Candidate] = {}
    for cand in found:  # already fastest first: keep the first of each split
        lay = cand.estimate.layout
        best.setdefault((lay.tp, lay.pp, lay.cp), cand)
    return list(best.values())[:limit]


def _search(cfg, counts, parallel, work, gpu, world_size, current, tps, pps, cps) -> list[Candidate]:
    found: list[Candidate] = []
    for tp, pp, cp, mode, mb in itertools.product(tps, pps, cps, ("none", "selective", "full"), (1, 2, 4)):
        if world_size % (tp * pp * cp):
            continue
        candidate = dataclasses.replace(parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                        context_parallel_size=cp, activation_checkpointing=mode)
        cand_work = dataclasses.replace(work, micro_batch_size=mb)
        if candidate == parallel and mb == work.micro_batch_size:
            continue
        try:
            est = plan_layout(cfg, counts, candidate, cand_work, gpu, world_size)
        except ShoalError:
            continue  # a layout training would refuse
        if not est.memory.fits:
            continue
        if current is not None and current.memory.fits and est.speed.tokens_per_s_per_gpu <= current.speed.tokens_per_s_per_gpu:
            continue
        found.append(Candidate(candidate, cand_work, est))
    # Fastest first; among equals the simplest layout (fewest model-parallel ranks), then the one
    # leaving the most memory free.
    found.sort(key=lambda c: (-round(c.estimate.speed.tokens_per_s_per_gpu),
                              c.estimate.layout.tp * c.estimate.layout.pp * c.estimate.layout.cp,
                              c.estimate.memory.total))
    return found
