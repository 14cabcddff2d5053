"""The report tests train tiny real runs with the shared training helpers (tests/helpers)."""

from __future__ import annotations

import pytest

from tests.helpers.cli import shoal
from tests.helpers.hf_models import write_small_hf_model
from tests.helpers.training import TrainAssets


@pytest.fixture(scope="session")
def pretrain_assets(tmp_path_factory: pytest.TempPathFactory) -> TrainAssets:
    """A small imported model and a preprocessed corpus, made as a user makes them."""
    from shoal.demo.corpus import write_pretraining_corpus

    root = tmp_path_factory.mktemp("report_assets")
    hf = write_small_hf_model(root / "hf")
    assert shoal("import", "--source", hf, "--output_path", root / "ckpt") == 0
    write_pretraining_corpus(root / "corpus.jsonl", num_documents=200)
    assert shoal("preprocess", "--input", root / "corpus.jsonl", "--json-keys", "text", "--tokenizer", root / "ckpt",
                 "--output-prefix", root / "data" / "corpus", "--append-eod", "--workers", "1") == 0
    return TrainAssets(root, hf, root / "ckpt", root / "data", root / "sft")
