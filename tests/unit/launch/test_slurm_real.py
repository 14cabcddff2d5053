"""`--executor slurm` against a real Slurm: munge, slurmctld and two slurmd on this machine.

The selftest is submitted as a user would submit training, through the real `sbatch`; the job
spans the cluster's two nodes (one rank each), so the rendezvous and node ranks come from Slurm's
environment as on a real cluster. Slurm's own record of the job and the ranks' report are the
oracles. Without Slurm these tests skip, except under `.ci/run` (SHOAL_REQUIRE_SLURM=1), where
the packages are installed and a cluster that does not start is a failure.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

HF_SECRET = "hf_slurmSecret0123456789"
WANDB_SECRET = "wandbSlurmSecret0123456789"


def submit(cluster, experiment: Path, *extra: str) -> tuple[str, str]:
    """Submit the selftest on 2 nodes x 1 CPU rank; return the job id and what the command printed."""
    command = [
        sys.executable, "-m", "shoal.launch.selftest", "--executor", "slurm", "--experiment", str(experiment),
        "--output", str(experiment / "result.json"), "-N", "2", "-G", "1", "--gpus_per_node", "0",
        "-p", cluster.partition, "-a", "shoal-test", "--time", "00:10:00", *extra,
    ]
    env = {**cluster.env, "OMP_NUM_THREADS": "1", "HF_TOKEN": HF_SECRET}
    for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SHOAL_LAUNCHED", "SHOAL_EXECUTOR"):
        env.pop(name, None)
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=experiment.parent)
    assert run.returncode == 0, run.stdout + run.stderr
    first = run.stdout.splitlines()[0]
    assert first.startswith("shoal: submitted Slurm job "), run.stdout
    return first.split("job ")[1].split(":")[0], run.stdout


def test_selftest_job_runs_one_rank_on_each_node(slurm_cluster, tmp_path):
    exp = tmp_path / "exp"
    job_id, printed = submit(slurm_cluster, exp, "--wandb_token", WANDB_SECRET)
    out_file = exp / "slurm" / f"exp-{job_id}.out"
    assert str(out_file) in printed
    state = slurm_cluster.wait_for_job(job_id)
    err_file = exp / "slurm" / f"exp-{job_id}.err"
    output = out_file.read_text() if out_file.exists() else "(no output file)"
    errors = err_file.read_text() if err_file.exists() else ""
    assert state == "COMPLETED", f"{state}\n{output}\n{errors}\n{slurm_cluster.logs()}"

    result = json.loads((exp / "result.json").read_text())
    ranks = result["ranks"]
    assert result["world_size"] == 2 and result["rank_sum"] == sum(range(2))
    assert [r["rank"] for r in ranks] == [0, 1]
    # One rank per node, each node's rank from Slurm's SLURM_NODEID, both in this job.
    assert [r["node_rank"] for r in ranks] == [0, 1]
    assert sorted(r["slurm_nodename"] for r in ranks) == sorted(slurm_cluster.nodes)
    assert {r["slurm_job_id"] for r in ranks} == {job_id}
    # Secrets reached every rank through sbatch's environment ...
    for name, value in (("HF_TOKEN", HF_SECRET), ("WANDB_API_KEY", WANDB_SECRET)):
        assert all(r["secrets"].get(name) == hashlib.sha256(value.encode()).hexdigest() for r in ranks)
    # ... and are in no file of the experiment, the job script included.
    script = exp / "slurm" / "exp.sbatch"
    assert script.exists()
    for path in exp.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert HF_SECRET not in text and WANDB_SECRET not in text, path
    # Rank 0 prints to the job's output file, rank 1 to its own log.
    assert "selftest: ok, 2 rank(s)" in output
    assert "selftest: rank 1 of 2" in (exp / "logs" / "rank1.log").read_text()
    # Slurm recorded the account and time limit the command asked for.
    record = slurm_cluster.run("scontrol", "show", "job", "-o", job_id).stdout
    assert "Account=shoal-test" in record and "TimeLimit=00:10:00" in record and "NumNodes=2" in record


def test_a_failing_rank_fails_the_whole_job(slurm_cluster, tmp_path):
    exp = tmp_path / "exp"
    start = time.monotonic()
    # Rank 1 (the second node) fails at once; rank 0 would sleep 5 minutes unless srun stops it.
    job_id, _ = submit(slurm_cluster, exp, "--fail_rank", "1", "--sleep", "300")
    state = slurm_cluster.wait_for_job(job_id, timeout=150)
    assert state == "FAILED", f"{state}\n{slurm_cluster.logs()}"
    assert time.monotonic() - start < 150
    assert not (exp / "result.json").exists()
    assert "RuntimeError: selftest: rank 1 fails on purpose" in (exp / "logs" / "rank1.log").read_text()
