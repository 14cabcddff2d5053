"""The demo's working folder: made and marked by the demo, and cleared only when the demo made it.

`shoal demo --workdir DIR` writes everything under DIR and starts fresh on a rerun. Starting fresh
must never cost the user data: a folder is reused only when it is new, empty, or carries the marker
file the demo leaves when it makes one; anything else is refused before a file is touched. Even in
its own folder the demo removes only the artifacts it makes, so a note the user left there stays.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from shoal.errors import ShoalError

MARKER = ".shoal_demo"
_MARKER_TEXT = ("This folder was made by `shoal demo`. A rerun of the demo with this --workdir replaces\n"
                "the artifacts it made here (and nothing else).\n")


def prepare_workdir(work: Path, artifacts: list[Path], keep: bool = False) -> Path:
    """Make `work` ready for the demo: created and marked, or checked to be the demo's own.

    `artifacts` are the top-level paths under `work` that the demo writes; unless `keep`, those left
    by an earlier run are removed. Raises ShoalError, having changed nothing, for a file or for a
    non-empty folder the demo did not make.
    """
    work = Path(work).resolve()
    if work.exists() and not work.is_dir():
        raise ShoalError(f"--workdir {work} is a file, not a folder; pass a new or empty folder "
                         "(default ./shoal_demo)")
    if work.is_dir() and not (work / MARKER).is_file() and any(work.iterdir()):
        raise ShoalError(
            f"--workdir {work} is not empty and was not made by `shoal demo` (no {MARKER} file in it), "
            "so the demo will not write into it; nothing was changed. Pass --workdir with a new or empty "
            "folder (the default is ./shoal_demo), or move its contents elsewhere first."
        )
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text(_MARKER_TEXT, encoding="utf-8")
    if not keep:
        for path in artifacts:
            if path.parent != work:
                raise ValueError(f"demo artifact {path} is not directly under {work}")
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    return work
