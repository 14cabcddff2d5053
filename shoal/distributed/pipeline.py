"""Pipeline parallelism: split the model into stages and run them with a 1F1B or interleaved schedule.

A stage is a copy of the model that keeps only its run of layers, made by the model's plan
(`ParallelPlan.pipeline_stage`; for the decoder the first stage keeps the embedding, the last the
final norm and output layer, see `docs/model-contract.md`). Layers keep their index as their name,
so a stage's parameter names are the full model's, and checkpoints move freely between layouts.
Each stage is then parallelized like a whole model (tensor parallel, checkpointing, compile, FSDP).

With several stages per rank (interleaved 1F1B), rank r holds stages r, r + pp, r + 2·pp, ...

The loss: `loss_fn(logits, labels, loss_mask)` returns the *sum* of the per-token losses of a
micro-batch (shoal.train.step.masked_cross_entropy_sum). Each micro-batch's backward uses that sum
divided by the step's global number of loss tokens, and the schedule does not rescale gradients,
so the gradient is the one-process gradient of `Σ CE · mask / N_global`, as without pipelining.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from shoal.config.parallel import ParallelConfig
from shoal.distributed.mesh import ParallelDims
from shoal.distributed.parallelize import parallelize_model
from shoal.distributed.plan import ParallelPlan
from shoal.errors import ShoalError
from shoal.models.parallel_plan import DECODER_PLAN

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _MicroBatchLoss:
    """The schedule's loss: the caller's summed loss scaled by 1 / global loss tokens.

    The schedule hands over one target tensor per micro-batch, so labels and loss mask travel
    stacked in one float64 tensor [B, S, 2] (exact for any token id and mask weight).
    """

    def __init__(self, loss_fn: LossFn):
        self.loss_fn = loss_fn
        self.scale = 1.0

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, loss_mask = target[..., 0].long(), target[..., 1]
        return self.loss_fn(logits, labels, loss_mask) * self.scale


@dataclass
class Pipeline:
    """What `pipeline_step` needs: the schedule, this rank's stages and how batches are cut."""

    schedule: Any
    stages: list[PipelineStage]
    loss: _MicroBatchLoss
    parallel_dims: ParallelDims
    micro_batch_size: int
    n_microbatches: int

    @property
    def has_first(self) -> bool:
        return any(stage.is_first for stage in self.stages)

    @property
    def has_last(self) -> bool:
        return any(stage.is_last for stage in self.stages)


def pipeline_model(
    model: nn.Module,
    parallel_dims: ParallelDims,
    parallel_cfg: ParallelConfig,
    loss_fn: LossFn,
    micro_batch_size: int,
    n_microbatches: int,
    device_type: str,
    compute_dtype: torch.dtype | None = None,
    plan: ParallelPlan = DECODER_PLAN,
) -> tuple[Pipeline, list[nn.Module], bool, bool]:
    """Split `model` into this rank's stages (`plan.pipeline_stage`), parallelize each, and build
    the schedule. The layout (layer split, tied embeddings, micro-batch count) was checked by
    `check_parallel_layout`.

    Returns (pipeline, model_parts, has_first, has_last); `model_parts` hold the parameters (give
    them all to the optimizer, the checkpoint and `clip_grad_norm_`). Build `model` on the meta
    device for large models: the stages are copies and `model` itself is not used afterwards.
    """
    pp = parallel_dims.pp
    per_rank = parallel_cfg.stages_per_rank
    num_stages = pp * per_rank

    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    pp_group = parallel_dims.group("pp")
    stage_ids = [parallel_dims.pp_rank + i * pp for i in range(per_rank)]
    parts, stages = [], []
    for stage_index in stage_ids:
        part = plan.pipeline_stage(model, stage_index, num_stages)
        part = parallelize_model(part, parallel_dims, parallel_cfg, device_type, compute_dtype, plan)
        parts.append(part)
        stages.append(PipelineStage(part, stage_index, num_stages, device, group=pp_group))

    loss = _MicroBatchLoss(loss_fn)
    try:
        if parallel_cfg.pipeline_schedule == "1f1b":
            schedule = Schedule1F1B(stages[0], n_microbatches, loss_fn=loss, scale_grads=False)
        else:
            schedule = ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss, scale_grads=False)
    except ValueError as err:
        raise ShoalError(f"pipeline schedule {parallel_cfg.pipeline_schedule!r}: {err}") from None
    pipe = Pipeline(schedule, stages, loss, parallel_dims, micro_batch_size, n_microbatches)
    return pipe, parts, pipe.has_first, pipe.has_last


def _schedule_accepts(method: Callable, name: str) -> bool:
    return name in inspect.signature(method).parameters


def pipeline_step(
    pipe: Pipeline,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    global_loss_tokens: float,
    position_ids: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    backward: bool = True,
) -> torch.Tensor:
    """Run this rank's whole batch [n_microbatches × micro_batch_size, S] through the pipeline.

    Every pipeline rank passes the same batch. Accumulates gradients (unless backward=False, for
    validation) and returns the summed loss `Σ CE · mask` of the batch, detached, on every pipeline
    rank, like `forward_backward` without pipelining.
    """
    expected = pipe.micro_batch_size * pipe.n_microbatches
    if tokens.shape[0] != expected:
        raise ShoalError(
            f"pipeline_step got {tokens.shape[0]} sequences; expected micro_batch_size {pipe.micro_batch_size} × "
            f"{pipe.n_microbatches} micro-batches = {expected}"
        )
    if position_ids is None:
        b, s = tokens.shape
        position_ids = torch.arange(s, device=tokens.device).expand(b, s)
    kwargs: dict[str, torch.Tensor] = {"position_ids": position_ids}
    if document_ids is not None:
        kwargs["document_ids"] = document_ids
    target = torch.stack([labels.to(torch.float64), loss_mask.to(torch.float64)], dim=-1)
    normalizer = max(float(global_loss_tokens), 1.0)
    pipe.loss.scale = 1.0 / normalizer

    schedule = pipe.schedule
    run = schedule.step
    if not backward:
        if not hasattr(schedule, "eval"):
            raise ShoalError("this torch version's pipeline schedules cannot run forward only")
        run = schedule.eval
    extra: dict[str, Any] = {}
    if backward and _schedule_accepts(run, "return_outputs"):
        extra["return_outputs"] = False  # the loss is all we need; don't keep every micro-batch's logits
    args = (tokens,) if pipe.has_first else ()
    losses: list[torch.Tensor] = []
    if pipe.has_last:
        extra["target"] = target
        extra["losses"] = losses
    run(*args, **extra, **kwargs)

    # The schedule's per-micro-batch losses (it also calls the loss once more while inferring
    # shapes on its first step, so counting inside the loss function would overcount).
    if pipe.has_last:
        total = torch.stack([loss.detach().float() for loss in losses]).sum() * normalizer
    else:
        total = torch.zeros((), device=tokens.device)
    # The loss exists on the last stage only; a sum over pipeline ranks puts it on all of them.
    dist.all_reduce(total, group=pipe.parallel_dims.group("pp"))
    return total
