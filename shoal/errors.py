"""The one exception type that reaches the user as a message rather than a traceback."""

from __future__ import annotations

import errno
import os


class ShoalError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The message should name the file, line or key at fault and say what was expected.
    `shoal.cli` prints it as `shoal <command>: error: <message>` and exits with status 2.
    """


# What the user should read for the errors a full, protected or failing disk gives.
_CAUSES = {
    errno.ENOSPC: "no space left on the device (disk full)",
    errno.EDQUOT: "disk quota exceeded (disk full for this user)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.ENOENT: "no such file or directory",
    errno.EIO: "input/output error (a failing disk or network file system?)",
    errno.EINTR: "interrupted",
    errno.EFBIG: "file too large for this file system",
}


def io_error(err: OSError, doing: str, nothing_left: bool = True,
             output_folder: str | os.PathLike | None = None) -> ShoalError:
    """A ShoalError for an OSError met while `doing` (e.g. "writing /out"): the path and the cause.

    `nothing_left` adds that nothing half-written was kept, which the caller must have made true.
    With `output_folder`, a failing file outside it is named as an input being read.
    """
    cause = _CAUSES.get(err.errno) or err.strerror or str(err) or type(err).__name__
    where = ""
    if err.filename:
        where = f" ({os.fspath(err.filename)})"
        if output_folder is not None and not os.path.abspath(os.fspath(err.filename)).startswith(
                os.path.join(os.path.abspath(output_folder), "")):
            where = f" while reading {os.fspath(err.filename)}"  # the input failed, not the output
    tail = "; nothing was written (an earlier output, if any, is as it was)" if nothing_left else ""
    return ShoalError(f"{doing} failed{where}: {cause}{tail}")


# torch.save reports a failed write (a full disk, mostly) as a RuntimeError from its C++ zip writer.
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed writing", "inline_container.cc")


def write_failure(err: BaseException, doing: str, folder: str | os.PathLike | None = None) -> ShoalError | None:
    """The ShoalError for an exception that means a write failed, or None when it means something else.

    Covers OSError and the RuntimeError torch.save raises when its writes fail; for the latter the
    free space of `folder`'s file system is given, since a full disk is the usual cause.
    """
    if isinstance(err, OSError):
        return io_error(err, doing, output_folder=folder)
    if isinstance(err, RuntimeError) and any(mark in str(err) for mark in _TORCH_WRITE_FAILURES):
        free = ""
        if folder is not None:
            import shutil

            probe = os.path.abspath(folder)
            while not os.path.exists(probe) and os.path.dirname(probe) != probe:
                probe = os.path.dirname(probe)
            with_space = shutil.disk_usage(probe).free
            free = f"; {with_space / 2**20:.1f} MiB are free on the file system of {probe}"
            if with_space < 64 << 20:
                free += " (the disk is nearly full)"
        return ShoalError(f"{doing} failed: torch's file writer stopped ({str(err).splitlines()[0].strip()}), "
                          f"which a full disk causes{free}; nothing was written (an earlier output, if any, "
                          "is as it was)")
    return None
