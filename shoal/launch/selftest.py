"""A tiny distributed program that proves the launch plumbing: `python -m shoal.launch.selftest`.

    python -m shoal.launch.selftest --experiment DIR --output RESULT.json [launch flags]

It takes the same launch flags as the training commands and goes through the same
`maybe_launch`; each rank joins a gloo process group, the ranks all-reduce their rank ids and
gather where they ran, and rank 0 writes that as JSON to --output. `--fail_rank N` makes rank N
fail on purpose (the others then wait in the all-reduce until the launcher stops them), and
`--kill_rank N` makes rank N die of SIGKILL (as the out-of-memory killer does), and
`--sleep S` keeps the ranks alive for S seconds, to test stopping a run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from shoal.config.launch import add_launch_arguments, inside_launched_process, launch_config_from_args
from shoal.errors import ShoalError
from shoal.launch import maybe_launch
from shoal.launch.command import SECRET_ENV_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shoal.launch.selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True, help="folder for logs/ and slurm/")
    parser.add_argument("--output", required=True, help="JSON file rank 0 writes the result to")
    parser.add_argument("--fail_rank", type=int, help="this rank raises an error after joining the group")
    parser.add_argument("--kill_rank", type=int, help="this rank kills itself with SIGKILL after joining the group")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds each rank waits before the all-reduce")
    # As the training commands take them: the launcher must carry them to the ranks unwritten.
    parser.add_argument("--hf_token", help="a secret; each rank reports whether HF_TOKEN reached it")
    parser.add_argument("--wandb_token", help="a secret; each rank reports whether WANDB_API_KEY reached it")
    add_launch_arguments(parser)
    return parser


def run_ranks(args: argparse.Namespace) -> dict:
    """The part each rank runs; returns what rank 0 writes."""
    import torch
    import torch.distributed as dist

    if inside_launched_process():
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    me = {
        "rank": rank,
        "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
        "node_rank": int(os.environ.get("GROUP_RANK", 0)),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_nodename": os.environ.get("SLURMD_NODENAME"),
        # Digests, not values: the result file must not hold a secret either.
        "secrets": {name: hashlib.sha256(os.environ[name].encode()).hexdigest()
                    for name in SECRET_ENV_NAMES if name in os.environ},
    }
    pid_dir = Path(args.experiment) / "selftest"
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    print(f"selftest: rank {rank} of {world} on {me['host']} (local rank {me['local_rank']})", flush=True)
    if rank == args.fail_rank:
        raise RuntimeError(f"selftest: rank {rank} fails on purpose")
    if rank == args.kill_rank:
        time.sleep(1.0)  # let the other ranks reach the all-reduce, where they wait for this one
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer ends a process: no last words
    time.sleep(args.sleep)
    total = torch.tensor([rank], dtype=torch.int64)
    everyone = [me]
    if world > 1:
        dist.all_reduce(total)
        everyone = [None] * world
        dist.all_gather_object(everyone, me)
        dist.destroy_process_group()
    return {"world_size": world, "rank_sum": int(total.item()), "ranks": everyone}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = launch_config_from_args(args, args.experiment)
        status = maybe_launch(cfg, ["selftest", *argv], module="shoal.launch.selftest")
        if status is not None:
            return status
        if cfg.dryrun:
            print("dry run: the selftest would run in this process")
            return 0
        result = run_ranks(args)
    except ShoalError as err:
        print(f"shoal selftest: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.output).write_text(json.dumps(result, indent=1))
        print(f"selftest: ok, {result['world_size']} rank(s), sum of ranks {result['rank_sum']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
