"""Run a function in N processes (CPU + gloo, or one GPU each + NCCL), started the way torchrun does.

Each process gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), joins
the group through `shoal.distributed.init_distributed` (so that is tested too), runs the function
and saves what it returns; the caller gets one result per rank. A process that fails makes the
call raise with its traceback; a hang ends at the collective timeout or the call's deadline.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

# A peer that died leaves the others waiting in a collective; fail them well before pytest would.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)

# Processes are forked from a server that imported torch and shoal once, instead of each
# importing them again (seconds per process on a loaded machine). The server forks before any
# computation, so no thread pool or process group is inherited.
_PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.pipelining", "shoal.distributed", "shoal.models"]
mp.set_forkserver_preload(_PRELOAD)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, device_type: str, args: tuple
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # Many processes share few cores: one thread each avoids oversubscription.
    torch.set_num_threads(1)
    faulthandler.enable()  # a crash in native code (gloo, say) prints where it happened
    from shoal.distributed import destroy_distributed, init_distributed

    init_distributed(device_type, timeout=COLLECTIVE_TIMEOUT)
    try:
        result = fn(*args)
        # Leave together: a rank tearing gloo down while a peer still talks to it can crash the peer.
        torch.distributed.barrier()
    finally:
        destroy_distributed()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, device_type: str = "cpu", deadline_s: float = 600
) -> list[Any]:
    """fn(*args) in `world_size` processes (gloo on CPU; NCCL with one GPU each on "cuda");
    returns each rank's result (plain data or CPU tensors)."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry,
            args=(fn, world_size, _free_port(), out_dir, device_type, args),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )
        start = time.monotonic()
        while not ctx.join(timeout=1):
            if time.monotonic() - start > deadline_s:
                for process in ctx.processes:
                    if process.is_alive():
                        process.kill()
                name = getattr(fn, "__name__", fn)
                raise TimeoutError(f"{name} did not finish in {deadline_s}s on {world_size} ranks")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
