"""Apply tensor/sequence parallelism, activation checkpointing, compile and FSDP2 to a built model.

The order is torchtitan's and it matters: tensor parallelism first (it turns weights into DTensors
on the "tp" axis), then activation checkpointing and compile on each decoder layer, then FSDP2,
which shards whatever it finds (plain tensors or tp DTensors) over the data-parallel axes and adds
its all-gather/reduce-scatter hooks outside the checkpointed, compiled layer.

Nothing here changes a parameter's name: checkpointing and compile replace a layer's `forward`
instead of wrapping the layer in another module, so `named_parameters()` and DCP's
`get_model_state_dict` give Hugging Face's names on every layout. The model may be on the meta
device (the training loop materialises it afterwards) or already hold real weights.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts, noop_context_fn

from shoal.config.parallel import ParallelConfig
from shoal.distributed.lora_parallel import (
    LoraColwiseParallel,
    LoraRowwiseParallel,
    check_lora_under_tp,
    complete_adapter_grads,
    lora_aware_plan,
)
from shoal.distributed.mesh import ParallelDims
from shoal.errors import ShoalError
from shoal.models.document_attention import varlen_ops_to_save

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

aten = torch.ops.aten
# Selective checkpointing keeps these ops' outputs and recomputes everything between them (norms,
# SiLU, RoPE, residual adds): the expensive matmuls and attention run once, the cheap element-wise
# ops twice. Reduce-scatter outputs are kept too (as torchtitan does), so recomputation repeats
# fewer collectives.
_SELECTIVE_SAVE_OPS = [
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten._scaled_mm.default,  # FP8 matmuls (torchao, --fp8)
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    *varlen_ops_to_save(),
]


def tp_plan_for_model(model: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Plan for the embedding, final norm and output layer that this model (or stage) holds.

    With sequence parallelism, activations between layers are split along the sequence (Shard(1));
    without it they are whole on every rank (Replicate). Logits come back whole on every rank, so
    the loss is computed as in one process.
    """
    between = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {}
    if model.model.embed_tokens is not None:
        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if model.model.norm is not None and sequence_parallel:
        plan["model.norm"] = SequenceParallel()
    if model.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(input_layouts=between, output_layouts=Replicate())
    return plan


def tp_plan_for_layer(layer: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Megatron's split of one decoder layer: q/k/v and gate/up by output column (heads), o and
    down by input row, so each half of a block needs one collective at its end."""
    between = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {
        # Attention(x, cos, sin, mask): only x is laid out over ranks; RoPE tables and the mask are
        # the same full-sequence tensors on every rank.
        "self_attn": PrepareModuleInput(
            input_layouts=(between, None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
        ),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=between),
        "mlp": PrepareModuleInput(input_layouts=(between,), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=between),
    }
    if sequence_parallel:
        plan["input_layernorm"] = SequenceParallel()
        plan["post_attention_layernorm"] = SequenceParallel()
    if layer.self_attn.q_norm is not None:
        # Qwen3's per-head q/k norms see [B, S, local heads, D]: the weight is shared by all heads,
        # so it is replicated and its gradient summed over ranks, which is what treating the head
        # axis (dim 2) as the sharded one gives.
        plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def _check_tp_targets(module: nn.Module, plan: dict[str, ParallelStyle], where: str) -> None:
    """ColwiseParallel/RowwiseParallel shard nn.Linear/nn.Embedding weights, their LoRA versions a
    LoraLinear; refuse anything else with a message rather than a DTensor error deep inside."""
    for name, style in plan.items():
        if isinstance(style, (LoraColwiseParallel, LoraRowwiseParallel)):
            continue  # chosen by type in lora_aware_plan
        if isinstance(style, (ColwiseParallel, RowwiseParallel)):
            target = module.get_submodule(name)
            if not isinstance(target, (nn.Linear, nn.Embedding)):
                raise ShoalError(
                    f"tensor parallelism cannot split {where}{name}: it is a {type(target).__name__}, "
                    "not an nn.Linear, nn.Embedding or LoRA/DoRA-adapted linear layer"
                )


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Split the model's weights over the tensor-parallel ranks (in place)."""
    tied = model.lm_head is not None and model.model.embed_tokens is not None and (
        model.lm_head.weight is model.model.embed_tokens.weight
    )
    # SequenceParallel makes new Parameters that require grad; frozen ones (LoRA/DoRA fine-tuning
    # freezes everything but the adapters) must stay frozen.
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    top_plan = tp_plan_for_model(model, sequence_parallel)
    _check_tp_targets(model, top_plan, "")
    parallelize_module(model, tp_mesh, top_plan)
    if tied:
        # Both styles shard the [V, E] weight by vocabulary row (Shard(0)), so the two DTensors
        # agree and the output layer can share the embedding's parameter again.
        model.lm_head.weight = model.model.embed_tokens.weight
    for index, layer in model.model.layers.items():
        layer_plan = lora_aware_plan(layer, tp_plan_for_layer(layer, sequence_parallel))
        _check_tp_targets(layer, layer_plan, f"model.layers.{index}.")
        parallelize_module(layer, tp_mesh, layer_plan)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)


def _install_input_checks(model: nn.Module, parallel_dims: ParallelDims, sequence_parallel: bool) -> None:
    """Make positions explicit where the model would otherwise infer them from a sharded shape.

    Under sequence parallelism the embedding returns a sequence shard and the model would count
    positions 0..S/tp; under context parallelism each rank holds non-contiguous pieces of the
    sequence, whose positions only the caller knows.
    """
    tp = parallel_dims.tp

    def check(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        if parallel_dims.cp_enabled:
            if kwargs.get("position_ids") is None:
                raise ShoalError(
                    "under context parallelism the model needs position_ids: pass the ones sharded by "
                    "context_parallel_context (they are not 0..S-1 on each rank)"
                )
            if kwargs.get("document_ids") is not None:
                raise ShoalError(
                    "under context parallelism pass document_ids to context_parallel_context, "
                    "not to the model: the attention mask spans the whole sequence, held by several ranks"
                )
        elif kwargs.get("position_ids") is None and tp > 1 and sequence_parallel:
            tokens = args[0] if args else kwargs["tokens"]
            b, s = tokens.shape[:2]
            if tokens.dim() == 3:  # hidden states from the previous pipeline stage: a sequence shard
                s *= tp
            kwargs["position_ids"] = torch.arange(s, device=tokens.device).expand(b, s)
        return args, kwargs

    model.register_forward_pre_hook(check, with_kwargs=True)


def _checkpointed_forward(self: nn.Module, *args: Any, _shoal_context_fn: Any = None, **kwargs: Any) -> Any:
    # The class's forward, not a saved bound method: a deep copy of the layer then checkpoints itself.
    if _shoal_context_fn is None:
        # Full checkpointing passes no context_fn: torch.compile cannot trace one given explicitly.
        return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, context_fn=_shoal_context_fn, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute each decoder layer's activations in backward ("full" or "selective")."""
    if mode == "none":
        return
    if mode == "full":
        context_fn = None
    elif mode == "selective":
        context_fn = functools.partial(create_selective_checkpoint_contexts, _SELECTIVE_SAVE_OPS)
    else:
        raise ShoalError(f"parallel.activation_checkpointing {mode!r}: expected none, full or selective")
    for layer in model.model.layers.values():
        forward = functools.partial(_checkpointed_forward, _shoal_context_fn=context_fn)
        layer.forward = types.MethodType(forward, layer)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each decoder layer's forward (layers are identical, so one graph serves all).

    Graph breaks are allowed: context parallelism's attention communicates inside the layer.
    """
    for layer in model.model.layers.values():
        layer.forward = torch.compile(layer.forward)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype,
    reshard_after_forward: bool,
) -> None:
    """FSDP2: each decoder layer is one unit (gathered just before it runs), plus the embedding and
    the output layer when they are not tied, plus the root for whatever remains (final norm)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    embed, lm_head = model.model.embed_tokens, model.lm_head
    tied = embed is not None and lm_head is not None and lm_head.weight is embed.weight
    if embed is not None and not tied:
        fully_shard(embed, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for layer in model.model.layers.values():
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if lm_head is not None and not tied:
        # Its backward runs right after its forward: keeping it gathered saves an all-gather.
        fully_shard(lm_head, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, not average: the loss is already divided by the global number of loss tokens,
            # so summed per-rank gradients equal the one-process gradient (see docs/parallelism.md).
            module.set_gradient_divide_factor(1.0)
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                # With a factor of 1 a plain SUM is exact; without this FSDP asks for NCCL's
                # PREMUL_SUM, which gloo lacks.
                module.set_force_sum_reduction_for_comms(True)


def resolve_param_dtype(parallel_cfg: ParallelConfig, compute_dtype: torch.dtype | None) -> torch.dtype | None:
    """The config's param_dtype if set, else the run's compute dtype (None: keep the weights' dtype)."""
    if parallel_cfg.param_dtype is not None:
        return DTYPES[parallel_cfg.param_dtype]
    return compute_dtype


def parallelize_model(
    model: nn.Module,
    parallel_dims: ParallelDims,
    parallel_cfg: ParallelConfig,
    device_type: str,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Apply the layout to a model (or one pipeline stage of it), in place; returns the model.

    compute_dtype is the training precision (bf16 on GPU): FSDP2 runs forward/backward in it while
    the sharded fp32 weights, the optimizer and the gradient reduction stay in fp32. Without FSDP
    (one process, or tensor parallelism alone) use `autocast_context` for the same effect.
    """
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise ShoalError(f"parallelize_model expects a shoal Transformer, got {type(model).__name__}")
    cfg = getattr(model, "config", None)
    if cfg is not None and parallel_dims.tp_enabled:
        for key in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            if getattr(cfg, key) % parallel_dims.tp:
                raise ShoalError(
                    f"tensor_model_parallel_size {parallel_dims.tp} does not divide the model's {key} "
                    f"({getattr(cfg, key)})"
                )
    if parallel_dims.tp_enabled:
        check_lora_under_tp(model, parallel_cfg.compile)
        apply_tp(model, parallel_dims.submesh("tp"), parallel_cfg.sequence_parallel)
        if not parallel_dims.dp_enabled:  # FSDP2 completes partial gradients in its own reduction
            complete_adapter_grads(model)
    if parallel_dims.tp_enabled or parallel_dims.cp_enabled:
        _install_input_checks(model, parallel_dims, parallel_cfg.sequence_parallel)
    apply_activation_checkpointing(model, parallel_cfg.activation_checkpointing)
    if parallel_cfg.compile:
        apply_compile(model)
    if parallel_dims.dp_enabled:
        reshard = parallel_cfg.fsdp_reshard_after_forward
        reshard_after_forward = reshard == "always" or (reshard == "default" and not parallel_dims.pp_enabled)
        apply_fsdp(
            model,
            parallel_dims.fsdp_mesh,
            param_dtype=resolve_param_dtype(parallel_cfg, compute_dtype),
            reduce_dtype=DTYPES[parallel_cfg.reduce_dtype],
            reshard_after_forward=reshard_after_forward,
        )
    return model


def autocast_context(
    parallel_dims: ParallelDims, parallel_cfg: ParallelConfig, device_type: str, compute_dtype: torch.dtype | None
) -> Any:
    """Mixed precision where FSDP2 does not provide it: torch.autocast to the compute dtype when the
    model is not FSDP-wrapped and that dtype is lower than fp32; a no-op context otherwise."""
    dtype = resolve_param_dtype(parallel_cfg, compute_dtype)
    if parallel_dims.dp_enabled or dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)
