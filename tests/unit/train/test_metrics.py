"""What a training run records: metrics.jsonl, TensorBoard, Weights & Biases (offline), the length of
a run without --max_steps, and no secret anywhere on disk.

Oracles: TensorBoard's own event reader; the learning-rate curve written out here from its
definition (cosine from lr to min_lr over the run); the `.idx` file read by hand from the Megatron
spec for the one-epoch step count; a byte search of every file the run wrote for the secrets.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.cli import shoal, subprocess_env
from tests.helpers.training import TrainAssets, read_metrics, train_args, train_records, val_records

HF_SECRET, WANDB_SECRET = "hf_SECRET_4f9a1c", "wandb_SECRET_7b2e0d"


def test_metrics_tensorboard_wandb_and_no_secrets(train_assets: TrainAssets, tmp_path: Path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, lr, min_lr = 4, 2e-3, 5e-4
    args = train_args(train_assets, "pretrain", tmp_path / "res", "run", "--max_steps", steps,
                      "--train.val_check_interval=2", f"--train.lr={lr}", f"--train.min_lr={min_lr}",
                      "--train.lr_schedule=cosine", "--wandb", "--wandb_project", "shoal-test",
                      "--hf_token", HF_SECRET, f"--wandb_token={WANDB_SECRET}")
    env = subprocess_env()
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "res"), WANDB_CONFIG_DIR=str(tmp_path / "res" / "wbcfg"),
               WANDB_CACHE_DIR=str(tmp_path / "res" / "wbcache"), WANDB_DATA_DIR=str(tmp_path / "res" / "wbdata"),
               WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    # A child process, so the secrets are on the real command line that wandb and logs get to see.
    proc = subprocess.run([sys.executable, "-m", "shoal.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    exp = tmp_path / "res" / "run"

    # metrics.jsonl: one record per step with the four training numbers, validation every 2 steps.
    records = train_records(exp)
    assert sorted(records) == list(range(1, steps + 1))
    # Cosine from 2e-3 to 5e-4 over 4 steps, no warmup: half-amplitude 7.5e-4; record k is step k - 1.
    expected_lr = {
        1: 2e-3,  # cos 0 = 1
        2: 5e-4 + 7.5e-4 * (1 + math.sqrt(0.5)),  # cos(pi/4): 1.78033e-3
        3: 1.25e-3,  # cos(pi/2) = 0: the midpoint
        4: 5e-4 + 7.5e-4 * (1 - math.sqrt(0.5)),  # cos(3pi/4): 7.19670e-4 (min_lr would be step 5)
    }
    for step, record in records.items():
        assert math.isfinite(record["loss"]) and record["grad_norm"] > 0 and record["tokens_per_s_per_gpu"] > 0
        assert record["lr"] == pytest.approx(expected_lr[step], rel=1e-12)
    vals = val_records(exp)
    assert sorted(vals) == [2, 4] and all(math.isfinite(v) for v in vals.values())
    (last,) = (exp / "checkpoints").iterdir()
    assert last.name == f"step={steps:06d}-val_loss={vals[steps]:.3f}-last"

    # TensorBoard holds the same series.
    events = EventAccumulator(str(exp / "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, steps + 1))
    assert [e.value for e in loss] == pytest.approx([records[s]["loss"] for s in range(1, steps + 1)], rel=1e-6)
    assert [e.step for e in events.Scalars("val_loss")] == [2, 4]
    assert {"lr", "grad_norm", "tokens_per_s_per_gpu"} <= set(events.Tags()["scalars"])

    # Weights & Biases wrote an offline run into the experiment.
    runs = list((exp / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((exp / "wandb").iterdir()) if (exp / "wandb").exists() else "no wandb folder"
    (data,) = runs[0].glob("run-*.wandb")
    assert b"val_loss" in data.read_bytes()

    # No secret anywhere: not in config.yaml, checkpoints, logs, TensorBoard or wandb's files.
    for path in (tmp_path / "res").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert HF_SECRET.encode() not in content and WANDB_SECRET.encode() not in content, f"secret in {path}"
    assert HF_SECRET not in proc.stderr + proc.stdout and WANDB_SECRET not in proc.stderr + proc.stdout
    assert "--hf_token ***" in (last / "shoal.json").read_text()  # the command is recorded, redacted


def read_idx_sequence_lengths(idx: Path) -> np.ndarray:
    """`sequence_lengths` of a Megatron .idx file, read from the spec's byte layout."""
    raw = idx.read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00" and struct.unpack("<Q", raw[9:17])[0] == 1
    (count,) = struct.unpack("<Q", raw[18:26])
    return np.frombuffer(raw, dtype="<i4", count=count, offset=34)


def test_one_epoch_when_max_steps_is_unset(train_assets: TrainAssets, tmp_path: Path):
    seq, gbs = 32, 64
    # No --max_steps, and the tiny recipe's own max_steps unset too.
    args = train_args(train_assets, "pretrain", tmp_path / "res", "epoch", "-g", gbs, "-m", 32,
                      "--train.max_steps=null")
    assert "--max_steps" not in args
    assert shoal(*args) == 0

    # Megatron's rule: the train split is documents [0, round(0.95·N)); one epoch of it gives
    # (tokens - 1) // seq_length samples (each needs seq_length + 1 tokens, overlapping by one);
    # the run is as many whole global batches as that.
    lengths = read_idx_sequence_lengths(train_assets.data_dir / "corpus_text_document.idx")
    train_docs = int(round(0.95 * len(lengths)))
    samples = (int(lengths[:train_docs].sum()) - 1) // seq
    expected_steps = samples // gbs
    assert expected_steps >= 2

    records = train_records(tmp_path / "res" / "epoch")
    assert sorted(records) == list(range(1, expected_steps + 1))
    assert records[expected_steps]["consumed_samples"] == expected_steps * gbs
    assert [p.name.split("-")[0] for p in (tmp_path / "res" / "epoch" / "checkpoints").iterdir()] == [
        f"step={expected_steps:06d}"]


def test_metrics_only_written_by_a_run_that_trains(train_assets: TrainAssets, tmp_path: Path):
    """A second run of a finished experiment trains nothing and keeps metrics.jsonl as it was."""
    args = train_args(train_assets, "pretrain", tmp_path / "res", "done", "--max_steps", 2)
    assert shoal(*args) == 0
    before = read_metrics(tmp_path / "res" / "done")
    assert shoal(*args) == 0
    assert read_metrics(tmp_path / "res" / "done") == before
