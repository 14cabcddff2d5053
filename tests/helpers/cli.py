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


def shoal_stalling_at(step: int) -> str:
    """A `python -c` script running shoal that stalls (to be killed) once the step-`step`
    checkpoint's weights are on disk under their temporary name, marked by `model.stalled` beside
    them: a kill in the middle of a checkpoint write, at a moment a test can see."""
    return f"""
import sys, time
import shoal.checkpoint.training as training
real_save = training.save_model_state
def save_then_stall(state, model_dir, *args, **kwargs):
    real_save(state, model_dir, *args, **kwargs)
    if "step={step:06d}" in str(model_dir):
        open(str(model_dir) + ".stalled", "w").close()
        time.sleep(600)
training.save_model_state = save_then_stall
from shoal.cli import main
sys.exit(main(sys.argv[1:]))
"""
