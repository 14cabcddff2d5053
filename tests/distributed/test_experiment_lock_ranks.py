"""The experiment lock and the run id over two ranks (issue 14, item 4).

Rank 0 takes the lock and every rank must hear its verdict: a run refused because the experiment
is in use ends on both ranks at once, not at the collective timeout. When it runs, both ranks write
into one temporary folder named by the run id rank 0 chose, so the published checkpoint holds
every rank's shards: the completeness rule (every file DCP's metadata names) is the check.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from shoal.checkpoint.catalog import is_complete, list_checkpoints
from shoal.checkpoint.lock import acquire_experiment_lock
from tests.helpers.cli import subprocess_env
from tests.helpers.training import TrainAssets, train_args

RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SHOAL_LAUNCHED", "SHOAL_EXECUTOR")


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in subprocess_env().items() if k not in RANK_ENV}
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_two_ranks_refused_together_then_one_checkpoint_from_both(train_assets: TrainAssets, tmp_path: Path):
    exp = tmp_path / "res" / "e"
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 2, "--num_gpus", "2")
    lock = acquire_experiment_lock(exp)  # another run holds the experiment: this test process
    try:
        started = time.monotonic()
        proc = run(args, tmp_path)
        assert proc.returncode != 0
        assert time.monotonic() - started < 120  # both ranks ended, neither waited for the other
        assert "is in use by another run" in proc.stderr + proc.stdout and f"pid {os.getpid()}" in proc.stderr + proc.stdout
        assert not (exp / "checkpoints").exists() and not (exp / "config.yaml").exists()
    finally:
        lock.release()

    proc = run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (only,) = list_checkpoints(exp / "checkpoints")
    assert only.step == 2 and is_complete(only.path)
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == [only.path.name]  # no temporary folder left
