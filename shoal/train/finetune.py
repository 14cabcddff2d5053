"""`shoal finetune`: instruction fine-tuning, full or LoRA/DoRA (stage 3 of the seed).

Starts from `--nemo_model` or, when it is unset, from the latest checkpoint of the pretraining
experiment (the seed's behaviour); trains on `training.jsonl` with loss on answer tokens only,
validates on `validation.jsonl`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from shoal.checkpoint.training import latest_checkpoint
from shoal.config.flags import add_training_arguments, recipe_from_args, secret
from shoal.config.recipe import Recipe
from shoal.errors import ShoalError
from shoal.train.trainer import Datasets, Runtime, finish_distributed, prepare_run, run_training

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser)
    parser.add_argument("--pretrain_experiment", help="experiment whose latest checkpoint to fine-tune when "
                        "--nemo_model is unset (default: the newest pretraining experiment under --results_dir)")


def find_pretraining_checkpoint(recipe: Recipe) -> Path:
    """The latest checkpoint of the named pretraining experiment, or of the newest one found."""
    results = Path(recipe.checkpoint.results_dir)
    if recipe.model.pretrain_experiment:
        candidates = [results / recipe.model.pretrain_experiment]
    else:
        candidates = []
        for exp in results.iterdir() if results.is_dir() else []:
            config = exp / "config.yaml"
            if config.exists() and (yaml.safe_load(config.read_text()) or {}).get("stage") == "pretrain":
                candidates.append(exp)
        candidates.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for exp in candidates:
        found = latest_checkpoint(exp / "checkpoints")
        if found is not None:
            return found.path
    where = candidates[0] if recipe.model.pretrain_experiment else results
    raise ShoalError(
        f"no model to fine-tune: --nemo_model is unset and no pretraining checkpoint was found in {where}; "
        "pass --nemo_model CKPT (an imported or pretrained checkpoint)"
    )


def build_sft_data(recipe: Recipe, runtime: Runtime, tokenizer_dir: Path | None) -> Datasets:
    from shoal.data.sft import build_sft_dataset
    from shoal.data.tokenizer import load_tokenizer

    data, t = recipe.data, recipe.train
    if not data.dataset_path:
        raise ShoalError("no fine-tuning data: pass --dataset_path DIR (with training.jsonl and validation.jsonl)")
    folder = Path(data.dataset_path[0])
    train_file = folder / "training.jsonl"
    if not train_file.is_file():
        raise ShoalError(f"--dataset_path {folder}: {train_file.name} not found (run `shoal download sft` first)")
    source = tokenizer_dir or recipe.model.hf_model_id
    if source is None:
        raise ShoalError("the starting checkpoint carries no tokenizer; pass --hf_model_id with the tokenizer's folder")
    tokenizer = load_tokenizer(source)

    def build(path: Path):
        return build_sft_dataset(path, tokenizer, data.seq_length, pack=data.pack_sequences,
                                 prompt_template=data.prompt_template, system_prompt=data.system_prompt,
                                 seed=data.seed, verbose=runtime.is_main)

    train = build(train_file)
    if len(train) == 0:
        raise ShoalError(f"{train_file} holds no usable examples")
    valid_file = folder / "validation.jsonl"
    valid = build(valid_file) if valid_file.is_file() else None
    max_steps = t.max_steps
    if max_steps is None:
        max_steps = len(train) // t.global_batch_size
        if max_steps == 0:
            raise ShoalError(f"{train_file}: {len(train)} sequences, fewer than one global batch ({t.global_batch_size})")
    return Datasets(train, valid, max_steps, shuffle=True, description={"stage": "finetune", "dataset_path": str(folder)})


def main(args: argparse.Namespace) -> int | None:
    if args.pretrain_experiment:
        args.overrides = [*(args.overrides or []), f"model.pretrain_experiment={args.pretrain_experiment}"]
    recipe = recipe_from_args(args, "finetune")
    if recipe.data.pack_sequences:
        # Packed examples must not see each other: attention is kept within each example.
        recipe.data.document_mask = True
    own = Path(recipe.checkpoint.results_dir) / recipe.checkpoint.experiment / "checkpoints"
    if recipe.model.checkpoint is None and latest_checkpoint(own) is None:
        # Fine-tuning starts from trained weights, never from a random preset.
        recipe.model.checkpoint = str(find_pretraining_checkpoint(recipe))
    runtime = prepare_run(recipe, args, stage="finetune")
    if not isinstance(runtime, Runtime):
        return runtime
    run_training(recipe, runtime, build_sft_data, wandb_token=secret(args.wandb_token, "WANDB_API_KEY"))
    finish_distributed()
    return 0
