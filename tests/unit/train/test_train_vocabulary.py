"""Token ids the model cannot embed are refused at training start, with both numbers and before
the experiment folder exists (issue 14, item 7, the training half). Before, the run died inside
F.embedding with an IndexError after writing the experiment folder.

The oracle for the tokenizer's size is transformers (len of the tokenizer it loads); the bad
corpus is written with the Megatron-format writer directly, one id past the embedding.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from shoal.data.indexed import IndexedDatasetWriter
from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, train_args


def test_tokenizer_larger_than_the_embedding_is_refused(train_assets: TrainAssets, tmp_path: Path, capsys):
    from transformers import AutoTokenizer

    ckpt = tmp_path / "ckpt"
    shutil.copytree(train_assets.checkpoint, ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    vocab = len(tokenizer)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(8)])
    shutil.rmtree(ckpt / "tokenizer")
    tokenizer.save_pretrained(ckpt / "tokenizer")
    bigger = len(AutoTokenizer.from_pretrained(ckpt / "tokenizer"))
    assert bigger == vocab + 8

    for stage in ("pretrain", "finetune"):
        args = train_args(train_assets, stage, tmp_path / "res", stage, "--max_steps", 1)
        args[args.index("--nemo_model") + 1] = str(ckpt)
        assert shoal(*args) == 2
        err = capsys.readouterr().err
        assert f"has {bigger} tokens" in err and f"vocab_size {vocab}" in err and "Traceback" not in err
        assert not (tmp_path / "res").exists()


def test_corpus_with_ids_past_the_embedding_is_refused(train_assets: TrainAssets, tmp_path: Path, capsys):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(train_assets.checkpoint / "tokenizer"))
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(data / "bad", dtype=np.uint16) as writer:
        for _ in range(200):
            writer.add_document(rng.integers(0, vocab, 50))
        writer.add_document([5, vocab + 3, 7])  # one document made with another tokenizer
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 1)
    args[args.index("--dataset_path") + 1] = str(data)
    assert shoal(*args) == 2
    err = capsys.readouterr().err
    assert f"token id {vocab + 3}" in err and f"vocab_size is {vocab}" in err and str(data / "bad") in err
    assert not (tmp_path / "res").exists()


def test_empty_pretraining_dataset_is_warned_about(train_assets: TrainAssets, tmp_path: Path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for f in train_assets.data_dir.glob("corpus*"):
        if f.is_file():
            shutil.copyfile(f, data / f.name)
    with IndexedDatasetWriter(data / "empty", dtype=np.uint16):
        pass
    args = train_args(train_assets, "pretrain", tmp_path / "res", "e", "--max_steps", 1)
    args[args.index("--dataset_path") + 1] = str(data)
    assert shoal(*args) == 0  # the other datasets train as before
    assert f"dataset {data / 'empty'} holds no tokens" in capsys.readouterr().err
