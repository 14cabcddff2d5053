"""Apply tensor/sequence parallelism, activation checkpointing, compile and FSDP2 to a built model.

The order is torchtitan's and it matters: tensor parallelism first (it turns weights into DTensors
on the "tp" axis), then activation checkpointing and compile on each decoder layer, then FSDP2,
which shards whatever it finds (plain tensors or tp DTensors) over the data-parallel axes and adds
its all-gather/reduce-scatter hooks outside the checkpointed, compiled layer.

Nothing here names a model's modules: a `ParallelPlan` (shoal.distributed.plan) does, for shoal's
decoder `shoal.models.parallel_plan.DECODER_PLAN`.

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
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Partial
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from shoal.config.parallel import ParallelConfig
from shoal.distributed.expert_parallel import apply_expert_parallel
from shoal.distributed.mesh import ParallelDims
from shoal.distributed.plan import ParallelPlan, SplitsItself
from shoal.errors import ShoalError
from shoal.models.document_attention import varlen_ops_to_save
from shoal.models.moe import MoE
from shoal.models.parallel_plan import DECODER_PLAN

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SPLIT_BY_PLAIN_STYLES = (nn.Linear, nn.Embedding)  # what ColwiseParallel/RowwiseParallel can shard

aten = torch.ops.aten
# Selective checkpointing keeps these ops' outputs and recomputes everything between them (norms,
# SiLU, RoPE, residual adds): the expensive matmuls and attention run once, the cheap element-wise
# ops twice. Reduce-scatter outputs are kept too (as torchtitan does), so recomputation repeats
# fewer collectives. In a mixture-of-experts block the routing (softmax, top-k, the sort by
# expert) is recomputed too: cheap beside the grouped matmuls, and deterministic, so backward
# routes as the forward did.
_SELECTIVE_SAVE_OPS = [
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten._scaled_mm.default,  # FP8 matmuls (torchao, --fp8)
    aten._grouped_mm.default,  # the experts of a mixture-of-experts layer (GPU)
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    *varlen_ops_to_save(),
]


def _styles_for_targets(
    model: nn.Module, plan: dict[str, ParallelStyle], compiled: bool
) -> tuple[dict[str, ParallelStyle], list[nn.Module]]:
    """The plan with each module that splits itself given its own style, and those modules.

    ColwiseParallel/RowwiseParallel shard nn.Linear/nn.Embedding weights; anything else they
    would meet is refused here with a message rather than a DTensor error deep inside."""
    styles, self_split = {}, []
    for name, style in plan.items():
        target = model.get_submodule(name)
        if isinstance(target, SplitsItself):
            style = target.tensor_parallel_style(style, compiled)
            self_split.append(target)
        elif isinstance(style, (ColwiseParallel, RowwiseParallel)) and not isinstance(target, SPLIT_BY_PLAIN_STYLES):
            raise ShoalError(
                f"tensor parallelism cannot split {name}: it is a {type(target).__name__}, "
                "not an nn.Linear, nn.Embedding or a module with its own tensor_parallel_style"
            )
        styles[name] = style
    return styles, self_split


def _shared_parameters(model: nn.Module) -> list[list[str]]:
    """Names of parameters that several modules share (tied embeddings), grouped by parameter."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Share each group's parameter again after the styles made one DTensor per module. Only sound
    when the styles agree on the placement (the decoder shards a tied [V, E] weight by vocabulary
    row, Shard(0), on both sides)."""
    for first, *others in groups:
        param = model.get_parameter(first)
        for name in others:
            owner, _, leaf = name.rpartition(".")
            if getattr(model.get_parameter(name), "placements", None) != getattr(param, "placements", None):
                raise ShoalError(f"tensor parallelism split the tied weights {first} and {name} differently")
            setattr(model.get_submodule(owner), leaf, param)


def apply_tp(
    model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, ParallelStyle], compiled: bool = False
) -> list[nn.Module]:
    """Split the model's weights over the tensor-parallel ranks (in place) by `plan` (styles by
    module name). Returns the modules that split themselves (`SplitsItself`), whose replicated
    tensors may get partial-sum gradients (see `complete_partial_grads`)."""
    styles, self_split = _styles_for_targets(model, plan, compiled)
    tied = _shared_parameters(model)
    # SequenceParallel makes new Parameters that require grad; frozen ones (LoRA/DoRA fine-tuning
    # freezes everything but the adapters) must stay frozen.
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    parallelize_module(model, tp_mesh, styles)
    _retie(model, tied)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return self_split


def _complete_grad(param: torch.Tensor) -> None:
    # A replicated tensor's gradient can arrive as a partial sum over the tensor-parallel ranks:
    # add it up once, here, so every rank holds the whole gradient.
    grad = param.grad
    if isinstance(grad, DTensor) and any(isinstance(p, Partial) for p in grad.placements):
        param.grad = grad.redistribute(placements=param.placements)


def complete_partial_grads(model: nn.Module, modules: list[nn.Module]) -> None:
    """Make the partial-sum gradients of `modules`' parameters whole (the same on every rank) as
    soon as they are accumulated: for tensor parallelism without FSDP, whose reduction does it
    otherwise.

    The hooks are attached before each forward to whatever parameter objects the modules hold
    then: materialising a meta model (`to_empty`) replaces a DTensor parameter's contents and
    drops its hooks, so hooks attached when the layout is applied would be lost.
    """
    if not modules:
        return

    def attach(module: nn.Module, args: tuple) -> None:
        for owner in modules:
            for param in owner.parameters():
                if param.requires_grad and not getattr(param, "_shoal_grad_hook", False):
                    param.register_post_accumulate_grad_hook(_complete_grad)
                    param._shoal_grad_hook = True  # travels with the hook if the contents are swapped

    model.register_forward_pre_hook(attach)


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


def apply_activation_checkpointing(blocks: list[nn.Module], mode: str) -> None:
    """Recompute each block's activations in backward ("full" or "selective")."""
    if mode == "none":
        return
    if mode == "full":
        context_fn = None
    elif mode == "selective":
        context_fn = functools.partial(create_selective_checkpoint_contexts, _SELECTIVE_SAVE_OPS)
    else:
        raise ShoalError(f"parallel.activation_checkpointing {mode!r}: expected none, full or selective")
    for block in blocks:
        forward = functools.partial(_checkpointed_forward, _shoal_context_fn=context_fn)
        block.forward = types.MethodType(forward, block)


def checkpoint_compiled(blocks: list[nn.Module]) -> None:
    """Full activation checkpointing around each block's compiled forward: the block keeps its
    input alone and runs the compiled forward again in backward.

    For tensor-parallel blocks under full checkpointing. Compiled with the checkpoint inside (as
    `apply_compile` does otherwise), torch 2.13's AOTAutograd lists the layer's DeviceMesh among the
    tensors it saves for backward and stops (`expected all tensors_saved_with_vc_check to be
    Tensors`); torch 2.11 took it. Outside, the compiled graph knows nothing of the checkpoint, so
    the recomputation is the whole forward rather than the partitioner's choice, which is what full
    checkpointing asks anyway. Not for mixture-of-experts blocks: they compile with the checkpoint
    inside on torch 2.13, and checkpointed from outside their gradients moved by 1e-3 against
    eager (cause not found; tests/distributed/test_compiled_layouts.py covers both)."""
    for block in blocks:
        compiled = block.forward

        @functools.wraps(compiled)
        def forward(*args: Any, _compiled: Any = compiled, **kwargs: Any) -> Any:
            return checkpoint(_compiled, *args, use_reentrant=False, **kwargs)

        block.forward = forward


_CHECKPOINT_SIDE_EFFECTS = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def _tracing_side_effects_under_checkpoint(compiled: Any) -> Any:
    """`compiled`, traced with Dynamo's leave to mutate state from inside a checkpointed region.

    Dynamo traces `torch.utils.checkpoint` as one higher-order op and by default refuses one whose
    body mutates anything outside it, because eager checkpointing replays such mutations when it
    recomputes the forward in backward and a compiled graph cannot. The mixture-of-experts block
    does mutate: it keeps its routing statistics for the load-balancing loss (`MoE.last_routing`).
    The refusal is a graph break at the checkpoint, and the whole layer then ran eagerly: on an
    H200, the 30B-A3B shape with LoRA fell from 18.5k tokens/s (compiled, no checkpointing) to
    6.4k under full and 3.6k under selective checkpointing (bench/results/moe_lora_ac_*_h200*.json,
    issue 18). With leave, the kept tensors become outputs of the checkpointed graph (the aux loss's
    gradient flows through them) and the recomputation does not assign them again, which nothing
    needs: the statistics are read between a forward and its backward. The setting is scoped to
    the call, where Dynamo traces, so code compiled elsewhere keeps the default.
    """
    if not hasattr(torch._dynamo.config, _CHECKPOINT_SIDE_EFFECTS):  # an older torch: as before
        return compiled

    @functools.wraps(compiled)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(**{_CHECKPOINT_SIDE_EFFECTS: True}):
            return compiled(*args, **kwargs)

    return forward


def apply_compile(blocks: list[nn.Module], cuda_graphs: bool = False, tensor_parallel: bool = False) -> None:
    """torch.compile each block's forward (blocks are identical, so one graph serves all), its
    activation checkpointing (applied before) included; with `cuda_graphs`, each block's compiled
    forward and backward are recorded once per input shape and then replayed as CUDA graphs.
    Under `tensor_parallel`, a block's input still in flight is waited for first (see
    `_inputs_arrived`).

    Graph breaks are allowed: context parallelism's attention communicates inside the layer.
    """
    for block in blocks:
        compiled = torch.compile(block.forward, mode="reduce-overhead" if cuda_graphs else None)
        # Only where a block mutates state: the scoped setting costs ~25 us per call on the host,
        # which a host-bound dense LoRA step would pay at every layer.
        if _has_moe(block):
            compiled = _tracing_side_effects_under_checkpoint(compiled)
        if tensor_parallel:
            compiled = _inputs_arrived(compiled)
        block.forward = compiled


def _has_moe(block: nn.Module) -> bool:
    return any(isinstance(m, MoE) for m in block.modules())


def _inputs_arrived(forward: Any) -> Any:
    """`forward` given its tensor arguments with their collectives completed.

    A tensor-parallel style outside the compiled blocks (the embedding's RowwiseParallel) hands the
    first block an `AsyncCollectiveTensor`, its output's reduce-scatter or all-reduce still in
    flight. On torch 2.13 (not 2.11) the compiled block's backward then returns that input's
    gradient as a plain tensor where the style's backward expects a DTensor, and the step fails
    (`'Tensor' object has no attribute '_local_tensor'`). Waiting here is what the block's first
    operation would do anyway. Not through `.wait()`, which returns the
    result outside autograd (the embedding would get no gradient): any op but a view waits, and a
    copy of one activation is the cheapest that autograd records."""

    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> Any:
        return forward(*(a.clone() if isinstance(a, AsyncCollectiveTensor) else a for a in args), **kwargs)

    return call


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    units: list[tuple[nn.Module, bool] | tuple[nn.Module, bool, DeviceMesh]],
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype,
    reshard_after_forward: bool,
) -> None:
    """FSDP2: each unit (module, keep gathered after forward[, its own mesh]) is gathered just
    before it runs, and the root takes whatever remains (for the decoder: the final norm, a tied
    embedding). A unit's own mesh is for expert-parallel experts (see mesh.py)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for module, keep_gathered, *own_mesh in units:
        reshard = False if keep_gathered else reshard_after_forward
        fully_shard(module, mesh=own_mesh[0] if own_mesh else mesh, mp_policy=mp, reshard_after_forward=reshard)
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
    plan: ParallelPlan = DECODER_PLAN,
) -> nn.Module:
    """Apply the layout to a model (or one pipeline stage of it), in place; returns the model.
    `plan` names the model's modules; the layout was checked by `check_parallel_layout`.

    compute_dtype is the training precision (bf16 on GPU): FSDP2 runs forward/backward in it while
    the sharded fp32 weights, the optimizer and the gradient reduction stay in fp32. Without FSDP
    (one process, or tensor parallelism alone) use `autocast_context` for the same effect.
    """
    blocks = plan.blocks(model)
    if parallel_dims.tp_enabled:
        tp_plan = plan.tensor_parallel(model, parallel_cfg.sequence_parallel)
        self_split = apply_tp(model, parallel_dims.submesh("tp"), tp_plan, compiled=parallel_cfg.compile)
        if not parallel_dims.dp_enabled:  # FSDP2 completes partial gradients in its own reduction
            complete_partial_grads(model, self_split)
    if parallel_dims.ep_enabled:
        apply_expert_parallel(plan.experts(model), parallel_dims.submesh("ep"))
    if parallel_dims.tp_enabled or parallel_dims.cp_enabled:
        _install_input_checks(model, parallel_dims, parallel_cfg.sequence_parallel)
    ac = parallel_cfg.activation_checkpointing
    # Full checkpointing of a dense tensor-parallel layer does not compile on torch 2.13: there the
    # compiled layer is checkpointed from outside instead (checkpoint_compiled).
    outside = []
    if parallel_cfg.compile and ac == "full" and parallel_dims.tp_enabled:
        outside = [b for b in blocks if not _has_moe(b)]
    apply_activation_checkpointing([b for b in blocks if b not in outside], ac)
    if parallel_cfg.compile:
        apply_compile(blocks, parallel_cfg.cuda_graphs, tensor_parallel=parallel_dims.tp_enabled)
    checkpoint_compiled(outside)
    if parallel_dims.dp_enabled:
        reshard = parallel_cfg.fsdp_reshard_after_forward
        reshard_after_forward = reshard == "always" or (reshard == "default" and not parallel_dims.pp_enabled)
        units = plan.fsdp_units(model)
        if parallel_dims.ep_enabled:
            # Experts first, on their own mesh: the layer's unit then leaves their weights alone.
            units = [(experts, False, parallel_dims.expert_fsdp_mesh) for experts in plan.experts(model)] + units
        apply_fsdp(
            model,
            parallel_dims.fsdp_mesh,
            units,
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
