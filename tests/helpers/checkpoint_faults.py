"""Failures injected where shoal's checkpoint storage writes its bytes: the positional write
(`shoal.checkpoint.parallel_io._pwrite`) every data file's header and chunks go through, in
whichever writer thread writes that file, as a full disk or a Ctrl-C would strike it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest


def written_path(fd: int) -> Path:
    """The file an open descriptor writes to (Linux: /proc/self/fd)."""
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


def fail_writes_into(monkeypatch: pytest.MonkeyPatch, matches: Callable[[Path], bool],
                     failure: Callable[[], None]) -> list[str]:
    """Call `failure` (which raises) in place of every write into a file whose path `matches`;
    returns the names of the threads it struck, in order."""
    import threading

    import shoal.checkpoint.parallel_io as parallel_io

    real = parallel_io._pwrite
    struck: list[str] = []

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if matches(written_path(fd)):
            struck.append(threading.current_thread().name)
            failure()
        return real(fd, data, offset)

    monkeypatch.setattr(parallel_io, "_pwrite", pwrite)
    return struck
