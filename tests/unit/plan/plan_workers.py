"""What the planner's CPU test runs in each process: shoal's own training engine on a tiny model,
one accumulated step, and the bytes its live parameters, gradients and optimizer state hold."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from shoal.config.recipe import Recipe
from shoal.config.resolve import build_recipe
from shoal.distributed import build_mesh
from shoal.models import get_preset
from shoal.train.engine import build_engine

SEQ, MICRO_BATCH, MICRO_BATCHES = 32, 2, 2


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def recipe_for(spec: dict, seq_length: int = SEQ, micro_batch: int = MICRO_BATCH, checkpointing: str = "none") -> Recipe:
    """The recipe through the commands' own resolution (fine-tuning from a preset: no start is looked for)."""
    return build_recipe("finetune", "default", {
        "model.preset": "llama_tiny", "model.checkpoint": "unused", "data.seq_length": seq_length,
        "train.micro_batch_size": micro_batch, "train.global_batch_size": micro_batch * MICRO_BATCHES * spec["dp"],
        "parallel.tensor_model_parallel_size": spec["tp"], "parallel.fsdp_gradient_sync": "every_micro_batch",
        "parallel.activation_checkpointing": checkpointing, "peft.method": spec["peft"], "peft.rank": 4,
        "peft.target_modules": "q_proj,k_proj,v_proj,o_proj", "peft.alpha": 32,
    })


def engine_for(recipe: Recipe, cfg, dims):
    return build_engine(cfg, train=recipe.train, parallel=recipe.parallel, peft=recipe.peft, dims=dims,
                        device=torch.device("cpu"), compute_dtype=torch.float32, micro_batches_per_step=MICRO_BATCHES)


def held_bytes(spec: dict) -> dict[str, int]:
    """Bytes this rank holds in parameters (after a step), gradients (after the step's backward, before
    the optimizer frees them) and AdamW state (after the step)."""
    recipe = recipe_for(spec)
    cfg = get_preset("llama_tiny")
    world = spec["tp"] * spec["dp"]
    dims = build_mesh(recipe.parallel, world, "cpu")
    engine = engine_for(recipe, cfg, dims)
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


# A larger tiny model for whole-step peaks: its state and activations (hundreds of MiB) dwarf the
# allocator's and the interpreter's own noise.
PEAK_SHAPE = {"vocab_size": 8192, "hidden_size": 256, "intermediate_size": 768, "num_heads": 8, "num_kv_heads": 4,
              "head_dim": 32, "num_layers": 4}
PEAK_SEQ, PEAK_MICRO_BATCH = 256, 4


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def step_peak_bytes(spec: dict) -> int:
    """The resident-memory peak of two training steps of shoal's engine, above what the process held
    before building it. glibc is told to serve every allocation above 16 KiB by mmap, so freed
    tensors leave resident memory at once and the kernel's high-water mark (VmHWM, reset through
    /proc/self/clear_refs) is the peak of live tensors."""
    import ctypes
    import dataclasses
    import gc

    ctypes.CDLL("libc.so.6").mallopt(-3, 16384)  # M_MMAP_THRESHOLD
    recipe = recipe_for(spec, PEAK_SEQ, PEAK_MICRO_BATCH, spec["mode"])
    cfg = dataclasses.replace(get_preset("llama_tiny"), **PEAK_SHAPE)
    dims = build_mesh(recipe.parallel, spec["tp"] * spec["dp"], "cpu")
    gen = torch.Generator().manual_seed(dims.dp_rank)
    mbs = []
    for _ in range(MICRO_BATCHES):
        tokens = torch.randint(0, cfg.vocab_size, (PEAK_MICRO_BATCH, PEAK_SEQ), generator=gen)
        mbs.append({"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(PEAK_MICRO_BATCH, PEAK_SEQ),
                    "position_ids": torch.arange(PEAK_SEQ).expand(PEAK_MICRO_BATCH, PEAK_SEQ)})
    tokens = float(PEAK_MICRO_BATCH * PEAK_SEQ * MICRO_BATCHES * spec["dp"])

    def steps(recipe, cfg, mbs, tokens, count: int) -> None:
        engine = engine_for(recipe, cfg, dims)
        for _ in range(count):  # the second step is the steady state: AdamW's moments exist from the first
            engine.forward_backward(mbs, tokens)
            engine.clip_and_step(1.0, 1e-3)

    # First a step of the small model: kernels, thread pools and communication buffers are set up for good.
    small_cfg = get_preset("llama_tiny")
    small_mbs = [{k: v[:, :SEQ] % small_cfg.vocab_size if k in ("tokens", "labels") else v[:, :SEQ]
                  for k, v in mb.items()} for mb in mbs]
    steps(recipe_for(spec), small_cfg, small_mbs, tokens, 1)
    gc.collect()
    base = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    steps(recipe, cfg, mbs, tokens, 2)
    return _rss("VmHWM") - base
