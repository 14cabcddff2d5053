"""What the planner's CPU test runs in each process: shoal's own training engine on a tiny model,
one accumulated step, and the bytes its live parameters, gradients and optimizer state hold."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from shoal.config.recipe import Recipe
from shoal.distributed import build_mesh
from shoal.models import get_preset
from shoal.train.engine import build_engine

SEQ, MICRO_BATCH, MICRO_BATCHES = 32, 2, 2


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def recipe_for(spec: dict) -> Recipe:
    recipe = Recipe()
    recipe.model.preset = "llama_tiny"
    recipe.data.seq_length = SEQ
    recipe.train.micro_batch_size = MICRO_BATCH
    recipe.train.global_batch_size = MICRO_BATCH * MICRO_BATCHES * spec["dp"]
    recipe.parallel.tensor_model_parallel_size = spec["tp"]
    recipe.parallel.fsdp_gradient_sync = "every_micro_batch"
    recipe.peft.method = spec["peft"]
    recipe.peft.rank = 4
    return recipe


def held_bytes(spec: dict) -> dict[str, int]:
    """Bytes this rank holds in parameters (after a step), gradients (after the step's backward, before
    the optimizer frees them) and AdamW state (after the step)."""
    recipe = recipe_for(spec)
    cfg = get_preset("llama_tiny")
    world = spec["tp"] * spec["dp"]
    dims = build_mesh(recipe.parallel, world, "cpu")
    engine = build_engine(recipe, cfg, dims, torch.device("cpu"), torch.float32, MICRO_BATCHES, None)
    gen = torch.Generator().manual_seed(dims.dp_rank)
    mbs = []
    for _ in range(MICRO_BATCHES):
        tokens = torch.randint(0, cfg.vocab_size, (MICRO_BATCH, SEQ), generator=gen)
        mbs.append({"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(MICRO_BATCH, SEQ),
                    "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ)})
    engine.forward_backward(mbs, float(MICRO_BATCH * SEQ * MICRO_BATCHES * spec["dp"]))
    params = {id(p): p for part in engine.parts for p in part.parameters()}.values()
    grads = sum(_local_bytes(p.grad) for p in params if p.grad is not None)
    engine.clip_and_step(1.0, 1e-3)
    optim = sum(_local_bytes(v) for opt in engine.optimizers for state in opt.state.values()
                for k, v in state.items() if k != "step")  # the step counter is one scalar per tensor
    return {"parameters": sum(_local_bytes(p) for p in params), "gradients": grads, "optimizer": optim}
