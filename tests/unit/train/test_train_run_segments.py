"""A run's segments: resume=false in a used experiment, and resuming with changed settings
(issue 14, items 5 and 6).

Before: `--checkpoint.resume=false` trained in an experiment with checkpoints and retention then
deleted the new run's checkpoints (the old run's last step sorted newer), so metrics.jsonl no
longer matched; a resume with another --global_batch_size/--seq_length/--dataset_path went on
silently from a data position counted in other units, and config.yaml lost the old settings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from shoal.checkpoint.catalog import list_checkpoints, resolve_checkpoint
from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, checkpoint_names, read_metrics, train_args


def steps_logged(folder: Path) -> list[int]:
    return [r["step"] for r in read_metrics(folder) if "loss" in r]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_false_is_refused_in_a_used_experiment(train_assets: TrainAssets, tmp_path: Path, capsys):
    results = tmp_path / "res"
    exp = results / "e"
    assert shoal(*train_args(train_assets, "pretrain", results, "e", "--max_steps", 4)) == 0
    before = tree(exp)
    capsys.readouterr()
    assert shoal(*train_args(train_assets, "pretrain", results, "e", "--max_steps", 2,
                             "--checkpoint.resume=false")) == 2
    err = capsys.readouterr().err
    assert "--checkpoint.resume=false" in err and "--checkpoint.new_run=true" in err and "step=000004" in err
    assert tree(exp) == before  # nothing changed, not even config.yaml


def test_new_run_keeps_both_runs_apart(train_assets: TrainAssets, tmp_path: Path, capsys):
    results = tmp_path / "res"
    exp = results / "e"
    assert shoal(*train_args(train_assets, "pretrain", results, "e", "--max_steps", 4)) == 0
    old_names, old_metrics = checkpoint_names(exp), (exp / "metrics.jsonl").read_bytes()
    old_config = (exp / "config.yaml").read_bytes()
    capsys.readouterr()

    # The new run stops at step 2, which sorts before the old run's step 4.
    assert shoal(*train_args(train_assets, "pretrain", results, "e", "--max_steps", 2,
                             "--checkpoint.new_run=true", "--train.lr=1e-3")) == 0
    assert "previous run is kept in" in capsys.readouterr().err
    old = exp / "runs" / "1"
    assert checkpoint_names(old) == old_names
    assert (old / "metrics.jsonl").read_bytes() == old_metrics and (old / "config.yaml").read_bytes() == old_config
    # The new run's records describe the new run only, and what the experiment resolves to is its checkpoint.
    assert [n[:11] for n in checkpoint_names(exp)] == ["step=000002"]
    assert steps_logged(exp) == [1, 2]
    assert resolve_checkpoint(exp).name.startswith("step=000002")
    assert yaml.safe_load((exp / "config.yaml").read_text())["train"]["lr"] == 1e-3
    # Resuming the experiment continues the new run, not the old one.
    assert shoal(*train_args(train_assets, "pretrain", results, "e", "--max_steps", 3, "--train.lr=1e-3")) == 0
    assert "(step 2)" in capsys.readouterr().err
    assert steps_logged(exp) == [1, 2, 3] and [c.step for c in list_checkpoints(exp / "checkpoints")] == [3]
    assert checkpoint_names(old) == old_names  # the old run untouched


@pytest.mark.parametrize("change, shown", [
    (["-g", "8"], ["--global_batch_size is 8", "used 4"]),
    (["--seq_length", "16"], ["--seq_length is 16", "used 32"]),
    (["--data.seed=7"], ["--data.seed is 7", "used 1234"]),
])
def test_resume_with_changed_data_settings_is_refused(train_assets: TrainAssets, tmp_path: Path, capsys,
                                                      change: list[str], shown: list[str]):
    results = tmp_path / "res"
    exp = results / "e"
    assert shoal(*train_args(train_assets, "pretrain", results, "e", "--max_steps", 2)) == 0
    before = tree(exp)
    capsys.readouterr()
    assert shoal(*train_args(train_assets, "pretrain", results, "e", "--max_steps", 4, *change)) == 2
    err = capsys.readouterr().err
    for fragment in [*shown, "--experiment", "--checkpoint.allow_changed_data=true", "Traceback"][:-1]:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert tree(exp) == before

    # Told to, it resumes; both segments' settings stay on record, config.yaml shows the newest.
    assert shoal(*train_args(train_assets, "pretrain", results, "e", "--max_steps", 3, *change,
                             "--checkpoint.allow_changed_data=true")) == 0
    segments = [json.loads(line) for line in (exp / "runs.jsonl").read_text().splitlines()]
    assert [s["start_step"] for s in segments] == [0, 2]
    key = {"-g": "global_batch_size", "--seq_length": "seq_length"}.get(change[0], "data_seed")
    assert segments[0]["settings"][key] != segments[1]["settings"][key]
    assert segments[0]["recipe"]["data"]["seq_length"] == 32


def test_another_dataset_is_refused_and_another_spelling_of_it_is_not(train_assets: TrainAssets, tmp_path: Path,
                                                                      capsys):
    results = tmp_path / "res"
    assert shoal(*train_args(train_assets, "pretrain", results, "e", "--max_steps", 2)) == 0
    other = tmp_path / "other"
    other.mkdir()
    for f in train_assets.data_dir.glob("corpus*"):
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    args = train_args(train_assets, "pretrain", results, "e", "--max_steps", 3)
    args[args.index("--dataset_path") + 1] = str(other)
    capsys.readouterr()
    assert shoal(*args) == 2
    assert "--dataset_path is" in capsys.readouterr().err
    # The same folder spelled relative to the working directory, through `..`: the same data.
    spelled = os.path.relpath(train_assets.data_dir / ".." / train_assets.data_dir.name)
    args[args.index("--dataset_path") + 1] = spelled
    assert shoal(*args) == 0


def test_other_changes_are_logged(train_assets: TrainAssets, tmp_path: Path, capsys):
    results = tmp_path / "res"
    assert shoal(*train_args(train_assets, "pretrain", results, "e", "--max_steps", 2)) == 0
    capsys.readouterr()
    assert shoal(*train_args(train_assets, "pretrain", results, "e", "--max_steps", 3, "--train.lr=1e-3",
                             "-m", "1")) == 0
    err = capsys.readouterr().err
    assert "resuming with lr 0.001" in err and "resuming with micro_batch_size 1 (was 2)" in err
    assert "resuming with max_steps 3 (was 2)" in err
