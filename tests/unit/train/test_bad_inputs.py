"""Bad input to `shoal pretrain` / `shoal finetune`: exit code 2, a message naming what is wrong,
and no checkpoint (or half-written folder) left behind."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest

import shoal.checkpoint.training as training
from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, checkpoint_names, train_args


def fails_with(capsys: pytest.CaptureFixture, args: list, *fragments: str) -> str:
    """Run shoal; it must exit 2 with every fragment in its error message."""
    assert shoal(*args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    return err


def no_checkpoints(results: Path) -> bool:
    return not list(results.glob("*/checkpoints/*"))


def test_missing_pretraining_data(train_assets: TrainAssets, tmp_path: Path, capsys):
    missing = tmp_path / "no_such_dir"
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 1)
    args[args.index("--dataset_path") + 1] = str(missing)
    fails_with(capsys, args, str(missing))
    assert no_checkpoints(tmp_path / "res")


def test_dataset_dir_without_idx_files(train_assets: TrainAssets, tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no data here\n")
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 1)
    args[args.index("--dataset_path") + 1] = str(empty)
    fails_with(capsys, args, str(empty), ".idx")
    assert no_checkpoints(tmp_path / "res")


def test_missing_finetuning_data(train_assets: TrainAssets, tmp_path: Path, capsys):
    empty = tmp_path / "sft_empty"
    empty.mkdir()
    args = train_args(train_assets, "finetune", tmp_path / "res", "e", "--max_steps", 1)
    args[args.index("--dataset_path") + 1] = str(empty)
    fails_with(capsys, args, "training.jsonl")
    assert no_checkpoints(tmp_path / "res")


def test_global_batch_not_divisible(train_assets: TrainAssets, tmp_path: Path, capsys):
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 1, "-g", 6, "-m", 4)
    fails_with(capsys, args, "--global_batch_size 6", "--micro_batch_size 4")


def test_seq_length_beyond_the_model(train_assets: TrainAssets, tmp_path: Path, capsys):
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 1, "--seq_length", 512)
    fails_with(capsys, args, "--seq_length 512", "max_position_embeddings 256")
    assert no_checkpoints(tmp_path / "res")


def test_checkpoint_of_another_model_than_the_preset(train_assets: TrainAssets, tmp_path: Path, capsys):
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 1, "--model", "llama_tiny")
    fails_with(capsys, args, str(train_assets.checkpoint), "llama_tiny")
    assert no_checkpoints(tmp_path / "res")


def test_resuming_with_another_model(train_assets: TrainAssets, other_checkpoint: Path, tmp_path: Path, capsys):
    results = tmp_path / "res"
    assert shoal(*train_args(train_assets, "pretrain", results, "e", "--max_steps", 1)) == 0
    before = checkpoint_names(results / "e")
    capsys.readouterr()
    # The same experiment, asked to continue from a checkpoint of another shape.
    args = train_args(train_assets, "pretrain", results, "e", "--max_steps", 2)
    args[args.index("--nemo_model") + 1] = str(other_checkpoint)
    fails_with(capsys, args, str(results / "e"), str(other_checkpoint), "hidden 64 vs 32")
    # Or with a preset whose shape differs from the experiment's checkpoints.
    args = train_args(train_assets, "pretrain", results, "e", "--max_steps", 2, "--model", "llama_tiny")
    fails_with(capsys, args, "llama_tiny", "another shape")
    assert checkpoint_names(results / "e") == before


def test_unknown_override_key(train_assets: TrainAssets, tmp_path: Path, capsys):
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 1, "--train.lrr=1e-3")
    fails_with(capsys, args, "unknown config key train.lrr", "lr")
    assert not (tmp_path / "res").exists()


def test_bad_override_value(train_assets: TrainAssets, tmp_path: Path, capsys):
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 1, "--train.lr=fast")
    fails_with(capsys, args, "train.lr", "'fast'")


def test_unknown_recipe(train_assets: TrainAssets, tmp_path: Path, capsys):
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 1)
    args[args.index("--recipe") + 1] = "no_such_recipe"
    fails_with(capsys, args, "no_such_recipe", "tiny")


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_fp8_without_torchao_or_gpu_refused(train_assets: TrainAssets, tmp_path: Path, capsys, stage: str):
    """On this CPU machine --fp8 fails at once, naming what is missing: torchao first, else a GPU."""
    from shoal.distributed.float8 import torchao_version

    args = train_args(train_assets, stage, tmp_path / "res", "e", "--max_steps", 1, "--fp8")
    missing = "pip install 'shoal[fp8]'" if torchao_version() is None else "needs a CUDA GPU"
    fails_with(capsys, args, "--fp8", missing)
    assert not list((tmp_path / "res").glob("*/checkpoints/*"))


@pytest.mark.parametrize("extra, fragments", [
    (["--fp8", "--fp8_recipe", "mxfp8"], ["mxfp8", "Blackwell", "tensorwise"]),
    (["--fp8_recipe", "blockwise"], ["--fp8_recipe 'blockwise'", "subchannel_scaling"]),
])
def test_fp8_combinations_refused(train_assets: TrainAssets, tmp_path: Path, capsys, extra, fragments):
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 1, *extra)
    fails_with(capsys, args, *fragments)
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("extra, fragments", [
    (["--parallel.cuda_graphs=true"], ["parallel.cuda_graphs=true", "set parallel.compile=true"]),
    (["--parallel.compile=true", "--parallel.cuda_graphs=true", "--num_gpus", "2"],
     ["parallel.cuda_graphs=true", "one GPU only", "--num_gpus 2"]),
])
def test_cuda_graphs_combinations_refused(train_assets: TrainAssets, tmp_path: Path, capsys, extra, fragments):
    args = train_args(train_assets, "finetune", tmp_path / "res", "e", "--max_steps", 1, *extra)
    fails_with(capsys, args, *fragments)
    assert not (tmp_path / "res").exists()


def test_cuda_graphs_refused_on_a_cpu(train_assets: TrainAssets, tmp_path: Path, capsys):
    args = train_args(train_assets, "finetune", tmp_path / "res", "e", "--max_steps", 1,
                      "--parallel.compile=true", "--parallel.cuda_graphs=true")
    fails_with(capsys, args, "parallel.cuda_graphs=true needs a CUDA GPU; this run is on cpu")
    assert not list((tmp_path / "res").glob("*/checkpoints/*"))


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fail_model_write(monkeypatch: pytest.MonkeyPatch, before_failing) -> None:
    """The step-4 weights are written, then the disk is full."""
    real_save = training.save_model_state

    def save_or_fail(state, model_dir, *args, **kwargs):
        real_save(state, model_dir, *args, **kwargs)
        if "step=000004" in str(model_dir):
            before_failing()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training, "save_model_state", save_or_fail)


def fail_optimizer_write(monkeypatch: pytest.MonkeyPatch, before_failing) -> None:
    """The disk fills up while a writer thread writes the step-4 optimizer state (DCP wraps the error)."""
    from tests.helpers.checkpoint_faults import fail_writes_into

    def full_disk() -> None:
        before_failing()
        raise OSError(errno.ENOSPC, "No space left on device")

    fail_writes_into(monkeypatch, lambda path: "step=000004" in str(path) and path.parent.name == "optim", full_disk)


@pytest.mark.parametrize("save", ["sync", "async"])  # in the step loop, or in the background
@pytest.mark.parametrize("fail", [fail_model_write, fail_optimizer_write])
def test_failed_checkpoint_write_keeps_the_previous_one(train_assets: TrainAssets, tmp_path: Path, capsys,
                                                       monkeypatch: pytest.MonkeyPatch, fail, save: str):
    ckpts = tmp_path / "res" / "e" / "checkpoints"
    seen: dict[str, dict[str, str]] = {}

    def record_previous() -> None:
        (previous,) = ckpts.glob("step=000002*")
        seen[previous.name] = tree_digest(previous)  # what the step-2 checkpoint held before the failure

    fail(monkeypatch, record_previous)
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 4, "--checkpoint.save_interval=2",
                      f"--checkpoint.async_save={save == 'async'}")
    fails_with(capsys, args, "could not write checkpoint", "step=000004", "No space left on device")

    # The step-2 checkpoint is still the latest, complete and unchanged, and nothing else is there.
    assert len(seen) == 1
    (name,) = seen
    assert name.endswith("-last")
    assert [p.name for p in ckpts.iterdir()] == [name]
    assert tree_digest(ckpts / name) == seen[name]
    assert {"shoal.json", "trainer.json", "model/.metadata", "optim/.metadata"} <= set(seen[name])

    # And the run resumes from it once the disk has room again.
    monkeypatch.undo()
    assert shoal(*args) == 0
    assert "(step 2)" in capsys.readouterr().err
    assert [p.name for p in ckpts.iterdir()][0].startswith("step=000004")
