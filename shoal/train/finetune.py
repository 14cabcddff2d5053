"""`shoal finetune`: instruction fine-tuning, full or LoRA/DoRA (stage 3 of the seed).

Starts from `--nemo_model` or, when it is unset, from the latest checkpoint of the pretraining
experiment (the seed's behaviour); trains on `training.jsonl` with loss on answer tokens only,
validates on `validation.jsonl`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shoal.config.flags import add_finetune_arguments
from shoal.config.recipe import Recipe
from shoal.config.resolve import resolve_recipe
from shoal.errors import ShoalError
from shoal.train.stage import run_stage
from shoal.train.trainer import Datasets

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_finetune_arguments(parser)  # defined beside the other flags, in a module without torch (fast --help)


def build_sft_data(recipe: Recipe, tokenizer_dir: Path | None, verbose: bool) -> Datasets:
    from shoal.data.sft import build_sft_dataset
    from shoal.data.tokenizer import load_tokenizer

    data, t = recipe.data, recipe.train
    if not data.dataset_path:
        raise ShoalError("no fine-tuning data: pass --dataset_path DIR (with training.jsonl and validation.jsonl)")
    folder = Path(data.dataset_path[0])
    if folder.is_file():  # the user named a split file: its folder holds the splits
        if verbose:
            print(f"shoal: --dataset_path {folder} is a file; reading the splits of its folder {folder.parent}",
                  file=sys.stderr)
        folder = folder.parent
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
                                 seed=data.seed, verbose=verbose)

    train = build(train_file)
    if len(train) == 0:
        raise ShoalError(f"{train_file} holds no usable examples")
    valid_file = folder / "validation.jsonl"
    valid = build(valid_file) if valid_file.is_file() else None
    if valid is None and verbose:
        print(f"shoal: warning: --dataset_path {folder} has no {valid_file.name}; training without validation "
              "(checkpoints are ranked by recency)", file=sys.stderr)
    max_steps = t.max_steps
    if max_steps is None:
        max_steps = len(train) // t.global_batch_size
        if max_steps == 0:
            raise ShoalError(f"{train_file}: {len(train)} sequences, fewer than one global batch ({t.global_batch_size})")
    summary = {"training rows": train.num_rows, "training sequences": len(train),
               "validation sequences": len(valid) if valid is not None else 0,
               "sequences per step": t.global_batch_size, "packed": data.pack_sequences}
    return Datasets(train, valid, max_steps, shuffle=True, summary=summary)


def run(recipe: Recipe, argv: list[str] | None = None) -> int:
    """Fine-tune as `recipe` says (from Python: `run(build_recipe("finetune", "tiny", {...}))`)."""
    return run_stage(recipe, build_sft_data, argv)


def main(args: argparse.Namespace) -> int:
    if args.wandb_token:  # this process only; the launcher hands it to the ranks the same way
        os.environ["WANDB_API_KEY"] = args.wandb_token
    return run(resolve_recipe(args, "finetune"), args.argv)
