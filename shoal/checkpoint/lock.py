"""The experiment lock: one run at a time writes an experiment folder.

Rank 0 of a run holds an advisory `fcntl.flock` on `EXPERIMENT/.lock` from before it writes
anything into the experiment until it ends. The kernel drops the lock when the process dies,
however it dies, so a killed run never blocks the next one; the file keeps the pid and host of
its last holder, which is how a lock left by a dead process is recognised and reported when it is
taken over. A second run that finds the lock held is refused at once, naming the holder.

flock is advisory and local to one machine's kernel on most network file systems: two runs on
two hosts sharing an NFS folder may both get it. Slurm jobs of one experiment run on one
allocation, whose rank 0 is one process, so that case needs two jobs submitted by hand.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import ShoalError

LOCK_FILE = ".lock"


@dataclass
class ExperimentLock:
    path: Path
    fd: int | None
    # The experiment folders this run created only to hold the lock: removed again when the run is
    # refused before writing anything else, so a refused run leaves nothing behind.
    created: list[Path]

    def release(self, *, refused: bool = False) -> None:
        if self.fd is None:
            return
        import fcntl

        try:
            if refused and self.created:
                self.path.unlink(missing_ok=True)
                for folder in self.created:  # innermost first; only if nothing else appeared there
                    try:
                        folder.rmdir()
                    except OSError:
                        break
            else:
                os.ftruncate(self.fd, 0)  # a clean end: an empty file is a lock nobody left behind
            fcntl.flock(self.fd, fcntl.LOCK_UN)
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
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _holder(fd)
        os.close(fd)
        raise ShoalError(
            f"experiment {experiment_dir} is in use by another run ({_describe(holder)}); wait for it to end, "
            "or use another --experiment"
        ) from None
    previous = _holder(fd)
    if previous:
        # The lock was free, yet the file names a holder: that process ended without releasing it.
        print(f"shoal: taking over the lock of {experiment_dir} left by {_describe(previous)}, which is no "
              "longer running", file=sys.stderr)
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (mine + "\n").encode(), 0)
    return ExperimentLock(path, fd, created)
