"""The experiment lock: one run at a time writes an experiment folder.

Rank 0 of a run holds an advisory POSIX record lock (`fcntl.lockf`) on `EXPERIMENT/.lock` from before it writes
anything into the experiment until it ends. The kernel drops the lock when the process dies,
however it dies, so a killed run never blocks the next one; the file keeps the pid and host of
its last holder, which is how a lock left by a dead process is recognised and reported when it is
taken over. A second run that finds the lock held is refused at once, naming the holder.

The lock is advisory and local to one machine's kernel on most network file systems: two runs on
two hosts sharing an NFS folder may both get it. Slurm jobs of one experiment run on one
allocation, whose rank 0 is one process, so that case needs two jobs submitted by hand.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shoal.checkpoint.catalog import CHECKPOINTS_DIR, remove_leftovers
from shoal.errors import ShoalError

LOCK_FILE = ".lock"


@dataclass
class ExperimentLock:
    path: Path
    fd: int | None
    # The experiment folders this run created only to hold the lock: removed again when the run is
    # refused before writing anything else, so a refused run leaves nothing behind.
    created: list[Path]

    def release(self) -> None:
        """Unlock; a folder this run created and left holding nothing but the lock is removed."""
        if self.fd is None:
            return
        import fcntl

        try:
            folder = self.path.parent
            if self.created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                self.path.unlink()  # a run refused before writing anything leaves nothing
                for made in self.created:  # innermost first, while empty
                    try:
                        made.rmdir()
                    except OSError:
                        break
            else:
                os.ftruncate(self.fd, 0)  # a clean end: an empty file is a lock nobody left behind
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None


def _holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"unreadable": True}


def _describe(holder: dict) -> str:
    if not holder or holder.get("unreadable"):
        return "another process"
    since = holder.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{when}"


def acquire_experiment_lock(experiment_dir: Path) -> ExperimentLock:
    """Take `EXPERIMENT/.lock` or raise ShoalError naming the process that holds it."""
    import fcntl

    created = []
    for folder in [experiment_dir, *experiment_dir.parents]:
        if folder.exists():
            break
        created.append(folder)
    path = experiment_dir / LOCK_FILE
    try:
        experiment_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ShoalError(f"cannot create the experiment lock {path}: {err.strerror or err}") from None
    try:
        # A POSIX record lock, not flock: it belongs to this process alone, so a DataLoader worker
        # forked from a run that is then killed does not keep holding it (a flock lock is shared
        # with forked children through the open file).
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _holder(fd)
        os.close(fd)
        raise ShoalError(
            f"experiment {experiment_dir} is in use by another run ({_describe(holder)}); wait for it to end, "
            "or use another --experiment"
        ) from None
    try:
        replaced = os.stat(path).st_ino != os.fstat(fd).st_ino
    except FileNotFoundError:
        replaced = True
    if replaced:  # a refused run removed the file between our open and our lock: lock the new one
        os.close(fd)
        return acquire_experiment_lock(experiment_dir)
    previous = _holder(fd)
    if previous:
        # The lock was free, yet the file names a holder: that process ended without releasing it.
        print(f"shoal: taking over the lock of {experiment_dir} left by {_describe(previous)}, which is no "
              "longer running", file=sys.stderr)
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (mine + "\n").encode(), 0)
    return ExperimentLock(path, fd, created)


@contextmanager
def hold_experiment(experiment_dir: Path) -> Iterator[str]:
    """Hold the experiment for a run (rank 0 takes the lock); yields the run's id, the same on
    every rank, which names its temporary checkpoint folders. Every rank raises the refusal."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    lock, verdict = None, [None, uuid.uuid4().hex[:12]]
    if rank == 0:
        try:
            lock = acquire_experiment_lock(experiment_dir)
            remove_leftovers(experiment_dir / CHECKPOINTS_DIR)  # no other run can be writing them now
        except ShoalError as err:
            verdict[0] = str(err)
    if distributed:
        dist.broadcast_object_list(verdict, src=0)
    try:
        if verdict[0] is not None:
            raise ShoalError(verdict[0])
        yield verdict[1]
    finally:
        if lock is not None:
            lock.release()
