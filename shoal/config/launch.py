"""How a training command is launched: in this process, as local torchrun ranks, or as a Slurm job.

The flags keep the seed's spellings (`--executor`, `--account/-a`, `--partition/-p`,
`--container_image/-i`, `--num_nodes/-N`, `--num_gpus/-G`, `--dryrun`) so a NeMo-Run command line
pasted after `shoal pretrain` means what it meant there. `shoal.launch.maybe_launch` acts on the
resulting `LaunchConfig`; docs/launching.md is the user's guide.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shoal.config.secrets import looks_like_secret_name
from shoal.errors import ShoalError

DEFAULT_TIME_LIMIT = "04:00:00"

# Set by the launcher in every rank's environment (torchrun adds LOCAL_RANK and TORCHELASTIC_RUN_ID).
LAUNCHED_ENV = "SHOAL_LAUNCHED"
# The executor that started the ranks: their command line no longer says `--executor slurm`.
EXECUTOR_ENV = "SHOAL_EXECUTOR"

# Slurm's --time forms: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"^(\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE)$")
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class LaunchConfig:
    """Where and how many processes run. Fields mirror the flags of the same name (`time_limit` is
    `--time`); `experiment_dir` comes from the command's experiment. docs/launching.md has the guide."""

    executor: Literal["local", "slurm"] = "local"
    num_nodes: int = 1
    # Processes per node: one per GPU; on a machine without GPUs, the number of CPU (gloo) processes.
    num_gpus: int = 1
    # Slurm: GPUs requested per node (default num_gpus; 0 asks for none, a CPU-only job).
    gpus_per_node: int | None = None
    # Slurm: CPUs for each node's torchrun and its ranks (default: one per rank).
    cpus_per_task: int | None = None
    account: str | None = None
    partition: str | None = None
    # pyxis/enroot image and mounts, given to `srun` only when an image is set.
    container_image: str | None = None
    container_mounts: str | None = None
    time_limit: str = DEFAULT_TIME_LIMIT
    job_name: str | None = None  # default: the experiment's folder name
    # Slurm: requeue on preemption or node failure, and near the time limit; the run then resumes
    # from its last checkpoint.
    requeue: bool = False
    # Variables to set in every rank (NCCL_* tuning and the like); secrets are refused here.
    env: dict[str, str] = field(default_factory=dict)
    master_port: int | None = None
    dryrun: bool = False
    # Where logs/ and slurm/ go; the training commands pass their experiment folder.
    experiment_dir: str | None = None

    @property
    def gpus_requested(self) -> int:
        return self.num_gpus if self.gpus_per_node is None else self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.num_gpus

    def validate(self, explicit_time: bool = False, launched: bool = False) -> None:
        """Refuse counts that make no sense and options that contradict the executor.

        `explicit_time`: --time was given (it has a default, which local runs ignore). `launched`:
        this is a rank, whose layout torchrun decided (possibly over several nodes the user started).
        """
        if self.executor not in ("local", "slurm"):
            raise ShoalError(f"--executor must be local or slurm, got {self.executor!r}")
        for flag, value in (("--num_nodes", self.num_nodes), ("--num_gpus", self.num_gpus),
                            ("--cpus_per_task", self.cpus_per_task)):
            if value is not None and value < 1:
                raise ShoalError(f"{flag} must be a positive number, got {value}")
        if self.gpus_per_node is not None and self.gpus_per_node < 0:
            raise ShoalError(f"--gpus_per_node must be 0 or more, got {self.gpus_per_node}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ShoalError(f"--master_port must be between 1 and 65535, got {self.master_port}")
        for name in self.env:
            if not _ENV_NAME.match(name):
                raise ShoalError(f"--env {name}=...: {name!r} is not a valid environment variable name")
            if looks_like_secret_name(name):  # secrets travel in the environment, never a file
                raise ShoalError(
                    f"--env {name}=...: secrets are not passed on the command line (they would be written "
                    f"into the job script); export {name} in your shell instead, it reaches every rank"
                )
        if self.container_mounts and not self.container_image:
            raise ShoalError("--container_mounts needs --container_image (mounts are for the container)")
        if self.executor == "local":
            self._validate_local(explicit_time, launched)
        else:
            self._validate_slurm()

    def _validate_local(self, explicit_time: bool, launched: bool) -> None:
        if self.num_nodes > 1 and not launched:
            raise ShoalError(
                f"--num_nodes {self.num_nodes} needs --executor slurm: --executor local runs on this "
                "machine only (or start torchrun on each node yourself)"
            )
        slurm_only = {
            "--account": self.account, "--partition": self.partition,
            "--container_image": self.container_image, "--job_name": self.job_name,
            "--gpus_per_node": self.gpus_per_node, "--cpus_per_task": self.cpus_per_task,
            "--requeue": self.requeue or None, "--time": self.time_limit if explicit_time else None,
        }
        given = [flag for flag, value in slurm_only.items() if value is not None]
        if given:
            raise ShoalError(
                f"{', '.join(given)} {'is a Slurm option' if len(given) == 1 else 'are Slurm options'} "
                "and cannot be used with --executor local; add --executor slurm or drop "
                f"{'it' if len(given) == 1 else 'them'}"
            )

    def _validate_slurm(self) -> None:
        if not _TIME.match(self.time_limit):
            raise ShoalError(
                f"--time {self.time_limit!r} is not a Slurm time limit; use HH:MM:SS, D-HH:MM:SS or minutes"
            )
        for flag, value in (("--account", self.account), ("--partition", self.partition),
                            ("--container_image", self.container_image),
                            ("--container_mounts", self.container_mounts)):
            if value is not None and (not value or re.search(r"\s", value)):
                raise ShoalError(f"{flag} {value!r} must be a non-empty value without spaces")
        if self.job_name is not None and not _NAME.match(self.job_name):
            raise ShoalError(f"--job_name {self.job_name!r} may hold only letters, digits, '.', '_' and '-'")


def inside_launched_process() -> bool:
    """True in a rank started by shoal's launcher or by torchrun: it must train, not launch again."""
    env = os.environ
    return env.get(LAUNCHED_ENV) == "1" or "LOCAL_RANK" in env or "TORCHELASTIC_RUN_ID" in env


def _env_item(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The launch flags, seed spellings first; argparse defaults are None so that 'not given' shows.

    Abbreviated flags are turned off for the whole command: the launcher finds `--executor` and
    the secret flags in the command line it passes on by their full names, and an abbreviation
    (`--hf_tok`) would slip a secret through into the job script.
    """
    parser.allow_abbrev = False
    group = parser.add_argument_group("launching (docs/launching.md)")
    group.add_argument("--executor", choices=["local", "slurm"], default="local",
                       help="local: this machine (torchrun when more than one process); slurm: submit a job")
    group.add_argument("--num_nodes", "--num-nodes", "-N", dest="num_nodes", type=int,
                       help="nodes (Slurm; default 1)")
    group.add_argument("--num_gpus", "--num-gpus", "-G", dest="num_gpus", type=int,
                       help="processes per node, one per GPU; without GPUs, CPU processes (default 1)")
    group.add_argument("--gpus_per_node", "--gpus-per-node", dest="gpus_per_node", type=int,
                       help="Slurm: GPUs to request per node (default --num_gpus; 0 for a CPU-only job)")
    group.add_argument("--cpus_per_task", "--cpus-per-task", dest="cpus_per_task", type=int,
                       help="Slurm: CPUs per node for its ranks (default: one per rank)")
    group.add_argument("--account", "-a", help="Slurm account")
    group.add_argument("--partition", "-p", help="Slurm partition")
    group.add_argument("--container_image", "--container-image", "-i", dest="container_image",
                       help="Slurm with pyxis: container image the ranks run in")
    group.add_argument("--container_mounts", "--container-mounts", dest="container_mounts",
                       help="Slurm with pyxis: SRC:DST[,SRC:DST...] mounts for the container")
    group.add_argument("--time", help=f"Slurm time limit (default {DEFAULT_TIME_LIMIT})")
    group.add_argument("--job_name", "--job-name", dest="job_name",
                       help="Slurm job name (default: the experiment name)")
    group.add_argument("--requeue", action="store_true",
                       help="Slurm: requeue on preemption and near the time limit; the run resumes "
                            "from its last checkpoint")
    group.add_argument("--env", action="append", type=_env_item, metavar="NAME=VALUE",
                       help="set a variable in every rank (repeatable); not for secrets")
    group.add_argument("--master_port", "--master-port", dest="master_port", type=int,
                       help="rendezvous port (default: local picks a free one, Slurm derives one from the job id)")
    group.add_argument("--dryrun", "--dry-run", dest="dryrun", action="store_true",
                       help="print the torchrun command or the sbatch script and launch nothing")


def launch_config_from_args(args: argparse.Namespace, experiment_dir: str | os.PathLike | None = None) -> LaunchConfig:
    """Build and validate the launch config from parsed flags.

    In a rank the launcher started, `--executor slurm` and `--num_nodes` were removed from the
    command line (so the rank cannot submit again, and the node count is written only where the
    job asks for nodes); the environment says what they were: the executor in SHOAL_EXECUTOR, the
    layout in torchrun's WORLD_SIZE and LOCAL_WORLD_SIZE. So the config a rank records is the one
    the job really runs with.
    """
    launched = inside_launched_process()
    executor = args.executor
    num_nodes = 1 if args.num_nodes is None else args.num_nodes
    num_gpus = 1 if args.num_gpus is None else args.num_gpus
    if launched:
        executor = os.environ.get(EXECUTOR_ENV, executor)
        world, local = os.environ.get("WORLD_SIZE", ""), os.environ.get("LOCAL_WORLD_SIZE", "")
        if world.isdigit() and local.isdigit() and int(local) > 0:
            num_nodes, num_gpus = max(1, int(world) // int(local)), int(local)
    cfg = LaunchConfig(
        executor=executor,
        num_nodes=num_nodes,
        num_gpus=num_gpus,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        account=args.account,
        partition=args.partition,
        container_image=args.container_image,
        container_mounts=args.container_mounts,
        time_limit=args.time or DEFAULT_TIME_LIMIT,
        job_name=args.job_name,
        requeue=bool(args.requeue),
        env=dict(args.env or []),
        master_port=args.master_port,
        dryrun=bool(args.dryrun),
        experiment_dir=None if experiment_dir is None else str(Path(experiment_dir).absolute()),
    )
    cfg.validate(explicit_time=args.time is not None, launched=launched)
    return cfg
