"""Shared fixtures for the training-command tests: one small model, corpus and instruction set per
session, made the way a user makes them (an HF model folder, `shoal import`, `shoal preprocess`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training_runs import TrainAssets, shoal, write_small_hf_model


@pytest.fixture(autouse=True)
def _few_threads():
    # The test machine is shared; tiny tensors gain nothing from more threads, and one thread keeps
    # in-process floating-point results identical to those of the one-thread child processes.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory: pytest.TempPathFactory) -> TrainAssets:
    from shoal.demo.corpus import write_instruction_set, write_pretraining_corpus

    root = tmp_path_factory.mktemp("train_assets")
    hf = write_small_hf_model(root / "hf")
    assert shoal("import", "--source", hf, "--output_path", root / "ckpt") == 0
    write_pretraining_corpus(root / "corpus.jsonl", num_documents=200)
    assert shoal("preprocess", "--input", root / "corpus.jsonl", "--json-keys", "text", "--tokenizer", root / "ckpt",
                 "--output-prefix", root / "data" / "corpus", "--append-eod", "--workers", "1") == 0
    write_instruction_set(root / "sft", sizes=(48, 16, 16))
    return TrainAssets(root, hf, root / "ckpt", root / "data", root / "sft")


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imported checkpoint of a model of another shape (hidden 32) with the same tokenizer."""
    root = tmp_path_factory.mktemp("other_model")
    hf = write_small_hf_model(root / "hf", hidden_size=32, intermediate_size=64, head_dim=8)
    assert shoal("import", "--source", hf, "--output_path", root / "ckpt") == 0
    return root / "ckpt"
