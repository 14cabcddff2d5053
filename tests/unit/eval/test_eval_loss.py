"""`shoal eval` loss against two independent numbers: the `val_loss` a training run records for
the same split, and the loss transformers computes on `shoal export`'s model for the same samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, read_metrics, train_args


def hf_loss(hf_dir: Path, dataset, count: int, document_mask: bool) -> float:
    """Σ CE over loss tokens / their count, from transformers' logits; packed documents run one by one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, tokens = 0.0, 0.0
    with torch.no_grad():
        for i in range(count):
            row = dataset[i]
            docs = row["document_ids"] if document_mask else torch.zeros_like(row["tokens"])
            for doc in docs.unique():
                at = docs == doc
                logits = model(input_ids=row["tokens"][at][None]).logits[0]
                ce = F.cross_entropy(logits.double(), row["labels"][at], reduction="none")
                total += (ce * row["loss_mask"][at].double()).sum().item()
                tokens += row["loss_mask"][at].sum().item()
    return total / tokens


def eval_json(tmp_path: Path, *args: object) -> dict:
    out = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*')))}.json"
    assert shoal("eval", *args, "--device", "cpu", "--output", out) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_eval_equals_val_loss_and_transformers(train_assets: TrainAssets, tmp_path: Path, stage: str):
    # Validation of a tiny run: the first global batch (4 samples) of the validation split.
    assert shoal(*train_args(train_assets, stage, tmp_path / "res", "run", "--max_steps", 2)) == 0
    experiment = tmp_path / "res" / "run"
    val_loss = [r["val_loss"] for r in read_metrics(experiment) if "val_loss" in r][-1]
    data = train_assets.data_dir if stage == "pretrain" else train_assets.sft_dir
    seq = "32" if stage == "pretrain" else "64"
    options = ["--split", "95,5,0"] if stage == "pretrain" else []
    result = eval_json(tmp_path, "--source", experiment, "--dataset_path", data, "--seq_length", seq,
                       "--max_samples", 4, *options)
    assert result["samples"] == 4
    assert abs(result["mean_loss"] - val_loss) <= 1e-5 * val_loss
    assert abs(result["perplexity"] - torch.tensor(val_loss).exp().item()) <= 1e-4 * result["perplexity"]

    assert shoal("export", "--source", experiment, "--output_path", tmp_path / "hf") == 0
    from shoal.data.tokenizer import load_tokenizer
    from shoal.eval.perplexity import DataSpec, build_eval_dataset

    spec = DataSpec((str(data),), "validation", int(seq), split="95,5,0")
    dataset, _, document_mask = build_eval_dataset(spec, load_tokenizer(tmp_path / "hf"))
    expected = hf_loss(tmp_path / "hf", dataset, 4, document_mask)
    assert abs(result["mean_loss"] - expected) <= 1e-5 * expected
    # The loss did move from the start: the numbers belong to the trained checkpoint.
    start = eval_json(tmp_path, "--source", train_assets.checkpoint, "--dataset_path", data, "--seq_length", seq,
                      "--max_samples", 4, *options)
    assert abs(start["mean_loss"] - result["mean_loss"]) > 1e-4


def test_eval_bad_inputs(train_assets: TrainAssets, tmp_path: Path, capsys):
    assert shoal("eval", "--source", tmp_path, "--dataset_path", train_assets.sft_dir, "--device", "cpu") == 2
    assert "is not a shoal checkpoint" in capsys.readouterr().err
    assert shoal("eval", "--source", train_assets.checkpoint, "--dataset_path", train_assets.sft_dir,
                 "--split_name", "dev", "--device", "cpu") == 2
    assert "unknown split 'dev'" in capsys.readouterr().err
