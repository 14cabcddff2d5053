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


def io_error(err: OSError, doing: str, nothing_left: bool = True) -> ShoalError:
    """A ShoalError for an OSError met while `doing` (e.g. "writing export /out"): the path and the cause.

    `nothing_left` adds that nothing half-written was kept, which the caller must have made true.
    """
    cause = _CAUSES.get(err.errno) or err.strerror or str(err) or type(err).__name__
    where = f" ({os.fspath(err.filename)})" if err.filename else ""
    tail = "; nothing was written (an earlier output, if any, is as it was)" if nothing_left else ""
    return ShoalError(f"{doing} failed{where}: {cause}{tail}")
