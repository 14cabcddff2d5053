"""Scale-out applied to a built model from outside: one device mesh, FSDP2, tensor + sequence
parallel, pipeline parallel (1F1B, interleaved), context parallel, activation checkpointing and
compile. Model-agnostic: what a model's modules are called comes from its `ParallelPlan`
(shoal.distributed.plan; the decoder's is shoal.models.parallel_plan). See docs/parallelism.md."""

from shoal.distributed.context_parallel import context_parallel_context
from shoal.distributed.grad_norm import clip_grad_norm_, grad_norm
from shoal.distributed.launch_env import destroy_distributed, init_distributed
from shoal.distributed.layout_checks import check_parallel_layout
from shoal.distributed.mesh import ParallelDims, build_mesh
from shoal.distributed.parallelize import autocast_context, parallelize_model
from shoal.distributed.pipeline import Pipeline, pipeline_model, pipeline_step

__all__ = [
    "ParallelDims",
    "Pipeline",
    "autocast_context",
    "build_mesh",
    "check_parallel_layout",
    "clip_grad_norm_",
    "context_parallel_context",
    "destroy_distributed",
    "grad_norm",
    "init_distributed",
    "parallelize_model",
    "pipeline_model",
    "pipeline_step",
]
