"""`shoal pretrain`: continual pretraining on Megatron `.bin/.idx` data (stage 2 of the seed).

Reads top to bottom: resolve the recipe from file and flags, hand off to the launcher when the job
spans several processes or Slurm, then train with the shared loop on GPT samples built exactly as
Megatron builds them (so a NeMo user's data and splits mean the same thing here).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shoal.config.flags import add_training_arguments
from shoal.config.recipe import Recipe
from shoal.config.resolve import resolve_recipe
from shoal.errors import ShoalError
from shoal.train.run_plan import validation_interval
from shoal.train.stage import run_stage
from shoal.train.trainer import Datasets

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, stage="pretrain")


def build_pretrain_data(recipe: Recipe, tokenizer_dir: Path | None, verbose: bool) -> Datasets:
    """Train/validation GPT datasets sized for max_steps (one epoch when max_steps is unset)."""
    from shoal.data.gpt_dataset import build_pretrain_datasets
    from shoal.data.tokenizer import load_tokenizer

    data, t = recipe.data, recipe.train
    if not data.dataset_path:
        raise ShoalError("no pretraining data: pass --dataset_path DIR (the folder of your .bin/.idx files)")
    eod = pad = None
    if tokenizer_dir is not None:
        tok = load_tokenizer(tokenizer_dir)
        eod, pad = tok.eos_token_id, tok.pad_token_id

    def build(num_samples):
        return build_pretrain_datasets(
            data.dataset_path, data.seq_length, data.seed, split=data.split, num_samples=num_samples,
            cache_dir=data.cache_dir, eod_token_id=eod, pad_token_id=pad,
            reset_position_ids=data.document_mask, eod_mask_loss=data.eod_mask_loss,
        )

    max_steps = t.max_steps
    if max_steps is None:  # NeMo's rule: one epoch over the training split
        train, _, _ = build((None, 0, 0))
        max_steps = len(train) // t.global_batch_size
        if max_steps == 0:
            raise ShoalError(
                f"--dataset_path {' '.join(data.dataset_path)} holds {len(train)} samples of {data.seq_length} tokens, "
                f"fewer than one global batch ({t.global_batch_size}); lower --global_batch_size or --seq_length"
            )
    val_batches = t.limit_val_batches if t.limit_val_batches is not None else 1
    evals = max_steps // (validation_interval(t, "pretrain", max_steps) or max_steps) + 1
    train, valid, _ = build((max_steps * t.global_batch_size, evals * val_batches * t.global_batch_size, 0))
    if valid is None and verbose:
        print(f"shoal: warning: the validation split ({data.split!r}) of {' '.join(data.dataset_path)} holds no "
              "sample; training without validation (checkpoints are ranked by recency)", file=sys.stderr)
    return Datasets(train, valid, max_steps, summary=_summary(data.dataset_path, train, valid, t.global_batch_size))


def _summary(paths: list[str], train, valid, global_batch_size: int) -> dict:
    """Documents and tokens of the corpus, and the samples this run reads."""
    import numpy as np

    from shoal.data.gpt_dataset import parse_blend
    from shoal.data.indexed import IndexedDataset

    prefixes, _ = parse_blend(paths)
    lengths = [IndexedDataset(prefix).sequence_lengths for prefix in prefixes]
    return {"prefixes": len(prefixes), "documents": sum(len(x) for x in lengths),
            "tokens": int(sum(np.sum(x, dtype=np.int64) for x in lengths)),
            "training samples": len(train), "validation samples": len(valid) if valid is not None else 0,
            "samples per step": global_batch_size}


def run(recipe: Recipe, argv: list[str] | None = None) -> int:
    """Pretrain as `recipe` says (from Python: `run(build_recipe("pretrain", "tiny", {...}))`)."""
    return run_stage(recipe, build_pretrain_data, argv)


def main(args: argparse.Namespace) -> int:
    if args.wandb_token:  # this process only; the launcher hands it to the ranks the same way
        os.environ["WANDB_API_KEY"] = args.wandb_token
    return run(resolve_recipe(args, "pretrain"), args.argv)
