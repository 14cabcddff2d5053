"""The `shoal` command run as a test runs it: in this process, or as a child process.

In-process runs are fast and let a test patch shoal's internals; a child process is what a user
gets (its own interpreter, real signals, the command line that logs and wandb see). Children run
one thread each so that their numbers do not depend on how busy the machine is, and inherit
PYTHONPATH, so they import the same shoal as the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def shoal(*args: object) -> int:
    """`shoal ARGS` in this process; returns the exit code."""
    from shoal.cli import main

    return main([str(a) for a in args])


def subprocess_env() -> dict[str, str]:
    """One thread per process, so results do not depend on how busy the machine is."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0")
    return env


def run_shoal_process(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m shoal.cli ARGS` as a child process; fails the test with its output if it fails."""
    proc = subprocess.run([sys.executable, "-m", "shoal.cli", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"shoal {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc
