"""Training checkpoints: one call to save (every file, then retention), one call to restore.

A training checkpoint is a shoal checkpoint (`shoal.json`, `tokenizer/`, `model/`, `peft.json`
when the model carries adapters; a LoRA/DoRA run's `model/` holds only what trains, and
`shoal.json` names the base checkpoint for the rest) plus `optim/` (DCP of the optimizer state; absent with
checkpoint.save_optimizer=false) and `trainer.json` (step, data position, RNG states of every
rank). All ranks write their shards of `model/` and `optim/` through DCP, so a checkpoint saved
with one parallel layout loads into another, with shoal's storage writer
(`shoal.checkpoint.storage`: safetensors data files, several threads per rank, an error in any of
them fails the save); checkpoints of torch's `FileSystemWriter` (`.distcp`) still restore. It is
written under a hidden temporary name and renamed when complete, so a failed or killed save
leaves the previous checkpoints as they were.

A save runs in the step loop (`save_training_checkpoint`) or in the background
(checkpoint.async_save, `TrainingCheckpoints`): the state is copied to CPU memory, the loop goes
on, and a thread writes the same files, renaming the folder only once every rank's write has
succeeded. Its failure stops the run at the next step with the message a synchronous save gives.
"""

from __future__ import annotations

import base64
import contextlib
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

from shoal.checkpoint.background import BackgroundTask, CpuStaging, all_ranks_agree, background_group
from shoal.checkpoint.catalog import (
    apply_retention,
    checkpoint_name,
    list_checkpoints,
    remove_checkpoint,
    temporary_name,
)
from shoal.checkpoint.format import MODEL_DIR, OPTIM_DIR, write_metadata, write_peft_config, write_tokenizer_snapshot
from shoal.checkpoint.model_state import _dcp_errors, save_model_state
from shoal.checkpoint.state import load_model_into, load_optimizers_into, parts_model_state, parts_optimizer_state
from shoal.checkpoint.storage import SafetensorsStorageWriter
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


def background_saves(setting: bool | str, device: torch.device) -> bool:
    """checkpoint.async_save resolved: "auto" writes in the background on a GPU, in the step loop on CPU."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def checkpoint_tensors(
    parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer] | None, *, trained_only: bool = False
) -> dict[str, dict[str, Any]]:
    """The tensors a training checkpoint holds, by DCP folder: `model/` (only what trains when
    `trained_only`: an adapter-only checkpoint, see shoal.checkpoint.base), and `optim/` unless
    `optimizers` is None. The one place that chooses them, for synchronous and background saves."""
    tensors = {MODEL_DIR: parts_model_state(parts, trained_only=trained_only)}
    if optimizers is not None:
        tensors[OPTIM_DIR] = parts_optimizer_state(parts, optimizers)
    return tensors


def _trainer_state(progress: Progress, max_steps: int, val_loss: float | None) -> dict[str, Any]:
    """trainer.json's content; the RNG states are taken now, from every rank (a collective)."""
    return {**progress.as_dict(), "max_steps": max_steps, "val_loss": val_loss, "rng": _gather_rng_states()}


def _open_temporary(root: Path, progress: Progress, val_loss: float | None, run_id: str) -> tuple[Path, Path]:
    """The checkpoint's final path and its empty temporary folder, made by rank 0 before any rank writes."""
    final = root / checkpoint_name(progress.step, val_loss)
    tmp = root / temporary_name(final.name, run_id)  # the same on every rank, so all shards meet
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    return final, tmp


def _write_files(tmp: Path, tensors: dict[str, dict[str, Any]], trainer_state: dict[str, Any],
                 record: CheckpointRecord, progress: Progress, group: dist.ProcessGroup | None = None) -> None:
    """Every file of the checkpoint into `tmp`: each rank its DCP shards (collectives over
    `group`, the default group when None), rank 0 trainer.json and the record."""
    save_model_state(tensors[MODEL_DIR], tmp / MODEL_DIR, process_group=group,
                     storage_writer=SafetensorsStorageWriter(tmp / MODEL_DIR))
    if OPTIM_DIR in tensors:
        with _dcp_errors():  # DCP's wrapped errors unwrapped (a full disk is an OSError), its notices quiet
            dcp.save(tensors[OPTIM_DIR], storage_writer=SafetensorsStorageWriter(tmp / OPTIM_DIR),
                     process_group=group, no_dist=not _distributed())
    if _rank() == 0:
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=1))
        _write_record(tmp, record, progress)


def _publish(root: Path, final: Path, tmp: Path, save_top_k: int) -> None:
    """Rank 0: the finished `tmp` becomes the `-last` checkpoint, then retention."""
    for old in list_checkpoints(root):
        if old.last:  # only the newest carries `-last`
            old.path.rename(root / checkpoint_name(old.step, old.val_loss, last=False))
    if final.exists():  # the same step saved again (e.g. a resumed run's last step)
        remove_checkpoint(final)
    tmp.rename(final)
    apply_retention(root, save_top_k)


def _save_error(err: BaseException, final: Path, root: Path) -> BaseException:
    """What a failed write is reported as: a ShoalError for a write failure, else the error itself."""
    if isinstance(err, OSError) or _is_write_failure(err):
        return ShoalError(_write_failure_message(final, root, err))
    return err


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
    final, tmp = _open_temporary(root, progress, val_loss, record.run_id)
    rank = _rank()
    interrupts = _InterruptWatch()
    try:
        _write_files(tmp, checkpoint_tensors(parts, optimizers, trained_only=record.base is not None), _trainer_state(progress, max_steps, val_loss),
                     record, progress)
    except BaseException as err:  # KeyboardInterrupt too: the CLI says "interrupted", nothing is left half-written
        interrupts.stop()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if interrupts.seen and not isinstance(err, KeyboardInterrupt):
            # Ctrl-C inside torch.save's C++ writer comes out as its RuntimeError: it was an interrupt.
            raise KeyboardInterrupt from err
        failure = _save_error(err, final, root)
        if failure is err:
            raise
        raise failure from err
    interrupts.stop()
    _barrier()
    if rank == 0:
        _publish(root, final, tmp, save_top_k)
    _barrier()
    return final


class TrainingCheckpoints:
    """The run's checkpoint saves, in the step loop or in the background.

    In the background (checkpoint.async_save), `save` stages the state to CPU memory and returns;
    a thread writes the checkpoint under its temporary name, and once every rank's write has
    succeeded, rank 0 renames it and applies retention. At most one save is in flight: `save`
    first waits for the previous one. A failed background save is raised by the next `poll` (the
    loop calls it every step) or `save` or `finish`, with the message a synchronous save gives.
    Each of these calls prints, on rank 0, the checkpoints that became complete.
    """

    def __init__(self, root: Path, record: CheckpointRecord, *, max_steps: int, save_top_k: int, background: bool):
        self.root, self.record = root, record
        self.max_steps, self.save_top_k = max_steps, save_top_k
        self.background = background
        self._staging = CpuStaging(reuse=torch.cuda.is_available()) if background else None
        self._group = background_group() if background else None
        self._pending: BackgroundTask[Path | None] | None = None
        self._pending_name = ""
        self._pending_tmp: Path | None = None
        self.last: Path | None = None

    def save(self, parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer] | None,
             progress: Progress, val_loss: float | None) -> None:
        """A checkpoint of the live state at `progress` (every rank calls this at the same step)."""
        if not self.background:
            self._saved(save_training_checkpoint(self.root, parts, optimizers, progress, self.record,
                                                 max_steps=self.max_steps, val_loss=val_loss,
                                                 save_top_k=self.save_top_k))
            return
        self.finish()  # at most one save in flight; its failure stops the run here
        final, tmp = _open_temporary(self.root, progress, val_loss, self.record.run_id)
        try:
            staged = self._staging.stage(checkpoint_tensors(parts, optimizers, trained_only=self.record.base is not None))
            trainer_state = _trainer_state(progress, self.max_steps, val_loss)
        except BaseException:
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._pending_name, self._pending_tmp = final.name, tmp
        # Tracked before its thread starts: a Ctrl-C landing in `start` must find it to drop it.
        self._pending = BackgroundTask(
            lambda aborted: self._write_and_publish(final, tmp, staged, trainer_state, progress, aborted),
            name=f"shoal-checkpoint-{final.name}")
        self._pending.start()

    def _write_and_publish(self, final: Path, tmp: Path, staged: dict[str, dict[str, Any]],
                           trainer_state: dict[str, Any], progress: Progress,
                           aborted: threading.Event) -> Path | None:
        """The background thread's part: write, agree, publish (rank 0), agree again."""
        error: BaseException | None = None
        try:
            _write_files(tmp, staged, trainer_state, self.record, progress, self._group)
        except BaseException as err:
            error = err
        written = all_ranks_agree(error is None and not aborted.is_set(), self._group)
        published = False
        if _rank() == 0:
            try:
                if written:
                    _publish(self.root, final, tmp, self.save_top_k)
                    published = True
            except BaseException as err:  # a kill mid-retention (tests), a failed rename
                error = err
                published = not tmp.exists()  # renamed, then retention failed: the checkpoint is complete
            finally:
                if not published:
                    shutil.rmtree(tmp, ignore_errors=True)
        published = all_ranks_agree(published or _rank() != 0, self._group)
        if error is not None:
            failure = _save_error(error, final, self.root)
            if failure is error:
                raise error
            raise failure from error
        if not written:
            if aborted.is_set():
                return None
            raise ShoalError(f"could not write checkpoint {final}: another rank's write failed (its log says why); "
                             "earlier checkpoints are kept")
        if not published:
            raise ShoalError(f"could not publish checkpoint {final}: rank 0 failed (its log says why); "
                             "earlier checkpoints are kept")
        return final

    def poll(self) -> None:
        """Raise the failure of a background save that has ended; say a finished one."""
        if self._pending is not None and self._pending.done():
            self.finish()

    def finish(self) -> Path | None:
        """Wait for the save in flight (if any), then return the newest complete checkpoint of this run."""
        pending = self._pending
        if pending is not None:
            pending.wait()  # a Ctrl-C here leaves it in flight, for `abort` to drop
            self._pending = None
            self._saved(pending.result())
        return self.last

    def abort(self) -> None:
        """Ctrl-C: the save in flight is dropped (as a synchronous save interrupted midway would
        be), once its thread has stopped; a second Ctrl-C stops waiting for it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.done():  # it ended before the interrupt (a complete checkpoint is kept), or never started
            with contextlib.suppress(Exception):
                self._saved(pending.result())
            self._drop_unpublished()
            return
        pending.aborted.set()
        if _rank() == 0:
            print(f"shoal: interrupted while {self._pending_name} was being written in the background: "
                  "waiting for its writer to stop, then dropping it (Ctrl-C again to leave at once)",
                  file=sys.stderr, flush=True)
        pending.wait()  # what it raised is dropped with it: the interrupt is what is reported
        self._drop_unpublished()

    def _drop_unpublished(self) -> None:
        """The interrupted save's temporary folder, if its writer did not get to remove it (it was
        interrupted before its thread ran)."""
        if _rank() == 0 and self._pending_tmp is not None and self._pending_tmp.exists():
            shutil.rmtree(self._pending_tmp, ignore_errors=True)

    def settle(self) -> None:
        """After another error: the save in flight is finished and kept (its state is from before the
        error); its own failure is printed, since the first error is the one reported."""
        try:
            self.finish()
        except Exception as err:
            if _rank() == 0:
                print(f"shoal: warning: {err}", file=sys.stderr)

    def __enter__(self) -> TrainingCheckpoints:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.finish()
        elif issubclass(kind, KeyboardInterrupt):
            self.abort()
        else:
            self.settle()

    def _saved(self, path: Path | None) -> None:
        if path is None:
            return
        self.last = path
        if _rank() == 0:
            print(f"shoal: saved {path}", file=sys.stderr)


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
