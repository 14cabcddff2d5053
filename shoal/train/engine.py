"""The model as training sees it: one part, or this rank's pipeline stages, behind one interface.

`build_engine` builds the model on the meta device, swaps in LoRA/DoRA adapters, applies the
parallel layout from outside (`shoal.distributed`), materialises it, and loads or initialises the
weights. `Engine.forward_backward` and `Engine.loss_sum` then hide whether a pipeline schedule
runs underneath. Checkpoint state is the union of every part's canonical (HF-named) state, with
the optimizer state flattened per parameter name, so it reshards across any layout.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from shoal.checkpoint.format import SafeFileSystemReader
from shoal.checkpoint.state import load_model_into, model_state
from shoal.config.recipe import Recipe
from shoal.distributed import ParallelDims, parallelize_model
from shoal.distributed.grad_norm import clip_grad_norm_
from shoal.distributed.float8 import Float8Plan, float8_plan, precompute_float8_scales
from shoal.distributed.parallelize import autocast_context
from shoal.errors import ShoalError
from shoal.models import ModelConfig
from shoal.models.model import Transformer
from shoal.train.step import build_optimizer, masked_cross_entropy_sum, model_inputs

# Optimizer state keyed by parameter name, not by position: loads into any layout.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


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

    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts for p in part.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    def _pipeline_run(self, mbs: list[dict[str, torch.Tensor]], global_tokens: float, backward: bool) -> torch.Tensor:
        from shoal.distributed.pipeline import pipeline_step

        cat = {k: torch.cat([mb[k] for mb in mbs]) for k in mbs[0]}
        return pipeline_step(
            self.pipeline, cat["tokens"], cat["labels"], cat["loss_mask"], global_tokens,
            position_ids=cat["position_ids"], document_ids=cat["document_ids"] if self.document_mask else None,
            backward=backward,
        )

    def forward_backward(self, mbs: list[dict[str, torch.Tensor]], global_tokens: float) -> torch.Tensor:
        """Accumulate the gradient of Σ CE·mask / global_tokens; returns this rank's Σ CE·mask."""
        if self.pipeline is not None:
            return self._pipeline_run(mbs, global_tokens, backward=True)
        total = torch.zeros((), device=mbs[0]["tokens"].device)
        for i, mb in enumerate(mbs):
            if self.defer_gradient_sync:
                self._gradient_sync(i == len(mbs) - 1)
            with self._sequence_shard(mb) as (tokens, labels, loss_mask, inputs):
                with self.autocast():
                    logits = self.parts[0](tokens, **inputs)
                loss_sum = self.loss_fn(logits, labels, loss_mask)
                # Gradients are summed (not averaged) across data-parallel ranks, see docs/parallelism.md.
                (loss_sum / global_tokens).backward()
            total += loss_sum.detach()
        return total

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
        if self.pipeline is not None:
            return self._pipeline_run(mbs, 1.0, backward=False)
        total = torch.zeros((), device=mbs[0]["tokens"].device)
        for mb in mbs:
            with self._sequence_shard(mb) as (tokens, labels, loss_mask, inputs):
                with self.autocast():
                    logits = self.parts[0](tokens, **inputs)
                total += self.loss_fn(logits, labels, loss_mask)
        return total

    def clip_and_step(self, max_norm: float, lr: float) -> torch.Tensor:
        norm = clip_grad_norm_(self.parameters(), max_norm, self.dims)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        precompute_float8_scales(self.parts, self.float8)  # FP8 all-gather: scales of the new weights
        return norm

    # -- checkpoint state ------------------------------------------------------------------------
    def model_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for part in self.parts:
            state.update(model_state(part))
        return state

    def optimizer_state(self) -> dict[str, Any]:
        """Only the tensors (moments, step counts): DCP would pickle anything else, and a pickle
        must never be loaded from a checkpoint. Hyperparameters come from the recipe on resume."""
        state: dict[str, Any] = {}
        for part, optimizer in zip(self.parts, self.optimizers):
            flat = get_optimizer_state_dict(part, optimizer, options=_OPTIM_OPTIONS)
            state.update({k: v for k, v in flat.items() if isinstance(v, torch.Tensor)})
        return state

    def load_model(self, ckpt: Path) -> None:
        for part in self.parts:
            load_model_into(part, ckpt)

    def load_optimizer(self, ckpt: Path) -> None:
        import torch.distributed.checkpoint as dcp

        states = [get_optimizer_state_dict(p, o, options=_OPTIM_OPTIONS) for p, o in zip(self.parts, self.optimizers)]
        tensors = {k: v for s in states for k, v in s.items() if isinstance(v, torch.Tensor)}
        import warnings

        import torch.distributed as dist

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(tensors, storage_reader=SafeFileSystemReader(str(ckpt / "optim")),
                     no_dist=not (dist.is_available() and dist.is_initialized()))
        for part, optimizer, state in zip(self.parts, self.optimizers, states):
            state.update({k: tensors[k] for k in state if k in tensors})
            set_optimizer_state_dict(part, optimizer, state, options=_OPTIM_OPTIONS)


def build_engine(
    recipe: Recipe,
    cfg: ModelConfig,
    dims: ParallelDims,
    device: torch.device,
    compute_dtype: torch.dtype,
    micro_batches_per_step: int,
    start: Path | None,
) -> Engine:
    """Build on meta, add adapters, apply the layout, materialise, then load or initialise weights."""
    torch.manual_seed(recipe.train.seed)  # the same initial weights whatever the layout
    with torch.device("meta"):
        model = Transformer(cfg)
    peft = recipe.peft.method != "none"
    if peft:
        from shoal.peft import apply_lora

        apply_lora(model, rank=recipe.peft.rank, alpha=recipe.peft.alpha, dropout=recipe.peft.dropout,
                   target_modules=recipe.peft.target_modules, use_dora=recipe.peft.method == "dora")
    float8 = float8_plan(recipe.train.fp8, recipe.train.fp8_recipe, dims.dp_shard * dims.cp if dims.dp_enabled else 1)
    if float8 is not None:
        _apply_float8(model, float8, device)
    pipeline = None
    if dims.pp_enabled and dims.cp_enabled:
        raise ShoalError("pipeline and context parallelism together are not supported yet; use one of them")
    if dims.pp_enabled:
        from shoal.distributed.pipeline import pipeline_model

        pipeline, parts, _, _ = pipeline_model(
            model, dims, recipe.parallel, masked_cross_entropy_sum, recipe.train.micro_batch_size,
            micro_batches_per_step, device.type, compute_dtype,
        )
    else:
        parts = [parallelize_model(model, dims, recipe.parallel, device.type, compute_dtype)]
    for part in parts:
        part.to_empty(device=device)
        with torch.no_grad():
            part.init_weights()
        if start is not None:
            load_model_into(part, start)
        if peft:
            from shoal.peft import init_lora_weights

            # After the load (DoRA's magnitude starts from the loaded weights); seeded per layer name,
            # so the adapters start the same in every layout.
            init_lora_weights(part, seed=recipe.train.seed)
    t = recipe.train
    optimizers = [build_optimizer(p, t.lr, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_eps) for p in parts]
    autocast = lambda: autocast_context(dims, recipe.parallel, device.type, compute_dtype)  # noqa: E731
    loss_fn = torch.compile(masked_cross_entropy_sum) if recipe.parallel.compile else masked_cross_entropy_sum
    defer = pipeline is None and micro_batches_per_step > 1 and _defer_gradient_sync(
        recipe.parallel.fsdp_gradient_sync, parts, dims, device)
    return Engine(parts, optimizers, dims, recipe.data.document_mask, autocast, pipeline, loss_fn, defer, float8)


def _apply_float8(model: nn.Module, plan: Float8Plan, device: torch.device) -> None:
    """FP8 compute for the linears worth it, before the layout is applied (torchao's order)."""
    import sys

    import torch.distributed as dist

    from shoal.distributed.float8 import apply_float8, check_float8_device

    check_float8_device(device)
    conversion = apply_float8(model, plan)
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
