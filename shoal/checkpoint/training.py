"""Training checkpoints: one call to save (every file, then retention), one call to restore.

A training checkpoint is a shoal checkpoint (`shoal.json`, `tokenizer/`, `model/`, `peft.json`
when the model carries adapters; a LoRA/DoRA run's `model/` holds only what trains, and
`shoal.json` names the base checkpoint for the rest) plus `optim/` (DCP of the optimizer state; absent with
checkpoint.save_optimizer=false) and `trainer.json` (step, data position, RNG states of every
rank). All ranks write their shards of `model/` and `optim/` through DCP, so a checkpoint saved
with one parallel layout loads into another. It is written under a hidden temporary name and
renamed when complete, so a failed or killed save leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from shoal.checkpoint.catalog import (
    apply_retention,
    checkpoint_name,
    list_checkpoints,
    remove_checkpoint,
    temporary_name,
)
from shoal.checkpoint.format import (
    MODEL_DIR,
    OPTIM_DIR,
    _dcp_errors,
    save_model_state,
    write_metadata,
    write_peft_config,
    write_tokenizer_snapshot,
)
from shoal.checkpoint.state import load_model_into, load_optimizers_into, parts_model_state, parts_optimizer_state
from shoal.errors import ShoalError
from shoal.models.config import ModelConfig
from shoal.peft.config import LoraConfig

TRAINER_FILE = "trainer.json"


@dataclass(frozen=True)
class Progress:
    """Where a run is: optimizer steps taken and the global samples/tokens they consumed."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"step": self.step, "consumed_samples": self.consumed_samples, "consumed_tokens": self.consumed_tokens}


@dataclass(frozen=True)
class CheckpointRecord:
    """What each checkpoint of a run records beside the live state; taken once at the run's start
    (the tokenizer's bytes too), so nothing depends on a checkpoint retention may delete."""

    model_config: ModelConfig
    tokenizer: dict[str, bytes] | None = None
    peft: LoraConfig | None = None
    made_by: dict[str, Any] = field(default_factory=dict)
    # Carried from the start checkpoint as it came (generation config, the source's dtype, ...).
    extra: dict[str, Any] = field(default_factory=dict)
    # The run's id, agreed by all ranks: it names the run's temporary checkpoint folders.
    run_id: str = ""
    # A LoRA/DoRA run's base checkpoint (`shoal.checkpoint.base.base_reference`): when set, `model/`
    # holds only the tensors that train and shoal.json names this base for the rest.
    base: dict[str, Any] | None = None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _rng_state() -> dict[str, str]:
    """This rank's RNG states, base64 so they fit in JSON."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict[str, str]) -> None:
    def decode(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(state["cuda"]))


def _gather_rng_states() -> list[dict[str, str]]:
    mine = _rng_state()
    if not _distributed():
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def save_training_checkpoint(
    root: Path,
    parts: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer] | None,
    progress: Progress,
    record: CheckpointRecord,
    *,
    max_steps: int,
    val_loss: float | None,
    save_top_k: int,
) -> Path:
    """Write a complete checkpoint of the live model (and optimizers, unless None), then apply
    retention (the best `save_top_k` by validation loss plus the newest); every rank calls this."""
    final = root / checkpoint_name(progress.step, val_loss)
    tmp = root / temporary_name(final.name, record.run_id)  # the same on every rank, so all shards meet
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    interrupts = _InterruptWatch()
    try:
        save_model_state(parts_model_state(parts, trained_only=record.base is not None), tmp / MODEL_DIR)
        if optimizers is not None:
            with _dcp_errors():  # DCP's wrapped errors unwrapped (a full disk is an OSError), its notices quiet
                dcp.save(parts_optimizer_state(parts, optimizers),
                         storage_writer=dcp.FileSystemWriter(str(tmp / OPTIM_DIR)), no_dist=not _distributed())
        trainer_state = {**progress.as_dict(), "max_steps": max_steps, "val_loss": val_loss,
                         "rng": _gather_rng_states()}
        if rank == 0:
            (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=1))
            _write_record(tmp, record, progress)
    except BaseException as err:  # KeyboardInterrupt too: the CLI says "interrupted", nothing is left half-written
        interrupts.stop()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if interrupts.seen and not isinstance(err, KeyboardInterrupt):
            # Ctrl-C inside torch.save's C++ writer comes out as its RuntimeError: it was an interrupt.
            raise KeyboardInterrupt from err
        if isinstance(err, OSError) or _is_write_failure(err):
            raise ShoalError(_write_failure_message(final, root, err)) from err
        raise
    interrupts.stop()
    _barrier()
    if rank == 0:
        for old in list_checkpoints(root):
            if old.last:  # only the newest carries `-last`
                old.path.rename(root / checkpoint_name(old.step, old.val_loss, last=False))
        if final.exists():  # the same step saved again (e.g. a resumed run's last step)
            remove_checkpoint(final)
        tmp.rename(final)
        apply_retention(root, save_top_k)
    _barrier()
    return final


class _InterruptWatch:
    """Notes a Ctrl-C (SIGINT) during a save while letting Python raise KeyboardInterrupt as usual,
    so an error it turns into further down (torch's writer) is still reported as an interrupt."""

    def __init__(self) -> None:
        self.seen = False
        self._previous = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.seen = True
        signal.default_int_handler(signum, frame)

    def stop(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


# torch.save reports a failed write (a full disk, mostly) as a RuntimeError of its zip writer.
_WRITE_FAILURES = ("inline_container", "unexpected pos", "PytorchStreamWriter", "file write failed")


def _is_write_failure(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(mark in str(err) for mark in _WRITE_FAILURES)


def _write_failure_message(final: Path, root: Path, err: BaseException) -> str:
    """The path, what the system said, and the likely cause: free space is checked to say "disk full"."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    text = str(err).strip()
    said = text.splitlines()[0] if text else type(err).__name__
    if getattr(err, "errno", None) == 28 or (free is not None and free < 64 * 2**20):  # ENOSPC, under 64 MiB
        hint = "disk full" + (f": {free / 2**20:.0f} MiB free" if free is not None else "")
    elif getattr(err, "errno", None) == 13:
        hint = "permission denied"
    else:
        hint = "disk full?" + (f" {free / 2**30:.1f} GiB free" if free is not None else "")
    return f"could not write checkpoint {final}: {said} ({hint}); earlier checkpoints are kept"


def _write_record(ckpt: Path, record: CheckpointRecord, progress: Progress) -> None:
    write_metadata(ckpt, record.model_config, dtype="float32", progress=progress.as_dict(),
                   made_by=record.made_by, extra=record.extra, base=record.base)
    if record.tokenizer:
        write_tokenizer_snapshot(record.tokenizer, ckpt)
    if record.peft is not None:
        write_peft_config(ckpt, record.peft)


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / TRAINER_FILE
    if not path.exists():
        raise ShoalError(f"{ckpt} is not a training checkpoint (no {TRAINER_FILE}); pass it as the starting model instead")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShoalError(f"{path}: not valid JSON ({err})") from None


def restore_training_checkpoint(
    ckpt: Path, parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer],
    base: Path | None = None,
) -> Progress:
    """Load the model, the optimizers and this rank's RNG state; returns where the run was.
    `base`: where an adapter-only checkpoint's base is, when not where it records (checked)."""
    state = read_trainer_state(ckpt)
    for part in parts:
        load_model_into(part, ckpt, base=base)
    if (ckpt / OPTIM_DIR).is_dir():
        load_optimizers_into(parts, optimizers, ckpt)
    elif _rank() == 0:
        print(f"shoal: warning: {ckpt} holds no optimizer state (checkpoint.save_optimizer=false); "
              "AdamW's moments restart from zero", file=sys.stderr)
    rng = state["rng"]
    rank = _rank()
    _set_rng_state(rng[rank] if rank < len(rng) else rng[0])
    return Progress(state["step"], state["consumed_samples"], state["consumed_tokens"])
