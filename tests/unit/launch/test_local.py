"""`--executor local` with 2 CPU processes, through torchrun, running the launch selftest.

The oracle is what the ranks themselves report (their rank ids all-reduced over gloo, their pids)
and the state of their processes afterwards, not the launcher's own word.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SECRET = "hf_localSecret0123456789"
TIMEOUT_S = 120


def selftest_command(experiment: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "shoal.launch.selftest", "--experiment", str(experiment),
            "--output", str(experiment / "result.json"), "-G", "2", *extra]


def clean_env() -> dict[str, str]:
    """The user's shell: not inside any rank; few threads, as the CI machine has two cores."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SHOAL_LAUNCHED", "SHOAL_EXECUTOR", "HF_TOKEN")}
    return env | {"OMP_NUM_THREADS": "1"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie nobody reaped yet has stopped running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rank_pids(experiment: Path) -> dict[int, int]:
    return {int(p.stem[4:]): int(p.read_text()) for p in (experiment / "selftest").glob("rank*.pid")}


def test_two_cpu_ranks_run_and_rank0_is_shown(tmp_path):
    exp = tmp_path / "exp"
    run = subprocess.run(selftest_command(exp, "--hf_token", SECRET), env=clean_env(), capture_output=True,
                         text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((exp / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["rank_sum"] == sum(range(2))  # each rank contributed its own id
    ranks = result["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["local_rank"] for r in ranks} == {0, 1}
    assert len({r["pid"] for r in ranks}) == 2
    # Rank 0 on the terminal, rank 1 in its log only.
    assert "selftest: rank 0 of 2" in run.stdout and "selftest: ok, 2 rank(s)" in run.stdout
    assert "rank 1 of 2" not in run.stdout + run.stderr
    assert "selftest: rank 1 of 2" in (exp / "logs" / "rank1.log").read_text()
    # The secret reached both ranks through the environment, and no file holds it.
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    assert all(r["secrets"].get("HF_TOKEN") == digest for r in ranks)
    for path in exp.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path


def test_a_failing_rank_ends_the_run_and_its_error_is_shown(tmp_path):
    exp = tmp_path / "exp"
    start = time.monotonic()
    # Rank 1 fails at once; rank 0 would sleep for 5 minutes unless the launcher stops it.
    run = subprocess.run(selftest_command(exp, "--fail_rank", "1", "--sleep", "300"), env=clean_env(),
                         capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert run.returncode == 1, run.stdout + run.stderr  # the failing rank's exit status
    assert elapsed < 90
    assert "rank 1 failed with exit status 1" in run.stderr
    assert "RuntimeError: selftest: rank 1 fails on purpose" in run.stderr
    assert not (exp / "result.json").exists()
    pids = rank_pids(exp)
    assert set(pids) == {0, 1}
    assert not any(alive(pid) for pid in pids.values())


def test_ctrl_c_stops_every_rank(tmp_path):
    exp = tmp_path / "exp"
    # A shell ignores SIGINT in background jobs and children inherit that (CI run with `&`); a
    # terminal's Ctrl-C reaches a launcher that has the default disposition, so give it that.
    proc = subprocess.Popen(selftest_command(exp, "--sleep", "300"), env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while len(rank_pids(exp)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        pids = rank_pids(exp)
        assert len(pids) == 2, proc.communicate(timeout=5)
        # Only the launcher gets the signal (it runs torchrun in a session of its own).
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err
    assert not (exp / "result.json").exists()
    assert not any(alive(pid) for pid in pids.values())


def test_local_dry_run_prints_torchrun_and_starts_nothing(tmp_path):
    exp = tmp_path / "exp"
    run = subprocess.run(selftest_command(exp, "--dryrun"), env=clean_env(), capture_output=True, text=True,
                         timeout=TIMEOUT_S, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "-m torch.distributed.run --standalone --nproc_per_node=2 -m shoal.launch.worker shoal.launch.selftest" \
        in run.stdout
    assert "--dryrun" not in run.stdout
    assert not exp.exists()
