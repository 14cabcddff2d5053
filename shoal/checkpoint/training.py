"""Training checkpoints: save, find, resume, and keep the best k by validation loss plus the last.

A training checkpoint is a shoal checkpoint (`shoal.json`, `tokenizer/`, `model/`) plus `optim/`
(DCP of the optimizer state) and `trainer.json` (step, data position, RNG states, validation
history). All ranks write their shards of `model/` and `optim/` through DCP, so a checkpoint saved
with one parallel layout loads into another. Names follow NeMo's spirit:
`checkpoints/step=000100-val_loss=1.234-last/`. A checkpoint is written under a hidden temporary
name and renamed only when complete, so a failed or killed save leaves the previous one intact.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from shoal.checkpoint.format import _dcp_errors, save_model_state
from shoal.errors import ShoalError

_NAME = re.compile(r"^step=(\d+)(?:-val_loss=([0-9.]+|nan|inf))?(-last)?$")


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


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints under `root`, oldest first (temporary folders are not listed)."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = _NAME.match(child.name)
            if m and child.is_dir() and (child / "shoal.json").exists():
                val = float(m.group(2)) if m.group(2) else None
                found.append(CheckpointInfo(child, int(m.group(1)), val, bool(m.group(3))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(root: Path) -> CheckpointInfo | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rng_state() -> dict[str, str]:
    """This rank's RNG states, base64 so they fit in JSON."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, str]) -> None:
    def decode(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(state["cuda"]))


def gather_rng_states() -> list[dict[str, str]]:
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def save_training_checkpoint(
    root: Path,
    step: int,
    val_loss: float | None,
    model_state: dict[str, Any],
    optim_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    write_static: Callable[[Path], None],
    save_top_k: int,
) -> Path:
    """Write a complete checkpoint and apply retention; every rank must call this.

    `write_static(dir)` writes the rank-0 files (`shoal.json`, `tokenizer/`, `peft.json`).
    `optim_state` None writes no `optim/` folder (checkpoint.save_optimizer=false).
    """
    final = root / checkpoint_name(step, val_loss)
    tmp = root / f".{final.name}.tmp"  # the same name on every rank, so all shards meet
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        save_model_state(model_state, tmp / "model")
        with _dcp_errors():  # DCP's wrapped errors unwrapped (a full disk is an OSError), its notices quiet
            if optim_state is not None:
                dcp.save(optim_state, storage_writer=dcp.FileSystemWriter(str(tmp / "optim")),
                         no_dist=not (dist.is_available() and dist.is_initialized()))
        trainer_state = {**trainer_state, "rng": gather_rng_states()}
        if rank == 0:
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
            write_static(tmp)
    except BaseException as err:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk or a lost mount: the user's problem, said plainly
            raise ShoalError(f"could not write checkpoint {final}: {err}; earlier checkpoints are kept") from err
        raise
    _barrier()
    if rank == 0:
        for old in list_checkpoints(root):
            if old.last:  # only the newest carries `-last`
                old.path.rename(root / checkpoint_name(old.step, old.val_loss, last=False))
        if final.exists():  # the same step saved again (e.g. a resumed run's last step)
            shutil.rmtree(final)
        tmp.rename(final)
        apply_retention(root, save_top_k)
    _barrier()
    return final


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
            shutil.rmtree(c.path, ignore_errors=True)


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / "trainer.json"
    if not path.exists():
        raise ShoalError(f"{ckpt} is not a training checkpoint (no trainer.json); pass it as the starting model instead")
    return json.loads(path.read_text())
