"""Joining the process group that `torchrun` (or `srun torchrun`) set up.

torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain `python` or
`shoal` process has none of them and runs alone, without a process group.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from shoal.errors import ShoalError

# How long a collective may wait for a peer before the job fails. NCCL's default is 10 minutes;
# gloo's is 30, which leaves a CPU job whose peer crashed hanging for far too long.
DEFAULT_TIMEOUT = timedelta(minutes=10)


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ShoalError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def init_distributed(device_type: str, timeout: timedelta = DEFAULT_TIMEOUT) -> tuple[int, int, int]:
    """Start the process group under torchrun; returns (rank, world_size, local_rank).

    Uses NCCL for CUDA tensors and gloo for CPU tensors (a CUDA job gets both, so CPU-side
    collectives such as checkpoint planning still work). Without torchrun's environment it does
    nothing and returns (0, 1, 0). Calling it again returns the existing group's ranks.
    """
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return 0, 1, 0
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ShoalError(
                f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                "start at most one process per GPU (--num_gpus)"
            )
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    elif device_type == "cpu":
        backend = "gloo"
    else:
        raise ShoalError(f"device type {device_type!r} is not supported; expected 'cuda' or 'cpu'")
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    return rank, world_size, local_rank


def destroy_distributed() -> None:
    """Leave the process group, if one was started (lets a process exit without warnings)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
