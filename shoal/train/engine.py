"""The model as training sees it: one part, or this rank's pipeline stages, behind one interface.

`build_engine` builds the model on the meta device, swaps in LoRA/DoRA adapters, applies the
parallel layout from outside (`shoal.distributed`), materialises it, and loads or initialises the
weights. `Engine.forward_backward` and `Engine.loss_sum` then hide whether a pipeline schedule
runs underneath. Saving and restoring `parts` and `optimizers` is shoal.checkpoint's.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from shoal.checkpoint.state import load_model_into
from shoal.config.parallel import ParallelConfig
from shoal.config.recipe import TrainSection
from shoal.distributed import ParallelDims, parallelize_model
from shoal.distributed.float8 import Float8Plan, float8_plan, precompute_float8_scales
from shoal.distributed.grad_norm import clip_grad_norm_
from shoal.distributed.parallelize import autocast_context
from shoal.models import ModelConfig
from shoal.models.fused_linear import pack_frozen_groups
from shoal.models.model import Transformer
from shoal.peft.config import LoraConfig
from shoal.train.linear_cross_entropy import chunk_loss_and_grad, gather_loss_rows, linear_cross_entropy_sum
from shoal.train.step import (
    build_optimizer,
    masked_cross_entropy_sum,
    model_inputs,
    with_document_spans,
    with_loss_positions,
)


@dataclass
class Engine:
    parts: list[nn.Module]
    optimizers: list[torch.optim.Optimizer]
    dims: ParallelDims
    document_mask: bool
    autocast: Callable[[], contextlib.AbstractContextManager]
    pipeline: Any = None  # shoal.distributed.pipeline.Pipeline under pipeline parallelism
    # Σ CE·mask; compiled with the model so the fp32 upcast and softmax of the [tokens, vocab]
    # logits fuse into one pass instead of materialising fp32 copies (a tenth of a 1B step).
    loss_fn: Callable[..., torch.Tensor] = masked_cross_entropy_sum
    # Reduce-scatter gradients only after the step's last micro-batch (parallel.fsdp_gradient_sync).
    defer_gradient_sync: bool = False
    float8: Float8Plan | None = None  # FP8 matmuls (train.fp8), see shoal.distributed.float8
    # Mixture of experts: the model's load-balancing loss, weighted by router_aux_loss_coef, joins
    # the objective; last_aux_loss is its mean over this rank's micro-batches of the last step.
    moe: bool = False
    aux_loss_coef: float = 0.0
    last_aux_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None  # [sparse layers, X]: last step's routing counts on this rank
    # Output layer + loss a chunk of tokens at a time (shoal.train.linear_cross_entropy), where
    # lm_head is a plain, whole nn.Linear of this process: no [tokens, vocab] logits are kept.
    head_loss_fn: Callable[..., torch.Tensor] | None = None
    # The compiled layers replay CUDA graphs (parallel.cuda_graphs): each micro-batch starts a new
    # replay, and gradients are kept outside the graphs' memory (see _keep_gradients_outside_graphs).
    cuda_graphs: bool = False
    # FP8 all-gather (tensorwise under FSDP2): whether the weights' precomputed scales are those of
    # the weights now in the model (see _scale_float8_weights).
    float8_scales_current: bool = False

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, in module order (a new list; the Parameters are the model's)."""
        return list(self._trainable)

    @functools.cached_property
    def _trainable(self) -> tuple[nn.Parameter, ...]:
        # Fixed once the engine is built (its optimizers hold these very ones). Scanning every module
        # again costs ~2 ms of host time per call on the 8B LoRA shape, which a host-bound step pays.
        return tuple(p for part in self.parts for p in part.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    def _scale_float8_weights(self) -> None:
        """Before the first forward: the FP8 all-gather scales of the weights as loaded (or restored).
        Without them the first all-gather scales each weight by the amax of what its FSDP group
        holds, which under tensor parallelism is one shard of it: every later step (scales
        precomputed after each optimizer step) scales by the whole weight's amax, as one process does."""
        if not self.float8_scales_current:
            precompute_float8_scales(self.parts, self.float8)
            self.float8_scales_current = True

    def _pipeline_run(self, mbs: list[dict[str, torch.Tensor]], global_tokens: float, backward: bool) -> torch.Tensor:
        from shoal.distributed.pipeline import pipeline_step

        cat = {k: torch.cat([mb[k] for mb in mbs]) for k in mbs[0] if k != "cu_seqlens"}
        return pipeline_step(
            self.pipeline, cat["tokens"], cat["labels"], cat["loss_mask"], global_tokens,
            position_ids=cat["position_ids"], document_ids=cat["document_ids"] if self.document_mask else None,
            backward=backward,
        )

    @property
    def takes_document_spans(self) -> bool:
        """Whether micro-batches may carry `cu_seqlens` made on the host (shoal.train.step.with_document_spans).
        Not under a pipeline schedule (it cuts the batch into micro-batches itself) nor context
        parallelism (it masks documents its own way): those keep `document_ids` alone."""
        return self.document_mask and self.pipeline is None and not self.dims.cp_enabled

    @property
    def takes_loss_positions(self) -> bool:
        """Whether micro-batches may carry `loss_positions` made on the host (shoal.train.step.with_loss_positions),
        so that the output layer and the loss run on the loss tokens alone. Not under a pipeline
        schedule (it cuts the batch itself) nor context parallelism (each rank holds a slice of the
        sequence the positions index); under tensor parallelism the sequence-parallel hidden states
        are gathered whole first (gather_loss_rows); under FSDP only where the output layer is its
        own unit, gathered in its own forward (a tied one belongs to the root, resharded once the
        model's forward ends)."""
        if self.pipeline is not None or self.dims.cp_enabled:
            return False
        head = self.parts[0].lm_head
        return head is not None and (not self.dims.dp_enabled or isinstance(head, FSDPModule))

    def prepare_on_host(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A micro-batch as this engine takes it, made on the host before its copy to the device:
        its documents' spans (padded to a few shapes when CUDA graphs replay the layers) and its loss
        tokens' positions, where the engine uses them (takes_document_spans, takes_loss_positions)."""
        if self.takes_document_spans:
            batch = with_document_spans(batch, fixed_shapes=self.cuda_graphs)
        if self.takes_loss_positions:
            batch = with_loss_positions(batch)
        return batch

    def forward_backward(self, mbs: list[dict[str, torch.Tensor]], global_tokens: float | torch.Tensor) -> torch.Tensor:
        """Accumulate the gradient of Σ CE·mask / global_tokens; returns this rank's Σ CE·mask.
        `global_tokens` may be a 0-d device tensor (a count all-reduced over ranks): dividing by it
        keeps the host from waiting for the count, where reading it back would not."""
        self._scale_float8_weights()
        if self.pipeline is not None:
            return self._pipeline_run(mbs, float(global_tokens), backward=True)
        total = torch.zeros((), device=mbs[0]["tokens"].device)
        aux_total = torch.zeros((), device=total.device) if self.moe else None
        counts_total = None
        if self.cuda_graphs:
            self._keep_gradients_outside_graphs()
        for i, mb in enumerate(mbs):
            if self.defer_gradient_sync:
                self._gradient_sync(i == len(mbs) - 1)
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with self._sequence_shard(mb) as (tokens, labels, loss_mask, inputs):
                loss_sum = self._loss_sum(tokens, labels, loss_mask, inputs, mb.get("loss_positions"))
                # Gradients are summed (not averaged) across data-parallel ranks, see docs/parallelism.md.
                objective = loss_sum / _divisor(global_tokens, loss_sum)
                if aux_total is not None:
                    # One aux loss per micro-batch (transformers' definition); the step's is their
                    # mean over the global batch, hence the division by every rank's micro-batches.
                    aux = self.parts[0].aux_loss()
                    objective = objective + self.aux_loss_coef * aux / (len(mbs) * self.dims.dp_size)
                    aux_total += aux.detach()
                    counts = torch.stack([block.last_routing.counts for block in self.parts[0].moe_blocks()])
                    counts_total = counts if counts_total is None else counts_total + counts
                objective.backward()
            total += loss_sum.detach()
        if aux_total is not None:
            self.last_aux_loss = aux_total / len(mbs)
            self.expert_counts = counts_total
        return total

    def _keep_gradients_outside_graphs(self) -> None:
        """Give every trainable parameter a zero gradient before the first backward.

        A layer's backward graph writes the gradients into memory of the graphs' own pool, which
        the next replay reuses. Autograd would keep that very tensor as `.grad` when the parameter
        had none, and the next micro-batch's replay would overwrite it; an existing `.grad` is
        added into instead, so the sums live in ordinary memory (clip_and_step zeroes them in place)."""
        for p in self._trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _gradient_sync(self, sync: bool) -> None:
        """FSDP2: reduce-scatter (and free the gathered parameters) after this backward only if `sync`;
        otherwise gradients accumulate unsharded in fp32 until the step's last micro-batch."""
        for part in self.parts:
            if isinstance(part, FSDPModule):
                part.set_requires_gradient_sync(sync)
                part.set_reshard_after_backward(sync)

    @contextlib.contextmanager
    def _sequence_shard(self, mb: dict[str, torch.Tensor]):
        """This rank's share of a micro-batch: all of it, or its context-parallel slice of the sequence
        (then attention runs context-parallel inside, backward included)."""
        if not self.dims.cp_enabled:
            yield mb["tokens"], mb["labels"], mb["loss_mask"], model_inputs(mb, self.document_mask)
            return
        from shoal.distributed import context_parallel_context

        buffers = [mb["tokens"], mb["labels"], mb["loss_mask"], mb["position_ids"]]
        documents = mb["document_ids"] if self.document_mask else None
        with context_parallel_context(self.dims, buffers, [1, 1, 1, 1], document_ids=documents) as shards:
            tokens, labels, loss_mask, positions = shards
            yield tokens, labels, loss_mask, {"position_ids": positions}

    @torch.no_grad()
    def loss_sum(self, mbs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        self._scale_float8_weights()
        if self.pipeline is not None:
            return self._pipeline_run(mbs, 1.0, backward=False)
        total = torch.zeros((), device=mbs[0]["tokens"].device)
        for mb in mbs:
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with self._sequence_shard(mb) as (tokens, labels, loss_mask, inputs):
                total += self._loss_sum(tokens, labels, loss_mask, inputs, mb.get("loss_positions"))
        return total

    def _loss_sum(self, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                  inputs: dict[str, torch.Tensor], loss_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Σ CE·mask of one micro-batch (shard) through the one model part. `loss_positions`, where
        the host made them (takes_loss_positions), send only those tokens through the output layer."""
        model = self.parts[0]
        rows_only = loss_positions is not None and self.takes_loss_positions
        with self.autocast():
            if self.head_loss_fn is None and not rows_only:
                logits = model(tokens, **inputs)
            else:
                hidden = model(tokens, head=False, **inputs)
                if rows_only:
                    # Prompt tokens carry no loss: their logits are not computed at all.
                    hidden, labels, loss_mask = gather_loss_rows(hidden, labels, loss_mask, loss_positions)
                if self.head_loss_fn is not None:
                    return self.head_loss_fn(hidden, model.lm_head.weight, labels, loss_mask)
                # The plain head (FSDP, FP8, adapted) called as a module: an FSDP unit gathers its weight.
                logits, labels, loss_mask = model.lm_head(hidden)[None], labels[None], loss_mask[None]
        return self.loss_fn(logits, labels, loss_mask)

    def clip_and_step(self, max_norm: float, lr: float) -> torch.Tensor:
        norm = clip_grad_norm_(self._trainable, max_norm, self.dims)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=not self.cuda_graphs)
        precompute_float8_scales(self.parts, self.float8)  # FP8 all-gather: scales of the new weights
        return norm


def _divisor(global_tokens: float | torch.Tensor, loss_sum: torch.Tensor) -> float | torch.Tensor:
    # In the loss's dtype: a float64 count would promote the objective (and its gradient) to float64.
    return global_tokens.to(loss_sum.dtype) if isinstance(global_tokens, torch.Tensor) else global_tokens


def build_engine(
    cfg: ModelConfig,
    *,
    train: TrainSection,
    parallel: ParallelConfig,
    peft: LoraConfig | None,
    dims: ParallelDims,
    device: torch.device,
    compute_dtype: torch.dtype,
    micro_batches_per_step: int = 1,
    document_mask: bool = False,
    start: Path | None = None,
    seq_length: int | None = None,
) -> Engine:
    """Build on meta, add adapters, apply the layout, materialise, then load `start`'s weights
    (or initialise them); the optimizer is AdamW with `train`'s settings. `seq_length` is needed
    only to resolve `parallel.activation_checkpointing: auto`."""
    if parallel.cuda_graphs:
        check_cuda_graphs(parallel, dims, device)
    if parallel.activation_checkpointing == "auto":
        parallel = resolve_auto_checkpointing(cfg, train, parallel, peft, dims, device, compute_dtype, seq_length)
    torch.manual_seed(train.seed)  # the same initial weights whatever the layout
    with torch.device("meta"):
        model = Transformer(cfg)
    if peft is not None:
        from shoal.peft import apply_lora

        apply_lora(model, rank=peft.rank, alpha=peft.alpha, dropout=peft.dropout,
                   target_modules=peft.target_modules, use_dora=peft.use_dora)
    float8 = float8_plan(train.fp8, train.fp8_recipe, dims.dp_shard * dims.cp if dims.dp_enabled else 1)
    if float8 is not None:
        _apply_float8(model, float8, device, parallel.compile)
    pipeline = None
    if dims.pp_enabled:
        from shoal.distributed.pipeline import pipeline_model

        pipeline, parts, _, _ = pipeline_model(
            model, dims, parallel, masked_cross_entropy_sum, train.micro_batch_size,
            micro_batches_per_step, device.type, compute_dtype,
        )
    else:
        parts = [parallelize_model(model, dims, parallel, device.type, compute_dtype)]
    for part in parts:
        part.to_empty(device=device)
        with torch.no_grad():
            part.init_weights()
        if start is not None:
            load_model_into(part, start)
        if peft is not None:
            from shoal.peft import init_lora_weights

            # After the load (DoRA's magnitude starts from the loaded weights); seeded per layer name,
            # so the adapters start the same in every layout.
            init_lora_weights(part, seed=train.seed)
        if not dims.dp_enabled:
            store_frozen_in(part, compute_dtype)
    t = train
    optimizers = [build_optimizer(p, t.lr, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_eps) for p in parts]
    autocast = lambda: autocast_context(dims, parallel, device.type, compute_dtype)  # noqa: E731
    loss_fn = torch.compile(masked_cross_entropy_sum) if parallel.compile else masked_cross_entropy_sum
    head_loss_fn = None
    if pipeline is None and not dims.tp_enabled and not dims.dp_enabled and type(parts[0].lm_head) is nn.Linear:
        # Not under tensor parallelism (a vocabulary-sharded head), pipelining (the schedule owns
        # the loss) or FSDP (lm_head's weight is gathered only inside its own forward), nor for an
        # FP8 or adapted head: those keep the plain path.
        chunk_fn = torch.compile(chunk_loss_and_grad) if parallel.compile else chunk_loss_and_grad
        head_loss_fn = functools.partial(linear_cross_entropy_sum, chunk_fn=chunk_fn)
    defer = pipeline is None and micro_batches_per_step > 1 and _defer_gradient_sync(
        parallel.fsdp_gradient_sync, parts, dims, device)
    return Engine(parts, optimizers, dims, document_mask, autocast, pipeline, loss_fn, defer, float8,
                  moe=cfg.is_moe, aux_loss_coef=cfg.router_aux_loss_coef, head_loss_fn=head_loss_fn,
                  cuda_graphs=parallel.cuda_graphs)


def check_cuda_graphs(parallel: ParallelConfig, dims: ParallelDims, device: torch.device) -> None:
    """parallel.cuda_graphs needs what a recorded graph can replay: one CUDA device whose compiled
    layers hold their own weights (no FSDP gathers, no collectives inside a layer)."""
    from shoal.errors import ShoalError

    if device.type != "cuda":
        raise ShoalError(f"parallel.cuda_graphs=true needs a CUDA GPU; this run is on {device.type}")
    if not parallel.compile:
        raise ShoalError("parallel.cuda_graphs=true replays the compiled layers: set parallel.compile=true too")
    if dims.world_size > 1:
        raise ShoalError(f"parallel.cuda_graphs=true runs on one GPU only; this run has {dims.world_size} "
                         "processes (FSDP gathers and tensor/pipeline/context-parallel communication "
                         "happen inside or between the layers a graph would replay)")


def resolve_auto_checkpointing(cfg: ModelConfig, train: TrainSection, parallel: ParallelConfig,
                               peft: LoraConfig | None, dims: ParallelDims, device: torch.device,
                               compute_dtype: torch.dtype, seq_length: int | None) -> ParallelConfig:
    """`auto` made none, selective or full by the planner's memory estimate against this device's
    free memory (shoal.plan.checkpointing); rank 0 says which and why."""
    import dataclasses
    import sys

    import torch.distributed as dist

    from shoal.errors import ShoalError
    from shoal.plan.checkpointing import choose_activation_checkpointing
    from shoal.plan.counts import count_parameters
    from shoal.plan.estimate import Workload
    from shoal.plan.layouts import layout_for

    if seq_length is None:
        raise ShoalError("parallel.activation_checkpointing=auto needs the sequence length (data.seq_length)")
    method = "none" if peft is None else ("dora" if peft.use_dora else "lora")
    try:
        counts = count_parameters(cfg, method, peft.rank if peft else 16, peft.target_modules if peft else ())
        work = Workload("finetune", seq_length, train.micro_batch_size, train.global_batch_size,
                        precision="bf16" if compute_dtype == torch.bfloat16 else "fp32", compile=parallel.compile,
                        peft=method, peft_rank=peft.rank if peft else 16)
        choice = choose_activation_checkpointing(cfg, counts, layout_for(parallel, dims.world_size), work,
                                                 _free_memory(device, dist))
        mode, reason = choice.mode, choice.reason
    except ShoalError as err:  # a model the planner does not model: the safe choice
        mode, reason = "full", f"activation_checkpointing auto -> full: {err}"
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(f"shoal: {reason}", file=sys.stderr)
    return dataclasses.replace(parallel, activation_checkpointing=mode)


def _free_memory(device: torch.device, dist: Any) -> float:
    """Bytes each process may still take: the GPU's free memory, or the host's available RAM; the
    least over all ranks, so that every rank makes the same choice."""
    if device.type == "cuda":
        free = float(torch.cuda.mem_get_info(device)[0])
    else:
        free = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    if dist.is_available() and dist.is_initialized():
        least = torch.tensor([free], dtype=torch.float64, device=device)
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
        free = float(least.item())
    return free


@torch.no_grad()
def store_frozen_in(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Keep the frozen floating-point parameters (a LoRA/DoRA base) in the compute dtype.

    Without FSDP, weights held in fp32 are cast by `torch.autocast` at every use (again in
    recomputation) and take twice the memory; a frozen weight never meets the optimizer, so it
    needs no fp32 master. Trainable parameters stay as they are (fp32 masters). A weight shared by
    several modules (tied embeddings) is converted once and stays shared. Under FSDP its
    `MixedPrecisionPolicy` does the casting instead, so this is for the no-FSDP path only.

    The frozen q/k/v and gate/up weights are then packed, each group into one buffer
    (`pack_frozen_groups`), so that their projections run as one matmul with no copy.
    """
    if dtype is None or dtype == torch.float32:
        return
    converted: dict[int, nn.Parameter] = {}
    for module in model.modules():
        stored: dict[str, torch.dtype] = {}
        for name, param in list(module._parameters.items()):
            if param is None or param.requires_grad or not param.is_floating_point() or param.dtype == dtype:
                continue
            if id(param) not in converted:
                converted[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
            module._parameters[name] = converted[id(param)]
            stored[name] = param.dtype
        if stored:
            module.register_state_dict_post_hook(functools.partial(_state_in_original_dtype, stored=stored))
    # After the conversion, so the hooks above know the original dtypes; packing keeps names, and
    # loading copies into the packed rows.
    pack_frozen_groups(model)


def _state_in_original_dtype(module: nn.Module, state: dict, prefix: str, local_metadata: Any,
                             stored: dict[str, torch.dtype]) -> None:
    # Checkpoints keep the dtype the weights had before `store_frozen_in` (fp32): their format does
    # not depend on the layout, and a bf16 value upcast to fp32 is exact. A load fills these
    # copies, then copies them back into the parameters (shoal.checkpoint.state.load_model_into).
    for name, dtype in stored.items():
        if prefix + name in state:
            state[prefix + name] = state[prefix + name].to(dtype)


def _apply_float8(model: nn.Module, plan: Float8Plan, device: torch.device, compiled: bool) -> None:
    """FP8 compute for the linears worth it, before the layout is applied (torchao's order);
    `compiled` (parallel.compile) lets layers that read one input share its cast."""
    import sys

    import torch.distributed as dist

    from shoal.distributed.float8 import apply_float8, check_float8_device

    check_float8_device(device)
    conversion = apply_float8(model, plan, compiled)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(f"shoal: {conversion.summary(plan)}", file=sys.stderr)


def _defer_gradient_sync(mode: str, parts: list[nn.Module], dims: ParallelDims, device: torch.device) -> bool:
    """Resolve parallel.fsdp_gradient_sync: whether FSDP reduces gradients once per step."""
    if mode != "auto":
        return mode == "last_micro_batch"
    if not any(isinstance(part, FSDPModule) for part in parts):
        return False
    # DTensor numel is global; this rank holds the tensor-parallel slice, unsharded over data parallel.
    trainable = sum(p.numel() for part in parts for p in part.parameters() if p.requires_grad) / dims.tp
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
    else:
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return trainable * 4 <= capacity / 8
