"""The ranks' command line: the user's, minus launcher-only flags and secrets (which move to the environment)."""

from __future__ import annotations

import pytest

from shoal.launch.command import rank_arguments


@pytest.mark.parametrize(
    "launcher_flags",
    [
        ["--executor", "slurm", "-N", "2", "--dryrun"],
        ["--executor=slurm", "--num_nodes=2", "--dry-run"],
        ["executor=slurm", "num_nodes=2"],  # NeMo style, which shoal.cli accepts
        ["-N2", "--executor", "slurm"],
        ["--num-nodes", "2", "--executor", "slurm"],
    ],
)
def test_launcher_flags_are_removed_and_the_rest_kept_in_order(launcher_flags):
    user = ["-E", "exp", "-G", "8", "--max_steps", "10", "-a", "acct"]
    argv = ["/venv/bin/shoal", "pretrain", *user[:2], *launcher_flags, *user[2:]]
    args, env = rank_arguments(argv)
    assert args == ["pretrain", *user]
    assert env == {}


@pytest.mark.parametrize(
    "secret_flags, expected_env",
    [
        (["--hf_token", "hf_abcdefgh123"], {"HF_TOKEN": "hf_abcdefgh123"}),
        (["--hf_token=hf_abcdefgh123", "--wandb_token", "wb_0123456789"],
         {"HF_TOKEN": "hf_abcdefgh123", "WANDB_API_KEY": "wb_0123456789"}),
        (["wandb_token=wb_0123456789"], {"WANDB_API_KEY": "wb_0123456789"}),
    ],
)
def test_secrets_move_from_the_command_line_to_the_environment(secret_flags, expected_env):
    argv = ["shoal", "finetune", "-G", "2", *secret_flags, "--peft", "lora"]
    args, env = rank_arguments(argv)
    assert args == ["finetune", "-G", "2", "--peft", "lora"]
    assert env == expected_env


def test_arguments_after_double_dash_are_left_alone():
    args, env = rank_arguments(["shoal", "x", "--", "--executor", "slurm", "--hf_token", "t"])
    assert args == ["x", "--", "--executor", "slurm", "--hf_token", "t"]
    assert env == {}
