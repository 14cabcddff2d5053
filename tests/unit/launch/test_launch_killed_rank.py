"""A rank killed by a signal is the one the launcher names (issue 14 item 9).

Two CPU ranks through torchrun; rank 1 SIGKILLs itself (as the out-of-memory killer would) while rank 0
waits for it in an all-reduce. Rank 0 then fails too, with a gloo error it reports itself; the
launcher used to blame rank 0. The oracle is the pid rank 1 recorded and the signal it died of.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

TIMEOUT_S = 120


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SHOAL_LAUNCHED", "SHOAL_EXECUTOR", "HF_TOKEN")}
    return env | {"OMP_NUM_THREADS": "1"}


def test_the_rank_killed_by_a_signal_is_named(tmp_path):
    exp = tmp_path / "exp"
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "shoal.launch.selftest", "--experiment", str(exp),
                          "--output", str(exp / "result.json"), "-G", "2", "--kill_rank", "1"],
                         env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    assert time.monotonic() - start < 90
    assert run.returncode == 128 + 9, run.stdout + run.stderr  # a shell's status for death by SIGKILL
    assert "rank 1 was killed by signal 9 (SIGKILL)" in run.stderr, run.stderr
    assert "rank 0 failed with" not in run.stderr
    killed_pid = int((exp / "selftest" / "rank1.pid").read_text())
    assert f"pid {killed_pid}" in run.stderr, run.stderr
    assert not (exp / "result.json").exists()


def test_a_rank_that_raises_is_still_named_as_before(tmp_path):
    exp = tmp_path / "exp"
    run = subprocess.run([sys.executable, "-m", "shoal.launch.selftest", "--experiment", str(exp),
                          "--output", str(exp / "result.json"), "-G", "2", "--fail_rank", "1"],
                         env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    # Rank 0 then fails in the all-reduce too: rank 1, which raised first, is the one named.
    assert ("rank 1 failed with exit status 1" in run.stderr or "rank 1 first, with exit status 1" in run.stderr), \
        run.stderr
    assert "killed by signal" not in run.stderr


def torchrun_summary(tmp_path: Path, failures: dict[int, tuple[int, int]], root: int) -> Path:
    """torchrun.log ending in the summary torch itself writes for `failures` {rank: (exitcode, timestamp)}."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    records = {}
    for rank, (code, stamp) in failures.items():
        record = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file=str(tmp_path / "none"))
        record.timestamp = stamp
        records[rank] = record
    error = ChildFailedError("shoal.launch.worker", records)
    assert error.get_first_failure()[0] == root  # torch's own choice of the root cause
    log = tmp_path / "torchrun.log"
    log.write_text("earlier lines\n" + error.format_msg() + "\n")
    return log


def test_the_signal_death_is_found_even_when_an_echo_is_torchruns_root_cause(tmp_path):
    from shoal.launch.local import _signal_death

    # Seen in the same poll, the survivor's exit may come first: the SIGKILLed rank is still the death.
    log = torchrun_summary(tmp_path, {0: (1, 100), 1: (-9, 101)}, root=0)
    assert _signal_death(log, 0) == (1, 9, 1001)
    log = torchrun_summary(tmp_path, {0: (-15, 101), 1: (-9, 100)}, root=1)
    assert _signal_death(log, 0) == (1, 9, 1001)
    # Ranks stopped by torchrun (SIGTERM) after a real error are not deaths; plain errors are not either.
    log = torchrun_summary(tmp_path, {0: (1, 100), 1: (-15, 101)}, root=0)
    assert _signal_death(log, 0) is None
    log = torchrun_summary(tmp_path, {0: (1, 100), 1: (1, 101)}, root=0)
    assert _signal_death(log, 0) is None
    # Only this run's part of the log counts.
    assert _signal_death(log, log.stat().st_size) is None


def test_a_survivor_that_aborts_after_reporting_its_error_does_not_hide_the_killed_rank(tmp_path, capsys):
    """Seen in CI: rank 0 reported its gloo error, then died of SIGABRT in gloo's teardown."""
    import json

    from shoal.launch.local import _report_failure

    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    torchrun_summary(log_dir, {0: (-6, 100), 1: (-9, 100)}, root=0)
    status_dir = tmp_path / "status"
    status_dir.mkdir()
    (status_dir / "rank0.json").write_text(json.dumps({"rank": 0, "exit_code": 1, "time": 100.5, "host": "vm"}))
    assert _report_failure(1, status_dir, log_dir) == 128 + 9
    err = capsys.readouterr().err
    assert "rank 1 was killed by signal 9 (SIGKILL) (pid 1001)" in err, err
    assert "Rank 0 failed after it" in err, err
