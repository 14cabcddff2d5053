"""How a run is laid out over devices: the `parallel:` section of a recipe.

The seed's flags map onto it as they are (`--tensor_model_parallel_size`, `--pipeline_model_parallel_size`, `--context_parallel_size`),
and NeMo's `--expert_model_parallel_size` for mixture-of-experts models.
How many processes run is the launch section's (`--num_nodes`, `--num_gpus`).
Data parallelism is not set directly: it is whatever remains of the world size after tensor,
pipeline and context parallelism (DESIGN §5), split into a replicated and a sharded (FSDP2) part.
`shoal.distributed.mesh` turns this into a device mesh and checks it against the model and batch;
`docs/parallelism.md` explains each knob.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shoal.errors import ShoalError


@dataclass(frozen=True)
class ParallelConfig:
    # Megatron-style tensor parallelism: attention heads and MLP columns split over this many ranks.
    tensor_model_parallel_size: int = 1
    # With tensor parallelism, also split norms, residuals and activations along the sequence.
    sequence_parallel: bool = True
    # Pipeline stages (ranks); layers are split evenly over pipeline × virtual stages.
    pipeline_model_parallel_size: int = 1
    pipeline_schedule: Literal["1f1b", "interleaved_1f1b"] = "1f1b"
    # Stages held by each pipeline rank (NeMo's virtual pipeline size). None: 1 for "1f1b", 2 for
    # "interleaved_1f1b".
    virtual_pipeline_model_parallel_size: int | None = None
    # Ranks a sequence is split over (for long sequences); each holds 1/cp of every sequence.
    context_parallel_size: int = 1
    # Mixture of experts (NeMo's expert_model_parallel_size): each expert-parallel rank holds
    # num_experts / ep of every sparse layer's experts, and tokens travel to their experts by
    # all-to-all. The ranks are carved out of the data-parallel ones (they read different samples),
    # so it must divide the data-parallel size; see docs/parallelism.md.
    expert_model_parallel_size: int = 1
    # Replicas of the data-parallel group (HSDP: replicate across groups, FSDP-shard within one).
    # 1: FSDP over all data-parallel ranks. Equal to the data-parallel size: plain replication (DDP).
    data_parallel_replicate_size: int = 1
    # Shorthand for HSDP with one replica per node: resolve_recipe sets data_parallel_replicate_size
    # to the launch's node count.
    hsdp: bool = False
    # Free a layer's gathered parameters after its forward pass (less memory, one more all-gather in
    # backward). "default": yes, except under pipeline parallelism where each micro-batch would
    # gather them again.
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"
    # When FSDP reduces gradients under gradient accumulation. "last_micro_batch": accumulate this
    # rank's unsharded fp32 gradients over the step's micro-batches and reduce-scatter once (one
    # reduction per step instead of one per micro-batch; costs 4 bytes per trainable parameter of
    # this rank's tensor/pipeline shard). "every_micro_batch": reduce-scatter after each one (least
    # memory). "auto": the first when those gradients take at most 1/8 of the device's memory.
    fsdp_gradient_sync: Literal["auto", "last_micro_batch", "every_micro_batch"] = "auto"
    # Recompute activations in backward: "full" keeps only each layer's input; "selective" keeps
    # the matmul and attention outputs and recomputes the cheap element-wise ops between them.
    # "auto": the least recomputation (none, then selective, then full) whose planned memory fits
    # the device's free memory (shoal.plan.checkpointing); the run's log says which and why.
    activation_checkpointing: Literal["none", "full", "selective", "auto"] = "none"
    # torch.compile each decoder layer.
    compile: bool = False
    # Replay each compiled decoder layer's forward and backward as CUDA graphs (inductor's
    # cudagraph trees): the host launches one graph per layer and pass instead of every kernel,
    # which is what limits a LoRA step on one GPU. One CUDA device, no data/tensor/pipeline/context
    # parallelism, and `compile` on; see docs/training.md.
    cuda_graphs: bool = False
    # dtype of parameters during forward/backward under FSDP (master weights stay fp32).
    # None: the run's training precision (bf16 on GPU, fp32 on CPU).
    param_dtype: Literal["bfloat16", "float32"] | None = None
    # dtype of the gradient reduction across data-parallel ranks.
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        sizes = {
            "tensor_model_parallel_size": self.tensor_model_parallel_size,
            "pipeline_model_parallel_size": self.pipeline_model_parallel_size,
            "context_parallel_size": self.context_parallel_size,
            "expert_model_parallel_size": self.expert_model_parallel_size,
            "data_parallel_replicate_size": self.data_parallel_replicate_size,
        }
        for key, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ShoalError(f"parallel.{key} must be a positive integer, got {value!r}")
        v = self.virtual_pipeline_model_parallel_size
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ShoalError(f"parallel.virtual_pipeline_model_parallel_size must be a positive integer, got {v!r}")
        if self.pipeline_schedule == "1f1b" and v not in (None, 1):
            raise ShoalError(
                f"parallel.virtual_pipeline_model_parallel_size={v} needs "
                "parallel.pipeline_schedule=interleaved_1f1b (1f1b runs one stage per rank)"
            )

    @property
    def stages_per_rank(self) -> int:
        if self.virtual_pipeline_model_parallel_size is not None:
            return self.virtual_pipeline_model_parallel_size
        return 2 if self.pipeline_schedule == "interleaved_1f1b" else 1

    @property
    def replicate_size(self) -> int:
        """Data-parallel replicas (under `hsdp`, resolve_recipe has made it the node count)."""
        return self.data_parallel_replicate_size
