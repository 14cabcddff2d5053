"""Launch flags: the seed's spellings parse into LaunchConfig; contradictions get clear errors."""

from __future__ import annotations

import argparse

import pytest

from shoal.config.launch import DEFAULT_TIME_LIMIT, LaunchConfig, add_launch_arguments, launch_config_from_args
from shoal.errors import ShoalError
from shoal.launch import maybe_launch

RANK_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SHOAL_LAUNCHED", "SHOAL_EXECUTOR", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def not_a_rank(monkeypatch):
    """These tests play the user's shell, not a rank, whatever runs pytest."""
    for name in RANK_ENV:
        monkeypatch.delenv(name, raising=False)


def parse(argv: list[str], experiment: str = "/tmp/exp") -> LaunchConfig:
    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    return launch_config_from_args(parser.parse_args(argv), experiment)


def test_seed_spellings_short_and_long():
    short = parse(["--executor", "slurm", "-a", "acct", "-p", "batch", "-i", "nvcr.io/nvidia/nemo:25.07",
                   "-N", "2", "-G", "8", "--dryrun", "--time", "01:30:00"])
    long = parse(["--executor=slurm", "--account", "acct", "--partition", "batch",
                  "--container_image", "nvcr.io/nvidia/nemo:25.07", "--num_nodes", "2", "--num_gpus", "8",
                  "--dryrun", "--time=01:30:00"])
    assert short == long
    assert (short.executor, short.account, short.partition) == ("slurm", "acct", "batch")
    assert (short.container_image, short.num_nodes, short.num_gpus) == ("nvcr.io/nvidia/nemo:25.07", 2, 8)
    assert short.dryrun and short.time_limit == "01:30:00"
    assert short.experiment_dir == "/tmp/exp"


def test_defaults_are_one_local_process():
    cfg = parse([])
    assert (cfg.executor, cfg.num_nodes, cfg.num_gpus, cfg.world_size) == ("local", 1, 1, 1)
    assert cfg.time_limit == DEFAULT_TIME_LIMIT and not cfg.dryrun and not cfg.requeue


def test_nicer_spellings_and_slurm_extras():
    cfg = parse(["--executor", "slurm", "--num-nodes", "3", "--num-gpus", "4", "--gpus-per-node", "0",
                 "--cpus-per-task", "16", "--job-name", "run.1", "--requeue", "--env", "NCCL_DEBUG=INFO",
                 "--env=NCCL_IB_HCA=mlx5", "--master-port", "29600", "--container-mounts", "/a:/b",
                 "-i", "img"])
    assert (cfg.num_nodes, cfg.num_gpus, cfg.gpus_per_node, cfg.gpus_requested) == (3, 4, 0, 0)
    assert (cfg.cpus_per_task, cfg.job_name, cfg.requeue, cfg.master_port) == (16, "run.1", True, 29600)
    assert cfg.env == {"NCCL_DEBUG": "INFO", "NCCL_IB_HCA": "mlx5"}
    assert cfg.container_mounts == "/a:/b"


def test_gpus_requested_follows_num_gpus_by_default():
    assert parse(["--executor", "slurm", "-G", "8"]).gpus_requested == 8


@pytest.mark.parametrize(
    "argv, words",
    [
        (["-a", "acct"], ["--account", "Slurm option", "--executor slurm"]),
        (["-p", "batch"], ["--partition", "Slurm option"]),
        (["-i", "img"], ["--container_image", "Slurm option"]),
        (["--time", "01:00:00"], ["--time", "Slurm option"]),
        (["--requeue", "-a", "x"], ["--account", "--requeue", "Slurm options"]),
        (["-N", "2", "-G", "2"], ["--num_nodes 2", "--executor slurm"]),
        (["-G", "0"], ["--num_gpus", "positive"]),
        (["--executor", "slurm", "-N", "0"], ["--num_nodes", "positive"]),
        (["--executor", "slurm", "--cpus_per_task", "0"], ["--cpus_per_task", "positive"]),
        (["--executor", "slurm", "--gpus_per_node", "-1"], ["--gpus_per_node"]),
        (["--executor", "slurm", "--time", "four hours"], ["--time", "HH:MM:SS"]),
        (["--executor", "slurm", "--container_mounts", "/a:/b"], ["--container_mounts", "--container_image"]),
        (["--executor", "slurm", "-p", "a b"], ["--partition", "without spaces"]),
        (["--executor", "slurm", "--job_name", "my job"], ["--job_name"]),
        (["--env", "HF_TOKEN=hf_x"], ["HF_TOKEN", "export"]),
        (["--env", "WANDB_API_KEY=x"], ["WANDB_API_KEY", "export"]),
        (["--env", "1BAD=x"], ["1BAD", "not a valid"]),
        (["--master_port", "70000"], ["--master_port"]),
    ],
)
def test_contradictions_and_bad_values_are_refused(argv, words):
    with pytest.raises(ShoalError) as err:
        parse(argv)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("limit", ["30", "30:00", "04:00:00", "2-00", "1-12:00", "1-12:00:00", "UNLIMITED"])
def test_slurm_time_forms_accepted(limit):
    assert parse(["--executor", "slurm", "--time", limit]).time_limit == limit


def test_abbreviated_flags_are_refused():
    # The launcher finds --executor and secret flags by their full names in the command it re-runs.
    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--exec", "slurm"])


def test_env_item_needs_name_and_value():
    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--env", "NCCL_DEBUG"])


def test_single_local_process_runs_in_place():
    assert maybe_launch(parse([]), ["shoal", "pretrain"]) is None
    # A dry run of a single process is the command's own business.
    assert maybe_launch(parse(["--dryrun"]), ["shoal", "pretrain", "--dryrun"]) is None


def test_a_rank_never_launches_and_records_the_real_layout(monkeypatch):
    # What a rank of a 2-node x 2-GPU Slurm job sees: no --executor/--num_nodes on its command line.
    monkeypatch.setenv("SHOAL_LAUNCHED", "1")
    monkeypatch.setenv("SHOAL_EXECUTOR", "slurm")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = parse(["-G", "2", "-a", "acct"])
    assert (cfg.executor, cfg.num_nodes, cfg.num_gpus, cfg.account) == ("slurm", 2, 2, "acct")
    assert maybe_launch(cfg, ["shoal", "pretrain", "-G", "2", "-a", "acct"]) is None


def test_under_plain_torchrun_layout_comes_from_torchrun(monkeypatch):
    # A user who starts torchrun on two nodes by hand: local executor, yet two nodes, is fine in a rank.
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = parse([])
    assert (cfg.executor, cfg.num_nodes, cfg.num_gpus) == ("local", 2, 2)
    assert maybe_launch(cfg, ["shoal", "pretrain"]) is None


def test_launch_config_round_trips_through_the_recipe_loader():
    # LaunchConfig is a section of the recipe that config.yaml records.
    from shoal.config.loader import from_dict, to_dict

    cfg = parse(["--executor", "slurm", "-N", "2", "-G", "8", "-a", "acct", "--env", "NCCL_DEBUG=INFO"])
    assert from_dict(LaunchConfig, to_dict(cfg)) == cfg
