"""`shoal pretrain --executor slurm` through a real Slurm (munge, slurmctld and two slurmd on this
machine, from tests/helpers/slurm_cluster.py): the job trains the tiny model as 2 CPU ranks, one per
node, and checkpoints. The oracle is the same run in one local process: the data-parallel job
must log the same losses. Skips without Slurm, except under `.ci/run` (SHOAL_REQUIRE_SLURM=1).
"""

from __future__ import annotations

import math
import subprocess
import sys

from tests.helpers.cli import run_shoal_process, subprocess_env
from tests.helpers.training import checkpoint_names, train_args, train_records


def test_slurm_job_trains_on_two_nodes_like_one_process(slurm_cluster, train_assets, tmp_path):
    results = tmp_path / "results"
    args = train_args(train_assets, "pretrain", results, "slurm_run", "--max_steps", "2",
                      "--checkpoint.save_interval=2")
    command = [sys.executable, "-m", "shoal.cli", *args, "--executor", "slurm", "-N", "2", "-G", "1",
               "--gpus_per_node", "0", "-p", slurm_cluster.partition, "-a", "shoal-test", "--time", "00:10:00"]
    env = {**subprocess_env(), **slurm_cluster.env}
    for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SHOAL_LAUNCHED", "SHOAL_EXECUTOR"):
        env.pop(name, None)
    submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.splitlines()[0].split("job ")[1].split(":")[0]
    state = slurm_cluster.wait_for_job(job_id, timeout=300)
    logs = "\n".join(p.read_text() for p in (results / "slurm_run" / "slurm").glob("*.*") if p.is_file())
    assert state == "COMPLETED", f"{state}\n{logs}\n{slurm_cluster.logs()}"

    # It trained and checkpointed, as 2 ranks (one per Slurm node) ...
    exp = results / "slurm_run"
    assert checkpoint_names(exp) and checkpoint_names(exp)[-1].startswith("step=000002")
    assert (exp / "logs" / "rank1.log").exists()
    # ... and its losses are the one-process run's on the same data.
    run_shoal_process(train_args(train_assets, "pretrain", results, "one_process", "--max_steps", "2"), tmp_path)
    job, alone = train_records(exp), train_records(results / "one_process")
    assert sorted(job) == sorted(alone) == [1, 2]
    for step in job:
        assert math.isclose(job[step]["loss"], alone[step]["loss"], rel_tol=1e-5), (step, job[step], alone[step])
