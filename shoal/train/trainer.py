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
from shoal.checkpoint.training import latest_checkpoint, load_trainer_state, save_training_checkpoint, set_rng_state
from shoal.config.loader import to_dict
from shoal.config.recipe import Recipe
from shoal.data.sampler import MicroBatchSampler
from shoal.distributed import ParallelDims, build_mesh, check_parallel_layout, destroy_distributed, init_distributed
from shoal.errors import ShoalError
from shoal.models import ModelConfig, build_model, get_preset
from shoal.train.metrics import MetricsLogger, mfu_fields
from shoal.train.schedule import lr_at
from shoal.train.engine import Engine, build_engine
from shoal.train.step import to_device


@dataclass
class Runtime:
    """Where this process runs and how the job is laid out."""

    device: torch.device
    rank: int
    world_size: int
    dims: ParallelDims
    compute_dtype: torch.dtype
    argv: list[str] = field(default_factory=list)  # the command as typed, for provenance
    stage: str = "pretrain"

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
    else:
        # Adam's second moments of tiny gradients fall into denormal floats, which x86 CPUs handle
        # in microcode: a 1M-parameter model's step ran 6x slower. Flushing them to zero changes
        # nothing measurable (they are below 1e-38).
        torch.set_flush_denormal(True)
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
    # Inside a rank the node count comes from torchrun's environment, not from the (removed) flag.
    recipe.parallel.num_nodes, recipe.parallel.num_gpus = recipe.launch.num_nodes, recipe.launch.num_gpus
    for path in recipe.data.dataset_path:  # fail before any process starts, not inside every rank
        if not _is_number(path) and not Path(path).exists() and not Path(path + ".idx").exists():
            raise ShoalError(f"--dataset_path {path} does not exist")
    rc = maybe_launch(recipe.launch, argv=args.argv, experiment_dir=exp)
    if rc is not None:
        return rc
    runtime = setup_runtime(recipe)
    runtime.argv = list(args.argv)
    runtime.stage = stage
    return runtime


def finish_distributed() -> None:
    """Leave the process group together: a rank tearing gloo/NCCL down while a peer still talks to
    it can abort the peer."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    destroy_distributed()


def save_resolved_config(recipe: Recipe, exp: Path, stage: str) -> None:
    """config.yaml: the recipe as this run resolved it (secrets are not part of the recipe)."""
    import yaml

    exp.mkdir(parents=True, exist_ok=True)
    resolved = {"stage": stage, **to_dict(recipe)}
    (exp / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


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


_SHAPE = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")


def model_config_for(recipe: Recipe, start: Path | None) -> ModelConfig:
    if start is not None:
        cfg = ckpt_format.read_model_config(start)
        if recipe.model.preset:
            preset = get_preset(recipe.model.preset)
            if any(getattr(preset, k) != getattr(cfg, k) for k in _SHAPE):
                raise ShoalError(
                    f"checkpoint {start} holds a model of another shape than --model {recipe.model.preset} "
                    f"(hidden {cfg.hidden_size}, layers {cfg.num_layers}, heads {cfg.num_heads}, "
                    f"vocab {cfg.vocab_size}); drop --model or pass the matching checkpoint"
                )
        return cfg
    if recipe.model.preset:
        return get_preset(recipe.model.preset)
    raise ShoalError("no model to train: pass --nemo_model CKPT (an imported checkpoint) or --model PRESET")


def micro_batches(loader_iter: Iterator, count: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [to_device(next(loader_iter), device) for _ in range(count)]


def data_generator(recipe: Recipe) -> torch.Generator:
    """A DataLoader's own generator: creating an iterator draws a seed from it, and drawing from the
    global RNG instead would shift the dropout stream a resumed run restores from its checkpoint."""
    return torch.Generator().manual_seed(recipe.data.seed)


@torch.no_grad()
def validate(engine: Engine, dataset, recipe: Recipe, runtime: Runtime) -> float | None:
    """Mean loss per loss token over `limit_val_batches` global batches of the validation split."""
    if dataset is None or len(dataset) == 0:
        return None
    t = recipe.train
    dp = runtime.dims.dp_size
    accum = t.global_batch_size // (t.micro_batch_size * dp)
    steps = len(dataset) // t.global_batch_size
    if t.limit_val_batches is not None:
        steps = min(steps, t.limit_val_batches)
    if steps == 0:
        return None
    sampler = MicroBatchSampler(steps * t.global_batch_size, t.micro_batch_size, runtime.dims.dp_rank, dp)
    batches = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=0, generator=data_generator(recipe)))
    engine.train(False)
    totals = torch.zeros(2, device=runtime.device, dtype=torch.float64)
    for _ in range(steps):
        mbs = micro_batches(batches, accum, runtime.device)
        totals[0] += engine.loss_sum(mbs).double()
        totals[1] += sum(mb["loss_mask"].sum().double() for mb in mbs) / runtime.dims.cp
    engine.train(True)
    runtime.dims.all_reduce_over_batch(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def write_static_files(recipe: Recipe, cfg: ModelConfig, tokenizer_dir: Path | None, progress: dict, datasets: Datasets,
                       argv: list[str]):
    """The rank-0 files of a checkpoint: metadata, tokenizer, adapter config."""

    def write(ckpt_dir: Path) -> None:
        ckpt_format.write_metadata(
            ckpt_dir,
            cfg,
            dtype="float32",
            progress=progress,
            made_by={"shoal": __version__, "command": " ".join(_redacted_argv(argv)), "stage": datasets.description.get("stage")},
        )
        if tokenizer_dir is not None:
            ckpt_format.copy_tokenizer(tokenizer_dir, ckpt_dir)
        if recipe.peft.method != "none":
            from shoal.peft import LoraConfig

            p = recipe.peft
            lora = LoraConfig(rank=p.rank, alpha=p.alpha, dropout=p.dropout, target_modules=p.target_modules,
                              use_dora=p.method == "dora")
            (ckpt_dir / "peft.json").write_text(json.dumps(lora.to_dict(), indent=1))

    return write


def _redacted_argv(argv: list[str]) -> list[str]:
    """The command line with secret values replaced, for provenance records."""
    out, hide = [], False
    for arg in argv:
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
    if resume_from is not None and recipe.model.checkpoint is not None:
        # Resuming ignores --nemo_model; one of another shape means the user meant another run.
        given = ckpt_format.read_model_config(resolve_start_checkpoint(recipe))
        if any(getattr(given, k) != getattr(cfg, k) for k in _SHAPE):
            raise ShoalError(
                f"experiment {exp} has checkpoints of another model than --nemo_model {recipe.model.checkpoint} "
                f"(hidden {cfg.hidden_size} vs {given.hidden_size}, layers {cfg.num_layers} vs {given.num_layers}, "
                f"vocab {cfg.vocab_size} vs {given.vocab_size}); use a new --experiment to start from it"
            )
    if recipe.data.seq_length > cfg.max_position_embeddings:
        raise ShoalError(
            f"--seq_length {recipe.data.seq_length} exceeds what the model supports "
            f"(max_position_embeddings {cfg.max_position_embeddings})"
        )
    tokenizer_dir = (start / "tokenizer") if start is not None and (start / "tokenizer").is_dir() else None

    # The layout is checked before data or model are built: a refusal costs nothing.
    check_parallel_layout(recipe.parallel, runtime.world_size, cfg, seq_length=recipe.data.seq_length,
                          global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size)
    datasets = build_datasets(recipe, runtime, tokenizer_dir)
    dp = runtime.dims.dp_size
    accum = t.global_batch_size // (t.micro_batch_size * dp)
    max_steps = datasets.max_steps

    engine = build_engine(recipe, cfg, runtime.dims, runtime.device, runtime.compute_dtype, accum,
                          None if resume_from else start)
    step, consumed, consumed_tokens = 0, 0, 0
    if resume_from is not None:
        state = load_trainer_state(resume_from.path)
        engine.load_model(resume_from.path)
        if (resume_from.path / "optim").is_dir():
            engine.load_optimizer(resume_from.path)
        elif runtime.is_main:
            print(f"shoal: warning: {resume_from.path} holds no optimizer state (checkpoint.save_optimizer=false); "
                  "AdamW's moments restart from zero", file=sys.stderr)
        step, consumed, consumed_tokens = state["step"], state["consumed_samples"], state["consumed_tokens"]
        rng = state["rng"]
        set_rng_state(rng[runtime.rank] if runtime.rank < len(rng) else rng[0])
        if runtime.is_main:
            print(f"shoal: resuming {exp} from {resume_from.path.name} (step {step})", file=sys.stderr)
    if step >= max_steps:
        if runtime.is_main:
            print(f"shoal: {exp} already reached step {step} of {max_steps}; nothing to do", file=sys.stderr)
        return resume_from.path if resume_from else None

    if runtime.is_main:  # only once every check has passed, so a refused run changes nothing
        save_resolved_config(recipe, exp, runtime.stage)
    wandb_cfg = None
    if recipe.logging.wandb:
        # wandb saves this process's command line in its run files: secrets typed as flags must not get there.
        sys.argv[:] = _redacted_argv(sys.argv)
        wandb_cfg = {"project": recipe.logging.wandb_project, "name": recipe.logging.wandb_name or recipe.checkpoint.experiment,
                     "token": wandb_token, "config": to_dict(recipe), "run_id": recipe.checkpoint.experiment}
    logger = MetricsLogger(exp, runtime.is_main, recipe.logging.tensorboard, wandb_cfg, max_steps, step)

    # The position in the data is the global sample count, so it survives a change of data-parallel size.
    sampler = MicroBatchSampler(max_steps * t.global_batch_size, t.micro_batch_size, runtime.dims.dp_rank, dp,
                                consumed_samples=consumed, dataset_size=len(datasets.train),
                                seed=recipe.data.seed if datasets.shuffle else None)
    loader = DataLoader(datasets.train, batch_sampler=sampler, num_workers=recipe.data.num_workers,
                        generator=data_generator(recipe),
                        pin_memory=runtime.device.type == "cuda", persistent_workers=recipe.data.num_workers > 0)
    loader_iter = iter(loader)
    flops_per_token = cfg.flops_per_token(recipe.data.seq_length)
    last_val: float | None = None
    last_ckpt: Path | None = None
    engine.train(True)
    window_start, window_tokens = time.perf_counter(), 0
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    while step < max_steps:
        mbs = micro_batches(loader_iter, accum, runtime.device)
        # Context-parallel ranks hold the same batch: count its tokens once.
        local_tokens = torch.stack([mb["loss_mask"].sum() for mb in mbs]).sum().double() / runtime.dims.cp
        global_tokens = runtime.dims.all_reduce_over_batch(local_tokens.clone()).item()
        lr = lr_at(step, t, max_steps)
        loss_sum = engine.forward_backward(mbs, max(global_tokens, 1.0))
        grad_norm = engine.clip_and_step(t.grad_clip, lr)
        step += 1
        consumed += t.global_batch_size
        consumed_tokens += t.global_batch_size * recipe.data.seq_length
        window_tokens += t.global_batch_size * recipe.data.seq_length

        if step % t.log_interval == 0 or step == max_steps:
            loss = runtime.dims.all_reduce_over_batch(loss_sum.double()).item() / max(global_tokens, 1.0)
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / elapsed / runtime.world_size
            record = {"loss": loss, "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s_per_gpu": tps,
                      "consumed_samples": consumed,
                      **mfu_fields(tps, flops_per_token, runtime.device, fp8=engine.float8 is not None)}
            if runtime.device.type == "cuda":
                record["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            logger.log(step, record)
            logger.progress(step, record)
            window_start, window_tokens = time.perf_counter(), 0

        is_last = step == max_steps
        val_due = t.val_check_interval and step % t.val_check_interval == 0
        save_due = recipe.checkpoint.save_interval and step % recipe.checkpoint.save_interval == 0
        if val_due or save_due or is_last:
            last_val = validate(engine, datasets.valid, recipe, runtime)
            if last_val is not None:
                logger.log(step, {"val_loss": last_val})
                logger.progress(step, {"val_loss": last_val})
        if save_due or is_last:
            progress = {"step": step, "consumed_samples": consumed, "consumed_tokens": consumed_tokens}
            last_ckpt = save_training_checkpoint(
                ckpt_root, step, last_val,
                engine.model_state(), engine.optimizer_state() if recipe.checkpoint.save_optimizer else None,
                {**progress, "max_steps": max_steps, "val_loss": last_val},
                write_static_files(recipe, cfg, tokenizer_dir, progress, datasets, runtime.argv),
                recipe.checkpoint.save_top_k,
            )
            if runtime.is_main:
                print(f"shoal: saved {last_ckpt}", file=sys.stderr)
        window_start = time.perf_counter() if (val_due or save_due) else window_start
    logger.close()
    return last_ckpt
