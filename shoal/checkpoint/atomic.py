"""Publish a directory only when it is complete.

Everything is written under a hidden temporary name next to the destination and renamed into
place at the end, so a crash or a bad input midway never leaves something that looks like a
finished checkpoint or export. Renames within one filesystem are atomic on POSIX.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from shoal.errors import ShoalError, write_failure


def refuse_overlap(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str = "output") -> None:
    """Refuse an output that is one of the inputs, lies inside one, or holds one.

    Paths are compared once symlinks, `..`, trailing slashes and the current folder are resolved:
    writing into an input changes what is being read, and replacing a folder that holds an input
    deletes it. Folders that merely share a prefix (`ck` and `ck-hf`) do not overlap.
    """
    out = Path(output).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if out == source:
            relation, harm = "is the input", "writing it would replace what is being read"
        elif source in out.parents:
            relation, harm = "lies inside the input", "writing it would change what is being read"
        elif out in source.parents:
            relation, harm = "holds the input", "replacing it would delete what is being read"
        else:
            continue
        spelled = f" ({source})" if os.fspath(given) != str(source) else ""
        raise ShoalError(f"{what} {os.fspath(output)} {relation} {os.fspath(given)}{spelled} once links and "
                         f"'..' are resolved: {harm}. Choose another {what}")


def normalize_output(path: str | os.PathLike) -> Path:
    """The output as the kernel will see it: its folder resolved (links, `..`), its own name kept.

    The name is kept so that an output that is itself a symlink is replaced as a link, never
    through it; resolving the folder keeps a spelling like `out/new/../ck` from creating `new`.
    """
    out = Path(path).absolute()
    if out.name in ("", ".."):
        return out.resolve()
    return out.parent.resolve() / out.name


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output without `overwrite`, and an output whose parent is not writable."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise ShoalError(f"output {out} already exists; pass --overwrite to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists():  # the first existing ancestor is where we will need to create folders
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ShoalError(f"cannot write output {out}: {probe} is not writable")
    return out


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes `path`, on any error it is removed.

    With `overwrite`, an existing `path` is replaced only after the new one is complete. An
    OSError (disk full, permission, read-only file system) becomes a ShoalError naming the output,
    the file and the cause; folders created for the output are removed again.
    """
    out = normalize_output(check_output_dir(path, overwrite))
    created = [parent for parent in out.parents if not parent.exists()]  # deepest first
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        _publish(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        failure = write_failure(err, f"writing {out}", tmp)  # files under tmp are ours; others, inputs
        if failure is not None:
            raise failure from err
        raise


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, replacing an older `out` only once `tmp` is in place."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)  # put the previous output back
        raise
    if old is None:
        return
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()  # a link the user's output path was: the link goes, never what it pointed to
