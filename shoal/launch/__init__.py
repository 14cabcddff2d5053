"""Launching: run here, as torchrun ranks on this machine, or as a Slurm job (docs/launching.md).

The training commands call `maybe_launch` first thing; it returns None when the current process
should train, and otherwise the exit status of the launch it did (or printed, with --dryrun).
"""

from __future__ import annotations

import dataclasses
import os

from shoal.config.launch import LaunchConfig, add_launch_arguments, inside_launched_process, launch_config_from_args
from shoal.launch.command import rank_arguments

__all__ = ["LaunchConfig", "add_launch_arguments", "inside_launched_process", "launch_config_from_args",
           "maybe_launch"]


def maybe_launch(cfg: LaunchConfig, argv: list[str], experiment_dir: str | os.PathLike | None = None,
                 module: str = "shoal.cli") -> int | None:
    """Launch `python -m module argv[1:]` as `cfg` asks, or return None to run in this process.

    None when this process is already a rank (torchrun's or ours), and for a single local process
    (with --dryrun too: the command then does its own dry run). Otherwise starts the local ranks
    and waits for them, or submits the Slurm job, and returns the exit status to end with.
    `argv` is `sys.argv` of the command (argv[0] is not used).
    """
    if inside_launched_process():
        return None
    if experiment_dir is not None:
        cfg = dataclasses.replace(cfg, experiment_dir=str(os.path.abspath(experiment_dir)))
    cfg.validate()
    if cfg.executor == "local" and cfg.world_size == 1:
        return None
    args, secret_env = rank_arguments(argv)
    if cfg.executor == "local":
        from shoal.launch.local import run_local

        return run_local(cfg, module, args, secret_env)
    from shoal.launch.slurm import submit_slurm

    return submit_slurm(cfg, module, args, secret_env)
