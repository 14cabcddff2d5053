"""The training loop shared by `shoal pretrain` and `shoal finetune`.

`run_training` reads top to bottom: set up the process and device, build the model (from a
checkpoint or a preset), parallelize it, wrap adapters, build the optimizer, resume if the
experiment has checkpoints, then loop: accumulate a global batch, clip, step, log, validate,
checkpoint. The two entry points differ only in how they build their datasets.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from shoal import __version__
from shoal.checkpoint import format as ckpt_format
from shoal.checkpoint.state import load_model_into, load_optimizer_into, model_state, optimizer_state
from shoal.checkpoint.training import latest_checkpoint, load_trainer_state, save_training_checkpoint, set_rng_state
from shoal.config.loader import to_dict
from shoal.config.recipe import Recipe
from shoal.data.sampler import MicroBatchSampler
from shoal.distributed import ParallelDims, build_mesh, init_distributed, parallelize_model
from shoal.errors import ShoalError
from shoal.models import ModelConfig, build_model, get_preset
from shoal.models.model import Transformer
from shoal.train.metrics import MetricsLogger, peak_flops
from shoal.train.schedule import lr_at
from shoal.train.step import build_optimizer, clip_gradients, forward_backward, model_inputs, masked_cross_entropy_sum, to_device


@dataclass
class Runtime:
    """Where this process runs and how the job is laid out."""

    device: torch.device
    rank: int
    world_size: int
    dims: ParallelDims
    compute_dtype: torch.dtype

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Datasets:
    train: Dataset
    valid: Dataset | None
    max_steps: int
    # Reshuffle each pass (fine-tuning); pretraining samples come already shuffled, as in Megatron.
    shuffle: bool = False
    # Recorded in shoal.json so a checkpoint says what it was trained on.
    description: dict[str, Any] = field(default_factory=dict)


def experiment_dir(recipe: Recipe) -> Path:
    return Path(recipe.checkpoint.results_dir) / recipe.checkpoint.experiment


def setup_runtime(recipe: Recipe) -> Runtime:
    """Start the process group (under torchrun), choose the device and precision, build the mesh."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world_size, local_rank = init_distributed(device_type)
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    precision = recipe.train.precision
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    dims = build_mesh(recipe.parallel, world_size, device_type)
    return Runtime(device, rank, world_size, dims, torch.bfloat16 if precision == "bf16" else torch.float32)


def prepare_run(recipe: Recipe, args, stage: str) -> Runtime | int:
    """Launch if needed (returns the launcher's exit code), else set up this process and save config.yaml."""
    from shoal.config.launch import launch_config_from_args
    from shoal.launch import maybe_launch

    exp = experiment_dir(recipe)
    recipe.launch = launch_config_from_args(args, exp)
    rc = maybe_launch(recipe.launch, argv=sys.argv, experiment_dir=exp)
    if rc is not None:
        return rc
    runtime = setup_runtime(recipe)
    if runtime.is_main:
        import yaml

        exp.mkdir(parents=True, exist_ok=True)
        resolved = {"stage": stage, **to_dict(recipe)}  # secrets are not part of the recipe
        (exp / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
    return runtime


def resolve_start_checkpoint(recipe: Recipe) -> Path | None:
    """The checkpoint whose weights the run starts from (resuming is handled separately)."""
    ckpt = recipe.model.checkpoint
    if ckpt is None:
        return None
    path = Path(ckpt)
    if not (path / "shoal.json").exists():
        # An experiment directory or its checkpoints folder: take the latest checkpoint inside.
        for root in (path / "checkpoints", path):
            found = latest_checkpoint(root)
            if found is not None:
                return found.path
        raise ShoalError(f"--nemo_model {ckpt}: not a shoal checkpoint (no shoal.json) and holds no checkpoints")
    return path


def model_config_for(recipe: Recipe, start: Path | None) -> ModelConfig:
    if start is not None:
        cfg = ckpt_format.read_model_config(start)
        if recipe.model.preset:
            preset = get_preset(recipe.model.preset)
            shape = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")
            if any(getattr(preset, k) != getattr(cfg, k) for k in shape):
                raise ShoalError(
                    f"checkpoint {start} holds a model of another shape than --model {recipe.model.preset} "
                    f"(hidden {cfg.hidden_size}, layers {cfg.num_layers}, heads {cfg.num_heads}, "
                    f"vocab {cfg.vocab_size}); drop --model or pass the matching checkpoint"
                )
        return cfg
    if recipe.model.preset:
        return get_preset(recipe.model.preset)
    raise ShoalError("no model to train: pass --nemo_model CKPT (an imported checkpoint) or --model PRESET")


def build_training_model(recipe: Recipe, cfg: ModelConfig, runtime: Runtime, start: Path | None) -> Transformer:
    """Build on meta, add adapters, parallelize, materialise, then load or initialise the weights."""
    torch.manual_seed(recipe.train.seed)
    with torch.device("meta"):
        model = Transformer(cfg)
    if recipe.peft.method != "none":
        from shoal.peft import apply_lora

        apply_lora(
            model,
            rank=recipe.peft.rank,
            alpha=recipe.peft.alpha,
            dropout=recipe.peft.dropout,
            target_modules=recipe.peft.target_modules,
            use_dora=recipe.peft.method == "dora",
        )
    model = parallelize_model(model, runtime.dims, recipe.parallel, runtime.device.type, runtime.compute_dtype)
    model.to_empty(device=runtime.device)
    with torch.no_grad():
        model.init_weights()  # real values for everything; a checkpoint then overwrites the base weights
    if start is not None:
        load_model_into(model, start)
    if recipe.peft.method != "none":
        from shoal.peft import init_lora_weights

        init_lora_weights(model)  # after loading: DoRA's magnitude starts from the loaded weights
    return model


def micro_batches(loader_iter: Iterator, count: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [to_device(next(loader_iter), device) for _ in range(count)]


@torch.no_grad()
def validate(model, dataset, recipe: Recipe, runtime: Runtime) -> float | None:
    """Mean loss per loss token over `limit_val_batches` global batches of the validation split."""
    if dataset is None or len(dataset) == 0:
        return None
    t = recipe.train
    dp = runtime.dims.dp_size
    per_step = t.micro_batch_size * dp
    batches = len(dataset) // per_step
    if t.limit_val_batches is not None:
        batches = min(batches, t.limit_val_batches * (t.global_batch_size // per_step))
    if batches == 0:
        return None
    sampler = MicroBatchSampler(batches * per_step, t.micro_batch_size, runtime.dims.dp_rank, dp)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    model.eval()
    totals = torch.zeros(2, device=runtime.device, dtype=torch.float64)
    for batch in loader:
        batch = to_device(batch, runtime.device)
        logits = model(batch["tokens"], **model_inputs(batch, recipe.data.document_mask))
        totals[0] += masked_cross_entropy_sum(logits, batch["labels"], batch["loss_mask"]).double()
        totals[1] += batch["loss_mask"].sum().double()
    model.train()
    runtime.dims.all_reduce_over_batch(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def write_static_files(recipe: Recipe, cfg: ModelConfig, tokenizer_dir: Path | None, progress: dict, datasets: Datasets):
    """The rank-0 files of a checkpoint: metadata, tokenizer, adapter config."""

    def write(ckpt_dir: Path) -> None:
        ckpt_format.write_metadata(
            ckpt_dir,
            cfg,
            dtype="float32",
            progress=progress,
            made_by={"shoal": __version__, "command": " ".join(_redacted_argv()), "stage": datasets.description.get("stage")},
        )
        if tokenizer_dir is not None:
            ckpt_format.copy_tokenizer(tokenizer_dir, ckpt_dir)
        if recipe.peft.method != "none":
            (ckpt_dir / "peft.json").write_text(json.dumps(to_dict(recipe.peft), indent=1))

    return write


def _redacted_argv() -> list[str]:
    """sys.argv with secret values replaced, for provenance records."""
    out, hide = [], False
    for arg in sys.argv:
        if hide:
            out.append("***")
            hide = False
            continue
        key = arg.split("=", 1)[0]
        if key in ("--hf_token", "--wandb_token"):
            if "=" in arg:
                out.append(f"{key}=***")
            else:
                out.append(arg)
                hide = True
            continue
        out.append(arg)
    return out


def run_training(
    recipe: Recipe,
    runtime: Runtime,
    build_datasets: Callable[[Recipe, Runtime, Path | None], Datasets],
    wandb_token: str | None = None,
) -> Path | None:
    """Train to `max_steps`, resuming from the experiment's latest checkpoint; returns the last checkpoint."""
    t = recipe.train
    exp = experiment_dir(recipe)
    ckpt_root = exp / "checkpoints"
    resume_from = latest_checkpoint(ckpt_root) if recipe.checkpoint.resume else None
    start = resume_from.path if resume_from else resolve_start_checkpoint(recipe)
    cfg = model_config_for(recipe, start)
    if recipe.data.seq_length > cfg.max_position_embeddings:
        raise ShoalError(
            f"--seq_length {recipe.data.seq_length} exceeds what the model supports "
            f"(max_position_embeddings {cfg.max_position_embeddings})"
        )
    tokenizer_dir = (start / "tokenizer") if start is not None and (start / "tokenizer").is_dir() else None

    datasets = build_datasets(recipe, runtime, tokenizer_dir)
    dp = runtime.dims.dp_size
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ShoalError(
            f"--global_batch_size {t.global_batch_size} is not divisible by --micro_batch_size "
            f"{t.micro_batch_size} × data-parallel size {dp}"
        )
    accum = t.global_batch_size // (t.micro_batch_size * dp)
    max_steps = datasets.max_steps

    model = build_training_model(recipe, cfg, runtime, None if resume_from else start)
    if resume_from is not None:
        load_model_into(model, resume_from.path)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_eps)

    step, consumed, consumed_tokens, best = 0, 0, 0, None
    if resume_from is not None:
        state = load_trainer_state(resume_from.path)
        load_optimizer_into(model, optimizer, resume_from.path)
        step, consumed, consumed_tokens = state["step"], state["consumed_samples"], state["consumed_tokens"]
        rng = state["rng"]
        set_rng_state(rng[runtime.rank] if runtime.rank < len(rng) else rng[0])
        if runtime.is_main:
            print(f"shoal: resuming {exp} from {resume_from.path.name} (step {step})", file=sys.stderr)
    if step >= max_steps:
        if runtime.is_main:
            print(f"shoal: {exp} already reached step {step} of {max_steps}; nothing to do", file=sys.stderr)
        return resume_from.path if resume_from else None

    if runtime.is_main:
        exp.mkdir(parents=True, exist_ok=True)
    wandb_cfg = None
    if recipe.logging.wandb:
        wandb_cfg = {"project": recipe.logging.wandb_project, "name": recipe.logging.wandb_name or recipe.checkpoint.experiment,
                     "token": wandb_token, "config": to_dict(recipe), "run_id": recipe.checkpoint.experiment}
    logger = MetricsLogger(exp, runtime.is_main, recipe.logging.tensorboard, wandb_cfg, max_steps, step)

    # The position in the data is the global sample count, so it survives a change of data-parallel size.
    sampler = MicroBatchSampler(max_steps * t.global_batch_size, t.micro_batch_size, runtime.dims.dp_rank, dp,
                                consumed_samples=consumed, dataset_size=len(datasets.train),
                                seed=recipe.data.seed if datasets.shuffle else None)
    loader = DataLoader(datasets.train, batch_sampler=sampler, num_workers=recipe.data.num_workers,
                        pin_memory=runtime.device.type == "cuda", persistent_workers=recipe.data.num_workers > 0)
    loader_iter = iter(loader)
    params = [p for p in model.parameters() if p.requires_grad]
    flops_per_token = cfg.flops_per_token(recipe.data.seq_length)
    peak = peak_flops(runtime.device)
    grad_scale = float(runtime.dims.dp_size) if runtime.dims.grads_averaged else 1.0
    last_val: float | None = None
    last_ckpt: Path | None = None
    model.train()
    window_start, window_tokens = time.perf_counter(), 0
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    while step < max_steps:
        mbs = micro_batches(loader_iter, accum, runtime.device)
        local_tokens = torch.stack([mb["loss_mask"].sum() for mb in mbs]).sum().double()
        global_tokens = runtime.dims.all_reduce_over_batch(local_tokens.clone()).item()
        lr = lr_at(step, t, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = forward_backward(model, mbs, max(global_tokens, 1.0), grad_scale, recipe.data.document_mask)
        grad_norm = clip_gradients(params, t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        consumed += t.global_batch_size
        consumed_tokens += t.global_batch_size * recipe.data.seq_length
        window_tokens += t.global_batch_size * recipe.data.seq_length

        if step % t.log_interval == 0 or step == max_steps:
            loss = runtime.dims.all_reduce_over_batch(loss_sum.double()).item() / max(global_tokens, 1.0)
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / elapsed / runtime.world_size
            record = {"loss": loss, "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s_per_gpu": tps,
                      "consumed_samples": consumed, "mfu": (tps * flops_per_token / peak) if peak else None}
            if runtime.device.type == "cuda":
                record["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            logger.log(step, record)
            logger.progress(step, record)
            window_start, window_tokens = time.perf_counter(), 0

        is_last = step == max_steps
        val_due = t.val_check_interval and step % t.val_check_interval == 0
        save_due = recipe.checkpoint.save_interval and step % recipe.checkpoint.save_interval == 0
        if val_due or save_due or is_last:
            last_val = validate(model, datasets.valid, recipe, runtime)
            if last_val is not None:
                logger.log(step, {"val_loss": last_val})
                logger.progress(step, {"val_loss": last_val})
        if save_due or is_last:
            progress = {"step": step, "consumed_samples": consumed, "consumed_tokens": consumed_tokens}
            last_ckpt = save_training_checkpoint(
                ckpt_root, step, last_val,
                model_state(model), optimizer_state(model, optimizer),
                {**progress, "max_steps": max_steps, "val_loss": last_val},
                write_static_files(recipe, cfg, tokenizer_dir, progress, datasets),
                recipe.checkpoint.save_top_k,
            )
            if runtime.is_main:
                print(f"shoal: saved {last_ckpt}", file=sys.stderr)
        window_start = time.perf_counter() if (val_due or save_due) else window_start
    logger.close()
    return last_ckpt
