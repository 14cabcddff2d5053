"""Checkpoint retention: the best `save_top_k` by validation loss are kept, plus the last one.

The validation losses are set by the test (validation is replaced by a list of values), so the
best checkpoint is not the last and the expected survivors follow from the list alone.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

import shoal.train.trainer as trainer
from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, checkpoint_names, train_args, train_records, val_records


def expected_names(val_losses: dict[int, float], top_k: int) -> list[str]:
    def name(step: int, last: bool) -> str:
        loss = val_losses[step]
        shown = f"{loss:.3f}" if math.isfinite(loss) else "nan"
        return f"step={step:06d}-val_loss={shown}" + ("-last" if last else "")

    last = max(val_losses)
    finite = sorted((v, s) for s, v in val_losses.items() if math.isfinite(v))
    kept = {s for _, s in finite[:top_k]} | {last}
    return sorted(name(s, s == last) for s in kept)


@pytest.mark.parametrize("top_k", [1, 2])
def test_best_k_by_val_loss_plus_last(train_assets: TrainAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      top_k: int):
    # Validation at steps 2, 4, ..., 10: a diverged (nan) one, and the best (1.0) in the middle.
    losses = [3.0, float("nan"), 1.0, 2.5, 2.0]
    scripted = iter(losses)
    monkeypatch.setattr(trainer, "validate", lambda *args, **kwargs: next(scripted))
    args = train_args(train_assets, "pretrain", tmp_path / "res", "keep", "--max_steps", 10,
                      "--checkpoint.save_interval=2", f"--checkpoint.save_top_k={top_k}")
    assert shoal(*args) == 0

    exp = tmp_path / "res" / "keep"
    by_step = dict(zip(range(2, 11, 2), losses))
    logged = val_records(exp)
    assert sorted(logged) == sorted(by_step)
    assert all(logged[s] == v or (math.isnan(v) and math.isnan(logged[s])) for s, v in by_step.items())
    assert checkpoint_names(exp) == expected_names(by_step, top_k)
    assert "step=000006-val_loss=1.000" in checkpoint_names(exp)  # the best is kept though not last
    for name in checkpoint_names(exp):
        files = {p.name for p in (exp / "checkpoints" / name).iterdir()}
        assert {"shoal.json", "trainer.json", "model", "optim"} <= files


@pytest.mark.parametrize("flag", ["--checkpoint.async_save=false", "--checkpoint.async_save=true"])
def test_retention_leaves_temporary_folders_it_did_not_make(train_assets: TrainAssets, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, flag: str):
    """Retention runs inside a save; a temporary folder of another save is in flight (planted here
    once the run holds the lock, as a writer of another run would), so it stays as it is, while
    an interrupted deletion is finished."""
    import shoal.checkpoint.training as training

    ckpts = tmp_path / "res" / "e" / "checkpoints"
    other = ckpts / ".step=000009-last.tmp-0123456789ab"
    deleting = ckpts / ".deleting-step=000001-last-0badc0de"
    real_save = training.save_model_state

    def save(state, model_dir, *args, **kwargs):
        if not other.exists():
            (other / "optim").mkdir(parents=True)
            (other / "optim" / ".metadata.tmp").write_bytes(b"being written")
            (deleting / "model").mkdir(parents=True)
        real_save(state, model_dir, *args, **kwargs)

    monkeypatch.setattr(training, "save_model_state", save)
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 3,
                      "--checkpoint.save_interval=1", flag)
    assert shoal(*args) == 0
    assert (other / "optim" / ".metadata.tmp").read_bytes() == b"being written"
    assert not deleting.exists()
    assert [n for n in checkpoint_names(tmp_path / "res" / "e") if not n.startswith(".")][-1].startswith("step=000003")


def test_fine_tuning_starts_from_latest_pretraining_checkpoint(train_assets: TrainAssets, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    """The seed's rule: `shoal finetune` without --nemo_model takes the pretraining run's newest
    checkpoint (its last step), not its best one and not the imported model."""
    scripted = iter([1.0, 5.0])  # the step-2 checkpoint is the best, step 4 the last
    monkeypatch.setattr(trainer, "validate", lambda *args, **kwargs: next(scripted))
    results = tmp_path / "res"
    assert shoal(*train_args(train_assets, "pretrain", results, "pre", "--max_steps", 4,
                             "--checkpoint.save_interval=2")) == 0
    assert checkpoint_names(results / "pre") == ["step=000002-val_loss=1.000", "step=000004-val_loss=5.000-last"]
    monkeypatch.undo()

    args = train_args(train_assets, "finetune", results, "ft", "--max_steps", 1)
    del args[args.index("--nemo_model"):args.index("--nemo_model") + 2]
    seen = []
    real_build = trainer.build_engine
    monkeypatch.setattr(trainer, "build_engine", lambda *a, **k: seen.append(k["start"]) or real_build(*a, **k))
    assert shoal(*args) == 0
    assert seen == [results / "pre" / "checkpoints" / "step=000004-val_loss=5.000-last"]


def test_checkpoints_without_optimizer_state(train_assets: TrainAssets, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]):
    """checkpoint.save_optimizer=false writes model/ but no optim/; a resume from such a checkpoint
    restores the weights (the next step's loss equals an uninterrupted run's) and says that the
    optimizer restarts."""
    full = tmp_path / "full"
    assert shoal(*train_args(train_assets, "pretrain", full, "run", "--max_steps", 3)) == 0
    lean = tmp_path / "lean"
    lean_args = train_args(train_assets, "pretrain", lean, "run", "--max_steps", 3, "--checkpoint.save_interval=2",
                           "--checkpoint.save_top_k=2", "--checkpoint.save_optimizer=false")
    assert shoal(*lean_args) == 0
    step2, step3 = sorted((lean / "run" / "checkpoints").iterdir())
    assert "optim" not in {p.name for p in step2.iterdir()} and (step2 / "model").is_dir()
    shutil.rmtree(step3)  # as if killed after the step-2 checkpoint
    capsys.readouterr()

    assert shoal(*lean_args) == 0
    assert "holds no optimizer state" in capsys.readouterr().err
    uninterrupted, resumed = train_records(full / "run"), train_records(lean / "run")
    assert resumed[3]["loss"] == uninterrupted[3]["loss"]  # the weights after step 2 were restored
