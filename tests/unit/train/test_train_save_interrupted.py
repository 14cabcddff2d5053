"""A save that fails inside torch's writer, or is interrupted by Ctrl-C, says so plainly and keeps
the previous checkpoint as it was (issue 14, item 9, the training half).

torch.save reports a failed write of its zip container (a full disk, mostly) as
`RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos ...`, not as an OSError;
and a Ctrl-C landing inside that C++ writer comes out as the same RuntimeError. Training saves now
go through shoal's own writer (shoal.checkpoint.storage), which is replaced by one that fails the
way torch's did, at the step-4 optimizer save: what such errors are reported as must not change.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest

from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, train_args

TORCH_WRITE_FAILURE = "[enforce fail at inline_container.cc:672] unexpected pos 4224 vs 4160"


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fail_optimizer_save(monkeypatch: pytest.MonkeyPatch, failure, seen: dict) -> None:
    import shoal.checkpoint.training as training

    class FailingWriter(training.SafetensorsStorageWriter):
        def write_data(self, plan, planner):
            if "step=000004" in str(self.path) and str(self.path).endswith("optim"):
                ckpts = Path(self.path).parent.parent
                (previous,) = ckpts.glob("step=000002*")
                seen[previous.name] = tree_digest(previous)
                failure()
            return super().write_data(plan, planner)

    monkeypatch.setattr(training, "SafetensorsStorageWriter", FailingWriter)


def full_disk() -> None:
    raise RuntimeError(TORCH_WRITE_FAILURE)


def ctrl_c_inside_torch_writer() -> None:
    try:
        os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt at the next bytecode
        for _ in range(10_000):
            pass
    except KeyboardInterrupt:
        raise RuntimeError(TORCH_WRITE_FAILURE) from None  # what torch's C++ writer makes of it
    pytest.fail("SIGINT was not delivered")


def ctrl_c() -> None:
    raise KeyboardInterrupt


FULL_DISK_MESSAGE = ["error:", "could not write checkpoint", "step=000004", "disk full?", "unexpected pos"]


@pytest.mark.parametrize("failure, exit_code, message, save", [
    (full_disk, 2, FULL_DISK_MESSAGE, "sync"),
    (ctrl_c_inside_torch_writer, 130, ["interrupted"], "sync"),
    (ctrl_c, 130, ["interrupted"], "sync"),
    # Written in the background: the writer's error reaches the step loop, which stops with it. (A
    # real Ctrl-C reaches the main thread, never torch's writer: tests/unit/checkpoint/test_training_async_save.py.)
    (full_disk, 2, FULL_DISK_MESSAGE, "async"),
    (ctrl_c, 130, ["interrupted"], "async"),
])
def test_failed_or_interrupted_save_keeps_the_previous_checkpoint(
        train_assets: TrainAssets, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch,
        failure, exit_code: int, message: list[str], save: str):
    ckpts = tmp_path / "res" / "e" / "checkpoints"
    seen: dict[str, dict[str, str]] = {}
    fail_optimizer_save(monkeypatch, failure, seen)
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 4, "--checkpoint.save_interval=2",
                      f"--checkpoint.async_save={save == 'async'}")
    assert shoal(*args) == exit_code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in message:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    if exit_code == 130:
        assert "could not write" not in err  # an interrupt is not reported as a disk problem

    # The step-2 checkpoint is unchanged and the only thing there (no temporary folder).
    (name,) = seen
    assert [p.name for p in ckpts.iterdir()] == [name]
    assert tree_digest(ckpts / name) == seen[name]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the save's watcher is gone

    monkeypatch.undo()
    assert shoal(*args) == 0
    assert "(step 2)" in capsys.readouterr().err
