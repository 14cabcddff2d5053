"""A checkpoint missing weight files never counts: not listed, not kept as best, refused by export
and --nemo_model with a clear message; a kill at any step of retention leaves a valid latest
checkpoint, and the next run cleans up (issue 14, item 2).

The damaged checkpoints are made the way an in-place deletion killed half way made them: a
step-NNNNNN folder whose shoal.json and model/.metadata are there but whose data file is missing
or short. Which checkpoints are whole is decided from DCP's own metadata by torch's reader.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

import shoal.checkpoint.catalog as catalog
import shoal.train.trainer as trainer
from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, checkpoint_names, read_metrics, train_args


def data_files(ckpt: Path) -> list[Path]:
    return sorted(p for p in (ckpt / "model").iterdir() if p.suffix in (".safetensors", ".distcp"))


def damage(ckpt: Path, how: str) -> None:
    target = data_files(ckpt)[0]
    if how == "missing":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    assert (ckpt / "shoal.json").is_file() and (ckpt / "model" / ".metadata").is_file()


def scripted_validation(monkeypatch: pytest.MonkeyPatch, losses: list[float]) -> None:
    scripted = iter(losses)
    monkeypatch.setattr(trainer, "validate", lambda *args, **kwargs: next(scripted))


@pytest.mark.parametrize("how", ["missing", "short"])
def test_damaged_checkpoint_is_not_listed_kept_or_used(train_assets: TrainAssets, tmp_path: Path, capsys,
                                                        monkeypatch: pytest.MonkeyPatch, how: str):
    results = tmp_path / "res"
    scripted_validation(monkeypatch, [1.0, 5.0])  # step 2 is the best, step 4 the last
    args = train_args(train_assets, "pretrain", results, "e", "--max_steps", 4, "--checkpoint.save_interval=2")
    assert shoal(*args) == 0
    ckpts = results / "e" / "checkpoints"
    best = ckpts / "step=000002-val_loss=1.000"
    damage(best, how)

    assert [c.path.name for c in catalog.list_checkpoints(ckpts)] == ["step=000004-val_loss=5.000-last"]
    assert catalog.best_checkpoint(ckpts).path.name == "step=000004-val_loss=5.000-last"
    capsys.readouterr()

    assert shoal("export", "--source", best, "--output_path", tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert "error:" in err and "incomplete" in err and str(best) in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()

    ft = train_args(train_assets, "finetune", results, "ft", "--max_steps", 1)
    ft[ft.index("--nemo_model") + 1] = str(best)
    assert shoal(*ft) == 2
    err = capsys.readouterr().err
    assert "--nemo_model" in err and "incomplete" in err and "Traceback" not in err
    assert not (results / "ft").exists()

    # Resumed to step 6 (val 0.5 beats the damaged 1.0): the damaged folder is not kept as the best.
    scripted_validation(monkeypatch, [0.5])
    args[args.index("--max_steps") + 1] = "6"
    assert shoal(*args) == 0
    assert "from step=000004" in capsys.readouterr().err
    assert [c.path.name for c in catalog.list_checkpoints(ckpts)] == ["step=000006-val_loss=0.500-last"]


def kill_before_rename(monkeypatch):
    def killed(path):
        raise KeyboardInterrupt
    monkeypatch.setattr(catalog, "remove_checkpoint", killed)


REAL_RMTREE = shutil.rmtree


def kill_before_rmtree(monkeypatch):
    def killed(path, *args, **kwargs):
        if Path(path).name.startswith(".deleting-"):
            raise KeyboardInterrupt
        REAL_RMTREE(path, *args, **kwargs)
    monkeypatch.setattr(catalog.shutil, "rmtree", killed)


def kill_mid_rmtree(monkeypatch):
    def killed(path, *args, **kwargs):
        if Path(path).name.startswith(".deleting-"):
            data_files(Path(path))[0].unlink()  # one weight file gone, then the process dies
            raise KeyboardInterrupt
        REAL_RMTREE(path, *args, **kwargs)
    monkeypatch.setattr(catalog.shutil, "rmtree", killed)


@pytest.mark.parametrize("save", ["sync", "async"])  # retention in the step loop, or in the background thread
@pytest.mark.parametrize("kill", [kill_before_rename, kill_before_rmtree, kill_mid_rmtree])
def test_kill_during_retention_leaves_a_valid_latest(train_assets: TrainAssets, tmp_path: Path, capsys,
                                                     monkeypatch: pytest.MonkeyPatch, kill, save: str):
    results = tmp_path / "res"
    exp = results / "e"
    ckpts = exp / "checkpoints"
    args = train_args(train_assets, "pretrain", results, "e", "--max_steps", 2, "--checkpoint.save_top_k=0",
                      f"--checkpoint.async_save={save == 'async'}")
    assert shoal(*args) == 0
    kill(monkeypatch)  # retention after the step-4 save deletes step 2: killed there
    args[args.index("--max_steps") + 1] = "4"
    assert shoal(*args) == 130
    monkeypatch.undo()

    # The newest complete checkpoint is step 4, and it exports.
    latest = catalog.latest_checkpoint(ckpts)
    assert latest is not None and latest.step == 4
    assert shoal("export", "--source", exp, "--output_path", tmp_path / "hf") == 0
    capsys.readouterr()

    # A later run finishes the deletion and leaves only named, complete checkpoints.
    args[args.index("--max_steps") + 1] = "5"
    assert shoal(*args) == 0
    assert "from step=000004" in capsys.readouterr().err
    assert checkpoint_names(exp) == [c.path.name for c in catalog.list_checkpoints(ckpts)]
    assert [c.step for c in catalog.list_checkpoints(ckpts)] == [5]
    steps = [r["step"] for r in read_metrics(exp) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]


def test_a_left_deleting_folder_is_removed(train_assets: TrainAssets, tmp_path: Path):
    results = tmp_path / "res"
    exp = results / "e"
    args = train_args(train_assets, "pretrain", results, "e", "--max_steps", 2)
    assert shoal(*args) == 0
    (only,) = checkpoint_names(exp)
    left = exp / "checkpoints" / ".deleting-step=000001-last-0badc0de"
    (left / "model").mkdir(parents=True)
    (left / "model" / ".metadata").write_bytes(b"partial")
    args[args.index("--max_steps") + 1] = "3"
    assert shoal(*args) == 0
    assert not left.exists()
    assert all(not name.startswith(".") for name in checkpoint_names(exp))
    assert math.isfinite(read_metrics(exp)[-1].get("loss", read_metrics(exp)[-1].get("val_loss")))
