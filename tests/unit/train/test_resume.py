"""Killing a run and starting the same command again continues the same loss curve.

Oracle: an uninterrupted run of the same command. The killed run is SIGKILLed while it writes its
step-6 checkpoint, after it has logged steps 5 and 6, so the resumed run must start from the
step-4 checkpoint, ignore the half-written one, drop the logged steps it re-does, and reproduce
every loss, gradient norm, learning rate and validation loss bit for bit, and the final weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import run_shoal_process, shoal_stalling_at, subprocess_env
from tests.helpers.training import TrainAssets, read_dcp, read_metrics, train_args, train_records, val_records

# Killed in the middle of the step-6 checkpoint's write.
STALLING_SHOAL = shoal_stalling_at(6)


def kill_mid_checkpoint(args: list[str], cwd: Path, checkpoints: Path, timeout: float = 300) -> None:
    proc = subprocess.Popen([sys.executable, "-c", STALLING_SHOAL, *args], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not list(checkpoints.glob(".step=000006*/model.stalled")):
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, "the run did not reach its step-6 checkpoint in time"
            time.sleep(0.2)
        assert list(checkpoints.glob("step=000004*")), "the step-4 checkpoint should be complete by now"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shoal.cli", *args], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.parametrize("stage, extra", [
    ("pretrain", []),
    # Dropout in the adapters draws random numbers every step: the RNG state must be restored too.
    ("finetune", ["--peft", "lora", "--peft.dropout=0.2", "--peft.rank=4"]),
    # DoRA's magnitudes train too: its adapter-only checkpoints must carry them and their moments.
    ("finetune", ["--peft", "dora", "--peft.dropout=0.2", "--peft.rank=4"]),
    # Killed while the step-6 checkpoint is written in the background (the loop waits for it at the end).
    ("pretrain", ["--checkpoint.async_save=true"]),
])
def test_killed_run_resumes_on_the_same_curve(train_assets: TrainAssets, tmp_path: Path, stage: str, extra: list[str]):
    # One DataLoader worker, as the recipe has it: the resumed loader must not count prefetched batches.
    common = ["--max_steps", "6", "--checkpoint.save_interval=2", "--train.val_check_interval=2",
              "--data.num_workers=1", *extra]
    reference = start(train_args(train_assets, stage, tmp_path / "ref", "run", *common), tmp_path)
    args = train_args(train_assets, stage, tmp_path / "res", "run", *common)
    exp = tmp_path / "res" / "run"
    try:
        kill_mid_checkpoint(args, tmp_path, exp / "checkpoints")
    finally:
        finish(reference)
    killed = train_records(exp)
    assert max(killed) == 6, "the killed run should have logged steps past its last complete checkpoint"

    resumed = run_shoal_process(args, tmp_path)
    assert "resuming" in resumed.stderr and "(step 4)" in resumed.stderr

    ref_exp = tmp_path / "ref" / "run"
    expected, got = train_records(ref_exp), train_records(exp)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        for key in ("loss", "grad_norm", "lr", "consumed_samples"):
            assert got[step][key] == expected[step][key], (
                f"step {step}: {key} {got[step][key]} != {expected[step][key]}")
    assert val_records(exp) == val_records(ref_exp) and sorted(val_records(exp)) == [2, 4, 6]
    assert len(read_metrics(exp)) == len(read_metrics(ref_exp))  # re-done steps are logged once

    # The final weights are the same bits, and the half-written checkpoint is gone.
    (ref_last,) = (ref_exp / "checkpoints").glob("step=000006*-last")
    (last,) = (exp / "checkpoints").glob("step=000006*-last")
    assert last.name == ref_last.name
    assert not [p.name for p in (exp / "checkpoints").iterdir() if p.name.startswith(".")]
    ref_state, state = read_dcp(ref_last / "model", tmp_path / "a.pt"), read_dcp(last / "model", tmp_path / "b.pt")
    assert ref_state.keys() == state.keys()
    for name in ref_state:
        assert torch.equal(ref_state[name], state[name]), name
