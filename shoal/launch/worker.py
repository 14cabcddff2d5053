"""What torchrun starts in each rank: `python -m shoal.launch.worker MODULE ARGS...`.

It sends the rank's output to `logs/rank{N}.log` in the experiment (rank 0 keeps the console when
`SHOAL_RANK0_CONSOLE=1`, as in a Slurm job, whose output file is the console), runs MODULE as
`python -m MODULE ARGS...` would, and when the rank fails records its exit status and time, so the
launcher can tell which rank failed first and show that rank's error rather than the echo of the
ranks torchrun stopped after it. Done before MODULE is imported, so import errors are logged too.
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import sys
import time
import traceback
from pathlib import Path

LOG_DIR_ENV = "SHOAL_LOG_DIR"
STATUS_DIR_ENV = "SHOAL_STATUS_DIR"
RANK0_CONSOLE_ENV = "SHOAL_RANK0_CONSOLE"


def rank_log_path(log_dir: str | os.PathLike, rank: int) -> Path:
    return Path(log_dir) / f"rank{rank}.log"


def _redirect_output(path: Path, rank: int) -> None:
    """Point this process's stdout and stderr (the file descriptors, so child processes follow) at `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Append: a resumed or requeued run keeps the earlier attempts' lines above its own.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"=== shoal rank {rank} on {socket.gethostname()} (pid {os.getpid()}), {stamp}", flush=True)


def _exit_code(status: object) -> int:
    """SystemExit's code as a process exit status, as the interpreter would turn it into one."""
    if status is None:
        return 0
    if isinstance(status, int):
        return status
    print(status, file=sys.stderr)
    return 1


def _record_failure(status_dir: str, rank: int, code: int) -> None:
    record = {"rank": rank, "exit_code": code, "time": time.time(), "host": socket.gethostname()}
    path = Path(status_dir) / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _user_frames(tb):
    """Drop this wrapper's and runpy's frames from a traceback: they say nothing about the error."""
    while tb is not None and (tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>")
                              or tb.tb_frame.f_code.co_filename.endswith("runpy.py")):
        tb = tb.tb_next
    return tb


def run_rank(module: str, args: list[str]) -> int:
    rank = int(os.environ.get("RANK", "0"))
    log_dir = os.environ.get(LOG_DIR_ENV)
    if log_dir and not (rank == 0 and os.environ.get(RANK0_CONSOLE_ENV) == "1"):
        _redirect_output(rank_log_path(log_dir, rank), rank)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = _exit_code(exit_.code)
    except KeyboardInterrupt:
        code = 130
    except BaseException as err:  # noqa: BLE001 - report any crash as the interpreter would, then exit 1
        traceback.print_exception(type(err), err, _user_frames(err.__traceback__))
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    status_dir = os.environ.get(STATUS_DIR_ENV)
    if code != 0 and status_dir:
        _record_failure(status_dir, rank, code)
    return code


def main() -> None:
    if len(sys.argv) < 2:
        print("usage: python -m shoal.launch.worker MODULE [ARGS...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_rank(sys.argv[1], sys.argv[2:]))


if __name__ == "__main__":
    main()
