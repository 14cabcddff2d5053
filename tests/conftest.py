"""Fixtures shared by every test folder. The code behind them lives in `tests.helpers`.

Session fixtures are made only when a test asks for them, once per session: a tiny tokenizer
folder, the training assets (a small HF model imported with `shoal import`, a preprocessed corpus,
an instruction set), a checkpoint of another shape, and a local Slurm cluster.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers.training import TrainAssets

# A suite started in the background of a non-interactive shell (`make test &`) inherits SIGINT
# ignored, and so would every process it starts: the Ctrl-C tests would then test nothing. Give
# the session, and through it its children, Python's default handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _few_threads() -> Iterator[None]:
    # The test machine is shared; tiny tensors gain nothing from more threads, and one thread keeps
    # in-process floating-point results identical to those of the one-thread child processes.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding tokenizer.json, tokenizer_config.json and the chat template of
    `tests.helpers.tokenizers.llama3_bpe_tokenizer`."""
    from tests.helpers.tokenizers import llama3_bpe_tokenizer

    path = tmp_path_factory.mktemp("tiny_tokenizer")
    llama3_bpe_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    """The tokenizer as `transformers.AutoTokenizer` loads it from `tiny_tokenizer_dir`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory: pytest.TempPathFactory) -> TrainAssets:
    from tests.helpers.training import make_train_assets

    return make_train_assets(tmp_path_factory.mktemp("train_assets"))


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imported checkpoint of a model of another shape (hidden 32) with the same tokenizer."""
    from tests.helpers.cli import shoal
    from tests.helpers.hf_models import write_small_hf_model

    root = tmp_path_factory.mktemp("other_model")
    hf = write_small_hf_model(root / "hf", hidden_size=32, intermediate_size=64, head_dim=8)
    assert shoal("import", "--source", hf, "--output_path", root / "ckpt") == 0
    return root / "ckpt"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running two-node Slurm cluster on this machine for the whole session (skips without Slurm)."""
    from tests.helpers.slurm_cluster import slurm_cluster_for_session

    yield from slurm_cluster_for_session()
