"""The training tests' small model, corpus and instruction set (tests/unit/train), for `shoal eval`."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.cli import shoal
from tests.helpers.hf_models import write_small_hf_model
from tests.helpers.training import TrainAssets


@pytest.fixture(autouse=True)
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory: pytest.TempPathFactory) -> TrainAssets:
    from shoal.demo.corpus import write_instruction_set, write_pretraining_corpus

    root = tmp_path_factory.mktemp("eval_assets")
    hf = write_small_hf_model(root / "hf")
    assert shoal("import", "--source", hf, "--output_path", root / "ckpt") == 0
    write_pretraining_corpus(root / "corpus.jsonl", num_documents=200)
    assert shoal("preprocess", "--input", root / "corpus.jsonl", "--json-keys", "text", "--tokenizer", root / "ckpt",
                 "--output-prefix", root / "data" / "corpus", "--append-eod", "--workers", "1") == 0
    write_instruction_set(root / "sft", sizes=(48, 16, 16))
    return TrainAssets(root, hf, root / "ckpt", root / "data", root / "sft")
