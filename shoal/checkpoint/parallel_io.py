"""File I/O for checkpoints and conversions at disk speed, from several threads, errors never lost.

Positional writes (`write_all`) and reads (`read_exact`) of large buffers, so threads share a file
descriptor without a file position between them; in-kernel copies between files (`copy_range`,
what `cp` does); and `Threads`, which runs a piece of work per thread, joins every thread whatever
happens and raises the first error any of them met (a KeyboardInterrupt first, then a ShoalError).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable

from shoal.errors import ShoalError

_MAX_IO = 1 << 30  # bytes per system call (Linux caps one read/write at just under 2 GiB)
# copy_file_range's answers that mean "not between these files": fall back to a buffered copy.
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


# The two system calls every byte written goes through (tests make them fail like a full disk).
def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    return os.pwrite(fd, data, offset)


def _copy_file_range(src: int, dst: int, count: int, src_offset: int, dst_offset: int) -> int:
    return os.copy_file_range(src, dst, count, src_offset, dst_offset)


def write_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` of the open file `fd` (large writes, any thread, any order)."""
    done = 0
    while done < len(data):
        done += _pwrite(fd, data[done:done + _MAX_IO], offset + done)


def copy_range(src_path: str, src_offset: int, length: int, fd: int, offset: int) -> None:
    """Copy `length` bytes of another file into `fd` at `offset`: in the kernel (as `cp` does)
    where the file systems allow it, else through a buffer."""
    with open(src_path, "rb") as src:
        done = 0
        while done < length:
            try:
                got = _copy_file_range(src.fileno(), fd, min(length - done, _MAX_IO),
                                         src_offset + done, offset + done)
            except (AttributeError, OSError) as err:  # another file system, or no copy_file_range here
                if isinstance(err, OSError) and err.errno not in _NO_KERNEL_COPY:
                    raise
                break
            if got == 0:
                raise ShoalError(f"{src_path}: truncated: {length - done} byte(s) missing at {src_offset + done}")
            done += got
        while done < length:
            src.seek(src_offset + done)
            chunk = src.read(min(length - done, 64 << 20))
            if not chunk:
                raise ShoalError(f"{src_path}: truncated: {length - done} byte(s) missing at {src_offset + done}")
            write_all(fd, memoryview(chunk), offset + done)
            done += len(chunk)


def read_exact(fd: int, view: memoryview, offset: int, path: str | os.PathLike) -> None:
    """Fill `view` from `offset` of the open file `fd`; a file that ends first is named as truncated."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:done + _MAX_IO]], offset + done)
        if not got:
            raise ShoalError(f"{path}: truncated: {len(view) - done} byte(s) missing at byte {offset + done}")
        done += got



class Threads:
    """Run `work(i)` for every i < count on `count` threads (the caller's among them); every thread is
    joined before this returns, and the first error of any thread is raised. Once one fails,
    `stopped()` tells the others to stop at their next step."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()

    def stopped(self) -> bool:
        return self._stop.is_set()

    def _run(self, work: Callable[[int], None], i: int) -> None:
        try:
            work(i)
        except BaseException as err:  # noqa: BLE001 - kept and raised by the caller, never lost
            with self._lock:
                self._errors.append(err)
            self._stop.set()

    def run(self, work: Callable[[int], None], count: int) -> None:
        threads = [threading.Thread(target=self._run, args=(work, i), daemon=True) for i in range(1, count)]
        for thread in threads:
            thread.start()
        interrupted: BaseException | None = None
        if count:
            self._run(work, 0)
        for thread in threads:  # every thread is waited for, a Ctrl-C meanwhile only stops them sooner
            while thread.is_alive():
                try:
                    thread.join()
                except BaseException as err:  # noqa: BLE001 - raised once all have stopped
                    self._stop.set()
                    interrupted = err
        if interrupted is not None:
            raise interrupted
        if self._errors:
            raise next((e for e in self._errors if isinstance(e, KeyboardInterrupt)),
                       next((e for e in self._errors if isinstance(e, ShoalError)), self._errors[0]))
