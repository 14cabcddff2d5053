"""One run at a time per experiment (issue 14, item 4).

Before the lock, two runs of one experiment both crashed at their first save, logged every metric
twice and shared one temporary folder. Here a first run is held inside its step-2 save (so it
certainly holds the experiment) while one or two more runs of the same command start: they must be
refused at once, naming the holder, and change nothing; the first then finishes as if alone.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cli import shoal, subprocess_env
from tests.helpers.training import TrainAssets, checkpoint_names, read_metrics, train_args

# Runs shoal, but waits inside the step-2 save (weights written) until the test creates GO_FILE.
WAITING_SHOAL = """
import os, sys, time
import shoal.checkpoint.training as training
real_save = training.save_model_state
def save_then_wait(state, model_dir, *args, **kwargs):
    real_save(state, model_dir, *args, **kwargs)
    if "step=000002" in str(model_dir):
        open(os.environ["WAITING_FILE"], "w").close()
        while not os.path.exists(os.environ["GO_FILE"]):
            time.sleep(0.1)
training.save_model_state = save_then_wait
from shoal.cli import main
sys.exit(main(sys.argv[1:]))
"""


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".distcp") and p.name != ".lock"}


@pytest.mark.parametrize("others", [1, 2])
def test_concurrent_runs_are_refused(train_assets: TrainAssets, tmp_path: Path, others: int):
    results = tmp_path / "res"
    exp = results / "e"
    args = train_args(train_assets, "pretrain", results, "e", "--max_steps", 3, "--checkpoint.save_interval=2")
    env = {**subprocess_env(), "WAITING_FILE": str(tmp_path / "waiting"), "GO_FILE": str(tmp_path / "go")}
    first = subprocess.Popen([sys.executable, "-c", WAITING_SHOAL, *args], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "waiting").exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run did not reach its step-2 save"
            time.sleep(0.2)
        before = snapshot(exp)
        rivals = [subprocess.Popen([sys.executable, "-m", "shoal.cli", *args], cwd=tmp_path, env=subprocess_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                  for _ in range(others)]
        for rival in rivals:
            _, err = rival.communicate(timeout=300)
            assert rival.returncode == 2, err[-3000:]
            assert "is in use by another run" in err and f"pid {first.pid}" in err, err[-3000:]
            assert socket.gethostname() in err and "Traceback" not in err
        assert snapshot(exp) == before  # the refused runs wrote nothing
        (tmp_path / "go").touch()
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        (tmp_path / "go").touch()
        if first.poll() is None:
            first.kill()
            first.wait()

    assert [r["step"] for r in read_metrics(exp) if "loss" in r] == [1, 2, 3]  # each step logged once
    assert checkpoint_names(exp) == sorted(n for n in checkpoint_names(exp) if not n.startswith("."))
    assert [n[:11] for n in checkpoint_names(exp)] == ["step=000003"]
    assert (exp / ".lock").read_text() == ""  # released at the end of the run


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_of_a_dead_process_is_taken_over(train_assets: TrainAssets, tmp_path: Path, capsys):
    results = tmp_path / "res"
    exp = results / "e"
    args = train_args(train_assets, "pretrain", results, "e", "--max_steps", 2)
    assert shoal(*args) == 0
    # As a killed run leaves it: its pid in the lock file, and a temporary checkpoint folder.
    pid = dead_pid()
    (exp / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": time.time()}))
    left = exp / "checkpoints" / ".step=000003-last.tmp-0123456789ab"
    (left / "model").mkdir(parents=True)
    capsys.readouterr()

    args[args.index("--max_steps") + 1] = "3"
    assert shoal(*args) == 0
    err = capsys.readouterr().err
    assert "taking over the lock" in err and f"pid {pid}" in err
    assert not left.exists()
    assert [n[:11] for n in checkpoint_names(exp)] == ["step=000003"]
    assert (exp / ".lock").read_text() == ""


def test_run_refused_by_a_check_leaves_no_experiment_folder(train_assets: TrainAssets, tmp_path: Path, capsys):
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 2, "--seq_length", 100000)
    assert shoal(*args) == 2
    assert "max_position_embeddings" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()
