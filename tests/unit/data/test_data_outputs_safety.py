"""Issue 14 items 3, 7, 9 and 10 on the data side: outputs that reach their input, token ids the model
cannot embed, empty inputs and I/O failures of `shoal preprocess` / `shoal download`.

Oracles: the input's bytes before and after (nothing of the user's is damaged), the tokenizer's own
ids against the checkpoint's `vocab_size` from shoal.json, and the folder listing (nothing half-written).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
from pathlib import Path

from shoal.checkpoint.format import write_metadata
from shoal.cli import main as cli_main
from shoal.models import get_preset


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


ROWS = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "台灣的新聞：今天天氣晴朗。"}]


# -- outputs that reach an input (item 3) ---------------------------------------------------------


def test_preprocess_output_that_is_the_input_through_a_symlink_is_refused(tmp_path, tiny_tokenizer_dir, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    before = sha(corpus)
    # The .bin output's name is a link to the corpus: opening it for writing would truncate the corpus.
    (tmp_path / "out_text_document.bin").symlink_to(corpus)
    code = cli_main(["preprocess", "--input", str(corpus), "--tokenizer", str(tiny_tokenizer_dir),
                     "--output-prefix", str(tmp_path / "out"), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "is the input" in err, err
    assert sha(corpus) == before


def test_download_pretrain_onto_its_own_source_is_refused(tmp_path, monkeypatch, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    before = sha(corpus)
    monkeypatch.chdir(tmp_path)
    code = cli_main(["download", "pretrain", "--dataset_name", str(corpus), "--output", "./sub/../corpus.jsonl",
                     "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "is the input" in err, err
    assert sha(corpus) == before


def test_download_sft_output_dir_holding_its_source_is_refused(tmp_path, capsys):
    """`--output_dir data/alpaca --overwrite` with the raw rows in data/alpaca/raw.jsonl: replacing the
    folder would delete the very file being split."""
    folder = tmp_path / "alpaca"
    folder.mkdir()
    raw = write_jsonl(folder / "raw.jsonl", [{"input": f"q{i}", "output": f"a{i}"} for i in range(10)])
    before = sha(raw)
    code = cli_main(["download", "sft", "--dataset_name", str(raw), "--output_dir", str(folder), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "holds the input" in err, err
    assert sha(raw) == before and sorted(p.name for p in folder.iterdir()) == ["raw.jsonl"]


def test_download_outputs_are_not_overwritten_without_overwrite(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my own file\n")
    code = cli_main(["download", "pretrain", "--dataset_name", str(corpus), "--output", str(mine)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert mine.read_text() == "my own file\n"
    folder = tmp_path / "alpaca"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"input": f"q{i}", "output": f"a{i}"} for i in range(10)])
    code = cli_main(["download", "sft", "--dataset_name", str(sft), "--output_dir", str(folder)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "keep"


# -- token ids beyond the embedding (item 7) ------------------------------------------------------


def small_vocab_checkpoint(tmp_path: Path, tokenizer_dir: Path, vocab_size: int) -> Path:
    """A shoal checkpoint whose model embeds `vocab_size` ids, carrying the tiny tokenizer."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tokenizer_dir, ckpt / "tokenizer")
    write_metadata(ckpt, dataclasses.replace(get_preset("llama_tiny"), vocab_size=vocab_size), "bfloat16")
    return ckpt


def test_preprocess_refuses_ids_the_checkpoint_cannot_embed(tmp_path, tiny_tokenizer_dir, tiny_tokenizer, capsys):
    rows = [ROWS[0], {"text": ""}, ROWS[1]]  # an empty text between: the line count must still be right
    corpus = write_jsonl(tmp_path / "corpus.jsonl", rows)
    ids = [tiny_tokenizer(r["text"], add_special_tokens=False)["input_ids"] for r in rows]
    largest = max(max(doc) for doc in ids if doc)
    ckpt = small_vocab_checkpoint(tmp_path, tiny_tokenizer_dir, vocab_size=largest)  # one id too few
    out = tmp_path / "data" / "corpus"
    code = cli_main(["preprocess", "--input", str(corpus), "--tokenizer", str(ckpt), "--output-prefix", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    line = 1 + next(i for i, doc in enumerate(ids) if largest in doc)  # the row that gives the id
    assert f"vocab_size {largest}" in err and f"token id {largest}" in err and f"corpus.jsonl:{line}:" in err, err
    assert not out.parent.exists()  # nothing written, not even a temporary file or the folder for it


def test_preprocess_refuses_an_eod_id_beyond_the_embedding(tmp_path, tiny_tokenizer_dir, tiny_tokenizer, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    eos = tiny_tokenizer.eos_token_id
    ckpt = small_vocab_checkpoint(tmp_path, tiny_tokenizer_dir, vocab_size=eos)
    code = cli_main(["preprocess", "--input", str(corpus), "--tokenizer", str(ckpt),
                     "--output-prefix", str(tmp_path / "o"), "--append-eod"])
    err = capsys.readouterr().err
    assert code == 2 and f"vocab_size {eos}" in err and str(eos) in err, err


def test_preprocess_with_a_large_enough_checkpoint_is_unchanged(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    ckpt = small_vocab_checkpoint(tmp_path, tiny_tokenizer_dir, vocab_size=len(tiny_tokenizer))
    assert cli_main(["preprocess", "--input", str(corpus), "--tokenizer", str(ckpt),
                     "--output-prefix", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o_text_document.bin").is_file()


# -- empty inputs (item 10) -----------------------------------------------------------------------


def test_preprocess_of_an_empty_input_warns(tmp_path, tiny_tokenizer_dir, capsys):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text("\n")
    code = cli_main(["preprocess", "--input", str(corpus), "--tokenizer", str(tiny_tokenizer_dir),
                     "--output-prefix", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 0
    assert "warning" in err and "no documents" in err and "empty.jsonl" in err, err


def test_preprocess_of_only_empty_texts_warns(tmp_path, tiny_tokenizer_dir, capsys):
    corpus = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": ""}])
    assert cli_main(["preprocess", "--input", str(corpus), "--tokenizer", str(tiny_tokenizer_dir),
                     "--output-prefix", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "no documents" in err and "2 empty" in err, err


# -- I/O failures (item 9) ------------------------------------------------------------------------


def test_preprocess_on_a_full_disk_says_so_and_leaves_nothing(tmp_path, tiny_tokenizer_dir, monkeypatch, capsys):
    import shoal.data.indexed as indexed

    class FullDisk:
        """A file whose writes fail as a full disk makes them fail."""

        def __init__(self, path, mode="rb", *args, **kwargs):
            self._file = open(path, mode, *args, **kwargs)
            self.name = path

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.name))

        def __getattr__(self, name):
            return getattr(self._file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()

    monkeypatch.setattr(indexed, "open", FullDisk, raising=False)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS * 3)
    out = tmp_path / "data" / "corpus"
    code = cli_main(["preprocess", "--input", str(corpus), "--tokenizer", str(tiny_tokenizer_dir),
                     "--output-prefix", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "disk full" in err and str(out.parent) in err, err
    assert "Traceback" not in err
    assert not out.parent.exists()  # nothing left, not even the folder made for the output


def test_download_on_a_full_disk_says_so_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import shoal.data.download as download

    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            def write(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            handle.write = write
        return handle

    monkeypatch.setattr(download, "open", full_open, raising=False)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    out = tmp_path / "out" / "corpus.jsonl"
    code = cli_main(["download", "pretrain", "--dataset_name", str(corpus), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "disk full" in err and str(out) in err, err
    assert not out.parent.exists() or not list(out.parent.iterdir())
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"input": f"q{i}", "output": f"a{i}"} for i in range(10)])
    code = cli_main(["download", "sft", "--dataset_name", str(sft), "--output_dir", str(tmp_path / "alpaca")])
    err = capsys.readouterr().err
    assert code == 2 and "disk full" in err and "alpaca" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "out", "sft.jsonl"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "sft.jsonl"]
