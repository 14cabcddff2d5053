"""What both training commands do once their recipe is resolved: hand the job to the launcher
(several processes, Slurm) or train in this process."""

from __future__ import annotations

from pathlib import Path

from shoal.config.recipe import Recipe
from shoal.config.resolve import experiment_dir
from shoal.data.gpt_dataset import is_blend_weight
from shoal.errors import ShoalError
from shoal.train.runtime import finish_distributed, setup_runtime
from shoal.train.trainer import DatasetBuilder, train


def run_stage(recipe: Recipe, make_datasets, argv: list[str] | None = None) -> int:
    """Launch `recipe` as its launch section asks, or train here; returns the exit status.

    `make_datasets(recipe, tokenizer_dir, verbose)` builds the stage's datasets. `argv` is the
    command line as typed (the launcher passes it on to the ranks; checkpoints record it).
    """
    from shoal.launch import maybe_launch

    for path in recipe.data.dataset_path:  # fail before any process starts, not inside every rank
        if not is_blend_weight(path) and not Path(path).exists() and not Path(path + ".idx").exists():
            raise ShoalError(f"--dataset_path {path} does not exist")
    if recipe.launch.dryrun:
        from shoal.train.dry_run import dry_run

        return dry_run(recipe, make_datasets, argv)
    if recipe.launch.world_size > 1 or recipe.launch.executor != "local":
        if argv is None:
            raise ShoalError("a run over several processes is started from the command line (`shoal pretrain ...`)")
        rc = maybe_launch(recipe.launch, argv=argv, experiment_dir=experiment_dir(recipe))
        if rc is not None:
            return rc
    runtime = setup_runtime(recipe.parallel, recipe.train.precision)
    builder: DatasetBuilder = lambda tokenizer_dir: make_datasets(recipe, tokenizer_dir, runtime.is_main)  # noqa: E731
    train(recipe, runtime, builder, argv)
    finish_distributed()
    return 0
