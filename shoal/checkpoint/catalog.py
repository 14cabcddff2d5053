"""An experiment's checkpoints: their names, which are complete, the latest and the best, retention.

    RESULTS/EXPERIMENT/checkpoints/step=NNNNNN-val_loss=X.XXX[-last]/

A folder counts as a checkpoint only when it is complete: `shoal.json` is there and every file
that DCP's metadata of `model/` (and `optim/`, when present) names exists at its full length; a
folder without `.metadata` needs safetensors data files whose headers are valid, whose bytes are
all there and whose chunks tile every tensor (`shoal.checkpoint.data_files.folder_complete`). A
save appears under its final name only by a rename of a finished temporary folder, and a deleted
checkpoint is first renamed to a hidden name, so a kill at any moment never leaves a folder that
looks valid but is not. This module is the only place that knows the names.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from shoal.checkpoint.data_files import folder_complete
from shoal.checkpoint.format import METADATA_FILE, MODEL_DIR, OPTIM_DIR, is_checkpoint
from shoal.errors import ShoalError

_NAME = re.compile(r"^step=(\d+)(?:-val_loss=([0-9.]+|nan|inf))?(-last)?$")
CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    val_loss: float | None
    last: bool


def checkpoint_name(step: int, val_loss: float | None, last: bool = True) -> str:
    name = f"step={step:06d}"
    if val_loss is not None:
        name += f"-val_loss={val_loss:.3f}" if math.isfinite(val_loss) else "-val_loss=nan"
    return name + ("-last" if last else "")


def parse_checkpoint_name(path: Path) -> CheckpointInfo | None:
    m = _NAME.match(path.name)
    if m is None:
        return None
    return CheckpointInfo(path, int(m.group(1)), float(m.group(2)) if m.group(2) else None, bool(m.group(3)))


def is_complete(ckpt: Path) -> bool:
    """shoal.json, and model/ (and optim/) complete by `data_files.folder_complete`."""
    if not (ckpt / METADATA_FILE).is_file():
        return False
    if not folder_complete(ckpt / MODEL_DIR):
        return False
    return not (ckpt / OPTIM_DIR).exists() or folder_complete(ckpt / OPTIM_DIR)


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints under `root`, oldest first: by step, and at equal steps `-last` last."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            info = parse_checkpoint_name(child)
            if info is not None and child.is_dir() and is_complete(child):
                found.append(info)
    return sorted(found, key=lambda c: (c.step, c.last, c.path.name))


def latest_checkpoint(root: Path) -> CheckpointInfo | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def best_checkpoint(root: Path) -> CheckpointInfo | None:
    """Lowest finite validation loss (the later step on a tie); the latest when none was validated."""
    found = list_checkpoints(root)
    scored = [c for c in found if c.val_loss is not None and math.isfinite(c.val_loss)]
    if scored:
        return min(scored, key=lambda c: (c.val_loss, -c.step))
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike, which: str = "latest") -> Path:
    """A checkpoint directory from a checkpoint, a `checkpoints/` folder or an experiment folder.

    In the last two cases `which` ("latest" or "best") of the complete checkpoints inside is taken.
    """
    path = Path(path)
    if is_checkpoint(path):
        if not is_complete(path):
            raise ShoalError(f"checkpoint {path} is incomplete: data files of {MODEL_DIR}/ (or {OPTIM_DIR}/) are "
                             "missing or truncated (a save or a deletion was interrupted); use another checkpoint")
        return path
    if not path.exists():
        raise ShoalError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise ShoalError(f"{path} is a file, not a checkpoint folder")
    pick = best_checkpoint if which == "best" else latest_checkpoint
    for folder in (path / CHECKPOINTS_DIR, path):
        found = pick(folder)
        if found is not None:
            return found.path
    if (path / "config.json").is_file():
        raise ShoalError(f"{path} is not a shoal checkpoint but a Hugging Face model folder; "
                         f"convert it first: shoal import --source {path} --output_path CKPT")
    raise ShoalError(
        f"{path} is not a shoal checkpoint ({METADATA_FILE} is missing) and holds no complete "
        "checkpoints named step=NNNNNN-... (directly or under checkpoints/)"
    )


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that no moment of it looks valid: rename it out of the namespace first."""
    hidden = path.with_name(f".deleting-{path.name}-{uuid.uuid4().hex[:8]}")
    path.rename(hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def temporary_name(final_name: str, run_id: str) -> str:
    """The hidden name a save is written under: the run's id in it, so two runs never share one."""
    return f".{final_name}.tmp-{run_id}" if run_id else f".{final_name}.tmp"


def remove_leftovers(root: Path, temporaries: bool = True) -> None:
    """Finish deletions a killed process left behind (hidden `.deleting-*` folders) and, with
    `temporaries`, drop the temporary folders of saves that never finished. The latter only when
    a run takes the experiment lock, before it writes: no save can be in progress then."""
    if root.is_dir():
        for child in root.iterdir():
            unfinished = temporaries and child.name.startswith(".step=") and ".tmp" in child.name
            if child.name.startswith(".deleting-") or unfinished:
                shutil.rmtree(child, ignore_errors=True)


def apply_retention(root: Path, save_top_k: int) -> None:
    """Keep the `save_top_k` checkpoints with the lowest validation loss, and the newest one."""
    found = list_checkpoints(root)
    if not found:
        return
    keep = {found[-1].path}
    scored = [c for c in found if c.val_loss is not None and math.isfinite(c.val_loss)]
    ranked = sorted(scored, key=lambda c: (c.val_loss, -c.step)) if scored else sorted(found, key=lambda c: -c.step)
    keep.update(c.path for c in ranked[: max(0, save_top_k)])
    for c in found:
        if c.path not in keep:
            remove_checkpoint(c.path)
    # Temporary folders stay: retention runs inside a save (in a background thread too), and one it
    # did not make may be a save still being written, the next run's when this writer outlived its
    # interrupted run (a second Ctrl-C stops waiting for it). A dead run's go when a run takes the lock.
    remove_leftovers(root, temporaries=False)
