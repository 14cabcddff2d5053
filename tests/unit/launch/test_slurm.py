"""The sbatch script (dry run) and its submission, with `sbatch` missing, refusing, or accepting.

The script is checked the way Slurm and bash read it: `bash -n` for syntax, the `#SBATCH` header
for what is asked of the scheduler, the body for what runs. The real cluster test is
test_slurm_real.py.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from shoal.config.launch import add_launch_arguments, launch_config_from_args
from shoal.errors import ShoalError
from shoal.launch import maybe_launch

HF_SECRET = "hf_dryRunSecret0123456789"
WANDB_SECRET = "wandb0123456789abcdefSecret"
ENV_SECRET = "hf_fromTheEnvironment987654"


@pytest.fixture(autouse=True)
def users_shell(monkeypatch):
    for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SHOAL_LAUNCHED", "SHOAL_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", ENV_SECRET)


def launch(argv: list[str], experiment: Path, capsys) -> tuple[int | None, str, str]:
    """Run maybe_launch as `shoal pretrain ARGV` would; return its status, stdout and stderr."""
    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    parser.add_argument("--hf_token")
    parser.add_argument("--wandb_token")
    parser.add_argument("-E")
    cfg = launch_config_from_args(parser.parse_args(argv), experiment)
    status = maybe_launch(cfg, ["/venv/bin/shoal", "pretrain", *argv], experiment)
    out, err = capsys.readouterr()
    return status, out, err


def header(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


SEED = ["--executor", "slurm", "-E", "exp", "-a", "acct", "-p", "batch", "-N", "2", "-G", "8", "--time", "02:00:00",
        "--hf_token", HF_SECRET, "--wandb_token", WANDB_SECRET]


def test_dry_run_script_is_valid_and_asks_for_what_was_given(tmp_path, capsys):
    status, script, err = launch([*SEED, "--dryrun"], tmp_path / "exp", capsys)
    assert status == 0 and "nothing submitted" in err
    path = tmp_path / "script.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert script.startswith("#!/bin/bash\n")
    options = header(script)
    for expected in ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=8",
                     "--account=acct", "--partition=batch", "--time=02:00:00", "--job-name=exp", "--export=ALL"]:
        assert expected in options
    slurm_dir = tmp_path / "exp" / "slurm"
    assert f"--output={slurm_dir}/%x-%j.out" in options and f"--error={slurm_dir}/%x-%j.err" in options
    # Nothing is written by a dry run.
    assert not (tmp_path / "exp").exists()


def test_node_count_is_stated_once(tmp_path, capsys):
    _, script, _ = launch([*SEED, "-N", "3", "--dryrun"], tmp_path / "exp", capsys)
    body = "\n".join(line for line in script.splitlines() if not line.startswith("#")).replace(str(tmp_path), "TMP")
    assert header(script).count("--nodes=3") == 1
    assert not re.search(r"\b3\b", body.replace("--nproc_per_node=8", "")), body
    # torchrun takes the count and this node's rank from Slurm, the rendezvous from the first node.
    assert '--nnodes="$SLURM_NNODES"' in body and '--node_rank="$SLURM_NODEID"' in body
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in body
    assert "--num_nodes" not in script and "-N " not in body


def test_the_job_does_not_submit_again_and_holds_no_secret(tmp_path, capsys):
    _, script, _ = launch([*SEED, "--dryrun"], tmp_path / "exp", capsys)
    for secret in (HF_SECRET, WANDB_SECRET, ENV_SECRET):
        assert secret not in script
    assert "--hf_token" not in script and "--wandb_token" not in script
    assert "--executor" not in script and "--dryrun" not in script
    # ... but the rest of the user's command is what the ranks run.
    srun = script[script.index("srun "):]
    assert "-m shoal.launch.worker shoal.cli pretrain -E exp -a acct -p batch -G 8 --time 02:00:00" in srun


def test_container_options_only_with_an_image_and_only_on_srun(tmp_path, capsys):
    _, plain, _ = launch([*SEED, "--dryrun"], tmp_path / "exp", capsys)
    assert "--container" not in plain
    _, boxed, _ = launch([*SEED, "-i", "nvcr.io/nvidia/pytorch:25.01-py3", "--container_mounts", "/lustre:/lustre",
                          "--dryrun"], tmp_path / "exp", capsys)
    assert not any("container" in option.split("=")[0] for option in header(boxed))
    srun = next(line for line in boxed.splitlines() if line.startswith("srun "))
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in srun
    assert "--container-mounts=/lustre:/lustre" in srun


def test_cpu_only_job_asks_for_no_gpu(tmp_path, capsys):
    flags = ["--executor", "slurm", "-G", "2", "--gpus_per_node", "0", "--dryrun"]
    _, script, _ = launch(flags, tmp_path / "e", capsys)
    assert not any("gpu" in option for option in header(script))
    assert "--cpus-per-task=2" in header(script) and "--nproc_per_node=2" in script


def test_requeue_asks_slurm_to_warn_and_requeues_on_the_warning(tmp_path, capsys):
    _, plain, _ = launch([*SEED, "--dryrun"], tmp_path / "exp", capsys)
    assert "--requeue" not in header(plain) and "trap" not in plain
    _, script, _ = launch([*SEED, "--requeue", "--dryrun"], tmp_path / "exp", capsys)
    options = header(script)
    assert "--requeue" in options and "--open-mode=append" in options
    signal = next(o for o in options if o.startswith("--signal="))
    assert re.fullmatch(r"--signal=B:USR1@\d+", signal)
    assert re.search(r"trap '.*scontrol requeue \"\$SLURM_JOB_ID\"' USR1", script)
    path = tmp_path / "requeue.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_env_settings_are_exported_to_the_job(tmp_path, capsys):
    _, script, _ = launch([*SEED, "--env", "NCCL_IB_HCA=mlx5 x", "--dryrun"], tmp_path / "exp", capsys)
    assert "export NCCL_IB_HCA='mlx5 x'" in script


def test_a_secret_hidden_in_another_argument_is_refused(tmp_path, capsys):
    with pytest.raises(ShoalError, match="secret"):
        launch([*SEED, "--job_name", "x", "--time", "01:00:00", "--partition", "p",
                "--env", f"NOTE={HF_SECRET}", "--dryrun"], tmp_path / "exp", capsys)


def fake_sbatch(bin_dir: Path, body: str) -> None:
    """An `sbatch` on PATH that runs `body` (a shell snippet) instead of talking to Slurm."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / "sbatch"
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_missing_sbatch_is_a_clear_error_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(ShoalError, match=r"sbatch.*on PATH.*--dryrun"):
        launch(SEED, tmp_path / "exp", capsys)
    assert not (tmp_path / "exp").exists()


def test_refused_submission_shows_what_sbatch_said(tmp_path, capsys, monkeypatch):
    fake_sbatch(tmp_path / "bin",
                'echo "sbatch: error: Invalid account or account/partition combination specified" >&2; exit 1')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    with pytest.raises(ShoalError) as err:
        launch(SEED, tmp_path / "exp", capsys)
    assert "sbatch refused" in str(err.value)
    assert "Invalid account or account/partition combination specified" in str(err.value)


def test_submission_prints_the_job_and_passes_secrets_in_the_environment(tmp_path, capsys, monkeypatch):
    record = tmp_path / "sbatch-call"
    fake_sbatch(tmp_path / "bin", f'echo "$@" > {record}.args; env > {record}.env; echo "4242;cluster"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    status, out, _ = launch(SEED, tmp_path / "exp", capsys)
    assert status == 0
    script = tmp_path / "exp" / "slurm" / "exp.sbatch"
    assert Path(f"{record}.args").read_text().split() == ["--parsable", str(script)]
    assert "4242" in out and str(tmp_path / "exp" / "slurm" / "exp-4242.out") in out
    text = script.read_text()
    assert HF_SECRET not in text and WANDB_SECRET not in text
    env = Path(f"{record}.env").read_text().splitlines()
    # The flag's value wins over the shell's HF_TOKEN, as the user asked for it on this command.
    assert f"HF_TOKEN={HF_SECRET}" in env and f"WANDB_API_KEY={WANDB_SECRET}" in env
    # Slurm writes into these folders: they must exist before the job starts.
    assert (tmp_path / "exp" / "logs").is_dir()
