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
    the caller. A daemon thread, so an interpreter leaving after Ctrl-C never waits for it.

    Whether the work has ended is the task's own record, an event the thread sets as its last act,
    never `Thread.is_alive()`: when Ctrl-C interrupts a `join()` (CPython 3.11's threading, issue
    python/cpython#90882), the thread can be marked stopped while it still runs. A run interrupted
    while it waited for a save then took the save for ended, removed its folder and returned, and
    the writer went on: it recreated the folder, published it and, in retention, removed the
    temporary folder of the next run's save in the same process.
    """

    def __init__(self, work: Callable[[threading.Event], T], name: str):
        self.aborted = threading.Event()
        self._result: T | None = None
        self._error: BaseException | None = None
        self._ended = threading.Event()  # the work returned or raised, or will never run
        self._lock = threading.Lock()
        self._started = False  # `start` was called
        self._begun = False  # the thread has claimed the work (under _lock)
        self._thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)

    def start(self) -> None:
        try:
            self._started = True
            self._thread.start()
        except BaseException:
            # No thread (none could be made), or a Ctrl-C inside `Thread.start`, which may or may not
            # have launched one: a thread that has not claimed the work yet never will.
            self._cancel()
            raise

    def _run(self, work: Callable[[threading.Event], T]) -> None:
        with self._lock:
            if self._ended.is_set():  # cancelled before it began
                return
            self._begun = True
        try:
            self._result = work(self.aborted)
        except BaseException as err:  # KeyboardInterrupt too: it is reported to the main thread, not lost
            self._error = err
        finally:
            self._ended.set()

    def _cancel(self) -> None:
        """The work will not run if it has not begun; once begun, it runs to its end."""
        with self._lock:
            if not self._begun:
                self._ended.set()

    def done(self) -> bool:
        """The work has ended (or will never run); also when it was never started."""
        return self._ended.is_set() or not self._started

    def wait(self) -> None:
        """Wait for the work to end (a Ctrl-C of the main thread interrupts the wait, not the work)."""
        if self._started:  # a task never started has nothing to wait for
            self._ended.wait()

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
