"""What an asynchronous checkpoint save needs besides the checkpoint itself: a copy of the state in
CPU memory, a thread to write it from, and a process group of its own.

The copy is taken while the step loop waits (a device-to-host copy, into pinned memory on a GPU,
allocated at the first save and reused by the next ones); the write then runs in a thread while
training goes on, and the next optimizer step may change the live tensors freely. The thread's
collectives (DCP's planning, the ranks' agreement before the rename) go over a gloo group made for
them: on the default group they would interleave with the training's own collectives, which every
rank must issue in the same order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class CpuStaging:
    """Copies of a (nested) state dict's tensors in CPU memory; DTensors keep their sharding.

    torch's BlockingAsyncStager does the copy (public since torch 2.4; its code and the helpers it
    calls read the same in torch 2.11, the GPU machine's, and 2.13). With `reuse` (on a GPU) its pinned buffers are kept from one save to the next,
    so the caller must not stage again before the previous copy has been written.
    """

    def __init__(self, reuse: bool):
        from torch.distributed.checkpoint.staging import BlockingAsyncStager

        self._stager = BlockingAsyncStager(cache_staged_state_dict=reuse)

    def stage(self, state: dict[str, Any]) -> dict[str, Any]:
        return self._stager.stage(state)


class BackgroundTask(Generic[T]):
    """`work(aborted)` run in a daemon thread; its result, or the exception it raised, kept for
    the caller. A daemon thread, so an interpreter leaving after Ctrl-C never waits for it."""

    def __init__(self, work: Callable[[threading.Event], T], name: str):
        self.aborted = threading.Event()
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self, work: Callable[[threading.Event], T]) -> None:
        try:
            self._result = work(self.aborted)
        except BaseException as err:  # KeyboardInterrupt too: it is reported to the main thread, not lost
            self._error = err

    def done(self) -> bool:
        return not self._thread.is_alive()  # also when it never started

    def wait(self) -> None:
        """Wait for the work to end (a Ctrl-C of the main thread interrupts the wait, not the work)."""
        if self._thread.ident is not None:  # a thread never started has nothing to wait for
            self._thread.join()


    def result(self) -> T | None:
        """Wait for the work to end; returns its result or raises its exception."""
        self.wait()
        if self._error is not None:
            raise self._error
        return self._result


def background_group() -> dist.ProcessGroup | None:
    """A gloo group over every rank for the background writes' collectives (every rank calls
    this at the same point); None in a single process, which needs none."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo")


def all_ranks_agree(yes: bool, group: dist.ProcessGroup | None) -> bool:
    """True on every rank when every rank said yes (over `group`; a single process decides alone)."""
    if group is None:
        return yes
    flag = torch.tensor([1 if yes else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())
