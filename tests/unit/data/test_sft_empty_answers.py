"""An SFT row with an empty answer is kept but warned about, with its file:line (issue 14 item 10;
the rule is in docs/sft-data.md). Every row form is covered: input/output, alpaca and chat."""

from __future__ import annotations

import json
from pathlib import Path

from shoal.data.sft import SFTDataset


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_empty_answers_are_named_with_file_and_line(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    path = write(tmp_path / "training.jsonl", [
        {"input": "hello", "output": "world"},
        {"input": "say nothing", "output": ""},                                  # line 2
        {"instruction": "translate", "input": "狐狸", "output": "   "},           # line 3, blank
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},  # line 4
        {"input": "fine", "output": "ok"},
    ])
    ds = SFTDataset(path, tiny_tokenizer, seq_length=64)
    err = capsys.readouterr().err
    assert "warning" in err and "3 of 5 rows have an empty answer" in err, err
    for line in (2, 3, 4):
        assert f"{path}:{line}" in err, err
    assert f"{path}:1" not in err and f"{path}:5" not in err
    assert ds.empty_answers == [f"{path}:{n}" for n in (2, 3, 4)]
    assert ds.num_rows == 5  # kept, as documented


def test_no_warning_without_empty_answers_or_on_other_ranks(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    path = write(tmp_path / "training.jsonl", [{"input": "hello", "output": "world"}])
    SFTDataset(path, tiny_tokenizer, seq_length=64)
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    write(path, [{"input": "hello", "output": ""}])
    SFTDataset(path, tiny_tokenizer, seq_length=64)
    assert "warning" not in capsys.readouterr().err
