"""The training run shared by `shoal pretrain` and `shoal finetune`, in named steps.

`train` reads top to bottom: find where the run starts (resume or given weights), check the
layout, build the data, build the engine, restore progress, record the recipe, then `_loop`:
accumulate a global batch, clip, step, log, validate, checkpoint. The two stages differ only in
how they build their datasets.

A step that does not log never reads a value back from the device, so the host queues the next
step's work while the GPU still runs this one: the loss-token count comes from the host batch
(`StepBatch`), the document spans too, and loss and gradient norm are read on logging steps only.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from shoal import __version__
from shoal.checkpoint.lock import hold_experiment
from shoal.checkpoint.runs import begin_segment
from shoal.checkpoint.training import (
    CheckpointRecord,
    Progress,
    TrainingCheckpoints,
    background_saves,
    restore_training_checkpoint,
)
from shoal.config.loader import to_dict
from shoal.config.recipe import DataSection, Recipe, TrainSection
from shoal.config.resolve import experiment_dir
from shoal.config.secrets import redact_argv, secret
from shoal.data.sampler import MicroBatchSampler
from shoal.distributed import ParallelDims, check_parallel_layout
from shoal.models.moe import expert_load
from shoal.train.engine import Engine, build_engine
from shoal.train.expectations import compare, planned, write_run_report
from shoal.train.metrics import MetricsLogger, mfu_fields
from shoal.train.run_plan import RunPlan, plan_run
from shoal.train.runtime import Runtime
from shoal.train.schedule import lr_at
from shoal.train.start import StartPoint, check_segment, check_start, find_start
from shoal.train.step import host_loss_tokens, to_device


@dataclass
class Datasets:
    train: Dataset
    valid: Dataset | None
    max_steps: int
    # Reshuffle each pass (fine-tuning); pretraining samples come already shuffled, as in Megatron.
    shuffle: bool = False
    # What the data holds, for --dryrun: {"documents": 120, "tokens": ..., ...}.
    summary: dict[str, Any] = field(default_factory=dict)


# Builds a stage's datasets given the tokenizer folder of the start checkpoint (None without one).
DatasetBuilder = Callable[[Path | None], Datasets]


def train(recipe: Recipe, runtime: Runtime, build_datasets: DatasetBuilder, argv: list[str] | None = None) -> Path | None:
    """Train to the run's last step, resuming the experiment when it has checkpoints; returns the
    last checkpoint. The run holds the experiment's lock throughout (a second run is refused)."""
    with hold_experiment(experiment_dir(recipe)) as run_id:
        return _train(recipe, runtime, build_datasets, argv, run_id)


def _train(recipe: Recipe, runtime: Runtime, build_datasets: DatasetBuilder, argv: list[str] | None,
           run_id: str) -> Path | None:
    t = recipe.train
    exp = experiment_dir(recipe)
    start = find_start(recipe.model, recipe.checkpoint, exp)
    check_start(start, recipe.data.seq_length)
    segment = check_segment(recipe, start, exp, runtime.world_size, _layout(runtime), verbose=runtime.is_main)
    # The layout is checked before data or model are built: a refusal costs nothing.
    check_parallel_layout(recipe.parallel, runtime.world_size, start.model_config, seq_length=recipe.data.seq_length,
                          global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size)
    datasets = build_datasets(start.tokenizer_dir)
    accum = t.global_batch_size // (t.micro_batch_size * runtime.dims.dp_size)
    engine = build_engine(
        start.model_config, train=t, parallel=recipe.parallel, peft=recipe.peft, dims=runtime.dims,
        device=runtime.device, compute_dtype=runtime.compute_dtype, micro_batches_per_step=accum,
        document_mask=recipe.data.document_mask, start=start.weights, seq_length=recipe.data.seq_length,
    )
    progress = Progress()
    if start.resume is not None:
        progress = restore_training_checkpoint(start.resume.path, engine.parts, engine.optimizers,
                                               base=start.base_path)
        if runtime.is_main:
            print(f"shoal: resuming {exp} from {start.resume.path.name} (step {progress.step})", file=sys.stderr)
    if progress.step >= datasets.max_steps:
        if runtime.is_main:
            print(f"shoal: {exp} already reached step {progress.step} of {datasets.max_steps}; nothing to do",
                  file=sys.stderr)
        return start.resume.path if start.resume else None
    plan = plan_run(t, recipe.stage, datasets.max_steps, recipe.data.seq_length, runtime.dims.dp_size,
                    len(datasets.train))
    if runtime.is_main:  # only once every check has passed, so a refused run changes nothing
        begin_segment(recipe, exp, segment, progress.step, to_dict(recipe))
        save_resolved_config(recipe, exp)
        _announce(recipe, start, datasets, plan, runtime)
    record = dataclasses.replace(_checkpoint_record(recipe, start, datasets, argv or []), run_id=run_id)
    estimate = planned(recipe, runtime.device) if runtime.is_main else None
    logger = _metrics_logger(recipe, exp, runtime, datasets.max_steps, progress.step)
    checkpoints = TrainingCheckpoints(exp / "checkpoints", record, max_steps=datasets.max_steps,
                                      save_top_k=recipe.checkpoint.save_top_k,
                                      background=background_saves(recipe.checkpoint.async_save, runtime.device))
    try:
        with checkpoints:  # a background save is finished when the loop ends, dropped on Ctrl-C
            last = _loop(engine, datasets, recipe, runtime, progress, record, logger, plan, checkpoints, estimate)
    finally:
        logger.close()
    if runtime.is_main and recipe.logging.report:
        write_run_report(exp)
    return last


def _announce(recipe: Recipe, start: StartPoint, datasets: Datasets, plan: RunPlan, runtime: Runtime) -> None:
    """Say what the run starts from and what it will do, before the first (possibly long) step."""
    if start.resume is not None:
        origin = f"resuming {start.resume.path} (step {start.resume.step})"
    elif start.weights is not None:
        origin = f"weights of {start.weights}"
    else:
        origin = f"random weights of preset {recipe.model.preset}"
    print(f"shoal: {recipe.stage} from {origin}", file=sys.stderr)
    print(f"shoal: plan: {plan.summary()}", file=sys.stderr)
    base = _adapter_checkpoint_base(recipe, start)
    if base is not None:
        print(f"shoal: note: checkpoints hold the adapters only and apply to the base checkpoint {base['resolved']}: "
              "keep it where it is (or --checkpoint.adapter_only=false for whole-model checkpoints)", file=sys.stderr)
    for note in (*start.notes, *plan.notes):
        print(f"shoal: note: {note}", file=sys.stderr)
    valid = datasets.valid
    if valid is not None and len(valid):
        used = validation_samples(len(valid), recipe.train, runtime.dims.dp_size, runtime.dims.pp_enabled)
        if used == 0:
            print(f"shoal: warning: the validation split holds {len(valid)} sequences, too few for one round of "
                  f"micro-batches over the data-parallel ranks; training without validation", file=sys.stderr)
        elif used < recipe.train.global_batch_size:
            print(f"shoal: note: the validation split holds {len(valid)} sequences, fewer than one global batch "
                  f"({recipe.train.global_batch_size}); validating on {used} of them", file=sys.stderr)
    elif valid is None:
        print("shoal: warning: no validation data; checkpoints are ranked by recency", file=sys.stderr)


def _layout(runtime: Runtime) -> dict[str, int]:
    d = runtime.dims
    return {"pp": d.pp, "dp_replicate": d.dp_replicate, "dp_shard": d.dp_shard, "cp": d.cp, "tp": d.tp}


def save_resolved_config(recipe: Recipe, exp: Path) -> None:
    """config.yaml: the recipe as this run resolved it (secrets are not part of the recipe)."""
    import yaml

    exp.mkdir(parents=True, exist_ok=True)
    (exp / "config.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True))


def _checkpoint_record(recipe: Recipe, start: StartPoint, datasets: Datasets, argv: list[str]) -> CheckpointRecord:
    made_by = {"shoal": __version__, "command": " ".join(redact_argv(argv)), "stage": recipe.stage,
               "source": str(start.checkpoint) if start.checkpoint else None,
               "hf_model_id": recipe.model.hf_model_id}
    return CheckpointRecord(start.model_config, start.tokenizer, recipe.peft, made_by, start.extra,
                            base=_adapter_checkpoint_base(recipe, start))


def _adapter_checkpoint_base(recipe: Recipe, start: StartPoint) -> dict[str, Any] | None:
    """The base a LoRA/DoRA run's checkpoints name, holding only what trains; None: whole checkpoints."""
    return start.base if recipe.peft is not None and recipe.checkpoint.adapter_only else None


def _metrics_logger(recipe: Recipe, exp: Path, runtime: Runtime, max_steps: int, step: int) -> MetricsLogger:
    wandb_cfg = None
    if recipe.logging.wandb:
        # wandb saves this process's command line in its run files: secrets typed as flags must not get there.
        sys.argv[:] = redact_argv(sys.argv)
        wandb_cfg = {"project": recipe.logging.wandb_project,
                     "name": recipe.logging.wandb_name or recipe.checkpoint.experiment,
                     "token": secret(None, "WANDB_API_KEY"), "config": to_dict(recipe),
                     "run_id": recipe.checkpoint.experiment}
    return MetricsLogger(exp, runtime.is_main, recipe.logging.tensorboard, wandb_cfg, max_steps, step)


@dataclass
class StepBatch:
    """A step's micro-batches on the device, with their loss tokens counted on the host before the copy."""

    micro_batches: list[dict[str, torch.Tensor]]
    loss_tokens: float  # Σ loss_mask over the whole micro-batches (each context-parallel rank counts the same)


def micro_batches(loader_iter: Iterator, count: int, device: torch.device,
                  prepare: Callable[[dict], dict] | None = None) -> StepBatch:
    """The next `count` micro-batches: counted and made ready (`prepare`, e.g. Engine.prepare_on_host)
    on the host, then copied to `device` without waiting."""
    host = [next(loader_iter) for _ in range(count)]
    loss_tokens = sum(host_loss_tokens(batch) for batch in host)
    if prepare is not None:
        host = [prepare(batch) for batch in host]
    return StepBatch([to_device(batch, device) for batch in host], loss_tokens)


def global_loss_tokens(local_tokens: float, dims: ParallelDims, device: torch.device) -> float | torch.Tensor:
    """The loss tokens of the whole global batch (at least 1): the loss's divisor. With one rank
    holding the batch it is the host's count; otherwise the sum over ranks, left on the device as a
    0-d float64 tensor (the all-reduce is queued on the stream; nothing waits for it)."""
    local = local_tokens / dims.cp  # context-parallel ranks hold the same batch: count its tokens once
    if dims.loss_mesh is None:
        return max(local, 1.0)
    count = torch.tensor(local, dtype=torch.float64)
    count = to_device({"count": count}, device)["count"]
    return dims.all_reduce_over_batch(count).clamp_(min=1.0)


def data_generator(data: DataSection) -> torch.Generator:
    """A DataLoader's own generator: creating an iterator draws a seed from it, and drawing from the
    global RNG instead would shift the dropout stream a resumed run restores from its checkpoint."""
    return torch.Generator().manual_seed(data.seed)


def validation_samples(dataset_size: int, train: TrainSection, dp_size: int, pipeline: bool) -> int:
    """How many validation sequences one validation reads: whole global batches (at most
    `limit_val_batches`); a split smaller than one global batch is read in whole micro-batches of
    every data-parallel rank (a pipeline schedule needs whole global batches: then none)."""
    if dataset_size >= train.global_batch_size:
        batches = dataset_size // train.global_batch_size
        if train.limit_val_batches is not None:
            batches = min(batches, train.limit_val_batches)
        return batches * train.global_batch_size
    if pipeline:
        return 0
    per_round = train.micro_batch_size * dp_size
    return dataset_size // per_round * per_round


@torch.no_grad()
def validate(engine: Engine, dataset, train: TrainSection, data: DataSection, runtime: Runtime) -> float | None:
    """Mean loss per loss token over the validation sequences `validation_samples` picks."""
    if dataset is None or len(dataset) == 0:
        return None
    dp = runtime.dims.dp_size
    accum = train.global_batch_size // (train.micro_batch_size * dp)
    samples = validation_samples(len(dataset), train, dp, engine.pipeline is not None)
    if samples == 0:
        return None
    sampler = MicroBatchSampler(samples, train.micro_batch_size, runtime.dims.dp_rank, dp)
    batches = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=0, generator=data_generator(data)))
    engine.train(False)
    totals = torch.zeros(2, device=runtime.device, dtype=torch.float64)
    remaining = len(sampler)
    while remaining:
        batch = micro_batches(batches, min(accum, remaining), runtime.device, engine.prepare_on_host)
        remaining -= len(batch.micro_batches)
        totals[0] += engine.loss_sum(batch.micro_batches).double()
        totals[1] += batch.loss_tokens / runtime.dims.cp
    engine.train(True)
    runtime.dims.all_reduce_over_batch(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def _loop(
    engine: Engine,
    datasets: Datasets,
    recipe: Recipe,
    runtime: Runtime,
    progress: Progress,
    record: CheckpointRecord,
    logger: MetricsLogger,
    plan: RunPlan,
    checkpoints: TrainingCheckpoints,
    estimate=None,
) -> Path | None:
    t, data, dims = recipe.train, recipe.data, runtime.dims
    max_steps = datasets.max_steps
    accum = t.global_batch_size // (t.micro_batch_size * dims.dp_size)
    # The position in the data is the global sample count, so it survives a change of data-parallel size.
    sampler = MicroBatchSampler(max_steps * t.global_batch_size, t.micro_batch_size, dims.dp_rank, dims.dp_size,
                                consumed_samples=progress.consumed_samples, dataset_size=len(datasets.train),
                                seed=data.seed if datasets.shuffle else None)
    loader = DataLoader(datasets.train, batch_sampler=sampler, num_workers=data.num_workers,
                        generator=data_generator(data),
                        pin_memory=runtime.device.type == "cuda", persistent_workers=data.num_workers > 0)
    loader_iter = iter(loader)
    # What the method really computes: a frozen base (LoRA/DoRA) has no weight-gradient matmuls.
    frozen = record.model_config.num_active_params if recipe.peft is not None else 0
    step, consumed, consumed_tokens = progress.step, progress.consumed_samples, progress.consumed_tokens
    last_val: float | None = None
    engine.train(True)
    window_start, window_tokens = time.perf_counter(), 0
    # This rank's tokens and loss tokens since the last log: the output layer is needed for the
    # loss tokens only, which is what MFU counts (ModelConfig.flops_per_token).
    window_local_tokens = window_loss_tokens = 0.0
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    while step < max_steps:
        checkpoints.poll()  # a background save that failed stops the run here
        batch = micro_batches(loader_iter, accum, runtime.device, engine.prepare_on_host)
        global_tokens = global_loss_tokens(batch.loss_tokens, dims, runtime.device)
        lr = lr_at(step, t, max_steps)
        loss_sum = engine.forward_backward(batch.micro_batches, global_tokens)
        grad_norm = engine.clip_and_step(t.grad_clip, lr)
        step += 1
        consumed += t.global_batch_size
        consumed_tokens += t.global_batch_size * data.seq_length
        window_tokens += t.global_batch_size * data.seq_length
        window_local_tokens += sum(mb["tokens"].numel() for mb in batch.micro_batches)
        window_loss_tokens += batch.loss_tokens

        if step % t.log_interval == 0 or step == max_steps:
            loss = dims.all_reduce_over_batch(loss_sum.double()).item() / float(global_tokens)
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / elapsed / runtime.world_size
            flops_per_token = record.model_config.flops_per_token(
                data.seq_length, frozen_params=frozen, loss_token_fraction=window_loss_tokens / max(window_local_tokens, 1))
            metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s_per_gpu": tps,
                       "consumed_samples": consumed,
                       **mfu_fields(tps, flops_per_token, runtime.device, fp8=engine.float8 is not None)}
            if engine.last_aux_loss is not None:  # MoE: the load-balancing loss, mean over the global batch
                aux = dims.all_reduce_over_batch(engine.last_aux_loss.double().clone()).item() / dims.dp_size
                metrics["aux_loss"] = aux
                counts = dims.all_reduce_over_batch(engine.expert_counts.double().clone())
                metrics.update(expert_load(counts))  # router health: see shoal.models.moe.expert_load
            if runtime.device.type == "cuda":
                metrics["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            logger.log(step, metrics)
            logger.progress(step, metrics)
            if runtime.is_main and step - progress.step == min(3 * t.log_interval, max_steps - progress.step):
                line = compare(estimate, metrics)  # after the first (compiling) steps
                if line:
                    print(line, file=sys.stderr)
            window_start, window_tokens = time.perf_counter(), 0
            window_local_tokens = window_loss_tokens = 0.0

        is_last = step == max_steps
        val_due = plan.val_interval and step % plan.val_interval == 0
        save_due = recipe.checkpoint.save_interval and step % recipe.checkpoint.save_interval == 0
        if val_due or save_due or is_last:
            last_val = validate(engine, datasets.valid, t, data, runtime)
            if last_val is not None:
                logger.log(step, {"val_loss": last_val})
                logger.progress(step, {"val_loss": last_val})
        if save_due or is_last:
            checkpoints.save(engine.parts, engine.optimizers if recipe.checkpoint.save_optimizer else None,
                             Progress(step, consumed, consumed_tokens), val_loss=last_val)
        window_start = time.perf_counter() if (val_due or save_due) else window_start
    return checkpoints.finish()
