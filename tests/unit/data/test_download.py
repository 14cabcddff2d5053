"""`shoal download`: the seed's alpaca rule and 98/1/1 split, seeded reproducibility, rows kept as
they are, non-ASCII kept as UTF-8, local sources read with and without `datasets`, and bad input
refused with the file/line at fault and nothing written. The Hub is replaced by a stand-in module:
tests never reach the network."""

from __future__ import annotations

import csv
import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from shoal.cli import main as cli_main
from shoal.data.download import SFT_FILES, download_pretrain, download_sft
from shoal.errors import ShoalError

INSTRUCTIONS = ["請把下列句子翻譯成英文。", "寫一首關於台灣的短詩。", "解釋什麼是機器學習。"]


def alpaca_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        row = {"instruction": f"{INSTRUCTIONS[i % 3]} #{i}", "output": f"回答 {i}：好的。"}
        if i % 4 == 1:
            row["input"] = ""  # empty input: the prompt is the instruction alone
        elif i % 4 == 2:
            row["input"] = f"今天天氣很好 {i}"
        # i % 4 in (0, 3): no input key at all (some alpaca exports drop it)
        rows.append(row)
    return rows


def seed_rule(row: dict) -> dict:
    """The seed's download_split_data.py conversion, written out independently."""
    extra = row.get("input") or ""
    return {"input": row["instruction"] + ("\n" + extra if extra else ""), "output": row["output"]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def as_counter(rows: list[dict]) -> Counter:
    return Counter(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows)


def test_alpaca_rows_follow_the_seed_rule_and_split(tmp_path: Path) -> None:
    rows = alpaca_rows(100)
    source = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    counts = download_sft(source, tmp_path / "out", split="0.8,0.1,0.1", seed=7)
    assert counts == {"training.jsonl": 80, "validation.jsonl": 10, "test.jsonl": 10}
    written = {name: read_jsonl(tmp_path / "out" / name) for name in SFT_FILES}
    assert {name: len(r) for name, r in written.items()} == counts
    everything = [r for name in SFT_FILES for r in written[name]]
    assert as_counter(everything) == as_counter([seed_rule(r) for r in rows])
    assert all(set(r) == {"input", "output"} for r in everything)
    raw = (tmp_path / "out" / "training.jsonl").read_text(encoding="utf-8")
    assert "台灣" in raw or "翻譯" in raw  # Traditional Chinese written as it is, not \u escapes
    assert "\\u" not in raw
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(SFT_FILES)


def test_same_seed_same_files_other_seed_other_order(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(60))
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        download_sft(source, tmp_path / name, seed=seed, split=[0.5, 0.25, 0.25])
    for file in SFT_FILES:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a" / "training.jsonl").read_bytes() != (tmp_path / "c" / "training.jsonl").read_bytes()
    # the shuffle mixes the input: the training file is not simply its first rows in order
    first = [seed_rule(r) for r in alpaca_rows(60)[:30]]
    assert read_jsonl(tmp_path / "a" / "training.jsonl") != first


def test_chat_and_input_output_rows_are_kept_as_they_are(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "system", "content": "你是助理。"}, {"role": "user", "content": "你好"},
                      {"role": "assistant", "content": "你好！"}]},
        {"input": "台北在哪裡？", "output": "台灣北部。", "source": "handmade"},
        {"instruction": "說早安", "input": "", "output": "早安"},
    ] * 4
    download_sft(write_jsonl(tmp_path / "mixed.jsonl", rows), tmp_path / "out", split="0.5,0.25,0.25")
    everything = [r for name in SFT_FILES for r in read_jsonl(tmp_path / "out" / name)]
    expected = [r if "instruction" not in r else seed_rule(r) for r in rows]
    assert as_counter(everything) == as_counter(expected)


@pytest.mark.parametrize("total, expected", [(200, [196, 2, 2]), (10, [8, 1, 1]), (3, [1, 1, 1])])
def test_default_split_sizes(tmp_path: Path, total: int, expected: list[int]) -> None:
    counts = download_sft(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(total)), tmp_path / "out")
    assert list(counts.values()) == expected  # small sets still get a validation and a test row


@pytest.mark.parametrize("split, message", [
    ("0.9,0.1", "expected three fractions"), ("0.9,0.1,0.1", "add up to 1.1"),
    ("a,b,c", "must be numbers"), ("1.2,-0.1,-0.1", "between 0 and 1"),
    ("0,0.5,0.5", "training fraction"),
])
def test_bad_split_is_refused_before_anything_is_written(tmp_path: Path, split: str, message: str) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    with pytest.raises(ShoalError, match=message):
        download_sft(source, tmp_path / "out", split=split)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


@pytest.mark.parametrize("bad, message", [
    ({"question": "?", "answer": "!"}, "cannot tell the row's format from its columns \\(question, answer\\)"),
    ({"instruction": "x", "output": 3}, "'output' must be a string, got int"),
    ({"messages": [{"role": "user"}]}, "'messages' must be a non-empty list"),
])
def test_bad_sft_row_names_file_and_line_and_writes_nothing(tmp_path: Path, bad: dict, message: str) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(5) + [bad] + alpaca_rows(3))
    with pytest.raises(ShoalError, match=message) as err:
        download_sft(source, tmp_path / "out")
    assert f"{source}:6" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]  # no output, no temp folder


def test_existing_output_dir_needs_overwrite(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    download_sft(source, tmp_path / "out", seed=1)
    with pytest.raises(ShoalError, match="already exists"):
        download_sft(source, tmp_path / "out", seed=2)
    download_sft(source, tmp_path / "out", seed=2, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(SFT_FILES)


PRETRAIN_ROWS = [{"text": "台灣的新聞：颱風即將登陸。", "id": 1},
                 {"text": "Second article, with a comma.", "id": 2},
                 {"text": "第三篇「引號」與\n換行", "id": 3}]


def test_pretrain_from_jsonl_keeps_rows_and_utf8(tmp_path: Path) -> None:
    out = tmp_path / "json" / "wikinews.jsonl"
    assert download_pretrain(write_jsonl(tmp_path / "in.jsonl", PRETRAIN_ROWS), out) == 3
    assert read_jsonl(out) == PRETRAIN_ROWS
    raw = out.read_text(encoding="utf-8")
    assert "颱風" in raw and "\\u" not in raw
    assert download_pretrain(tmp_path / "in.jsonl", tmp_path / "two.jsonl", max_rows=2) == 2


def test_pretrain_from_csv_json_array_and_gz_without_datasets(tmp_path: Path, monkeypatch) -> None:
    import gzip

    # `datasets` and pyarrow unavailable: the demo's core-only install must still read these.
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with open(tmp_path / "in.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "id"])
        writer.writeheader()
        writer.writerows(PRETRAIN_ROWS)
    (tmp_path / "in.json").write_text(json.dumps(PRETRAIN_ROWS, ensure_ascii=False), encoding="utf-8")
    with gzip.open(tmp_path / "in.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PRETRAIN_ROWS))
    download_pretrain(tmp_path / "in.csv", tmp_path / "csv.jsonl")
    assert read_jsonl(tmp_path / "csv.jsonl") == [{"text": r["text"], "id": str(r["id"])} for r in PRETRAIN_ROWS]
    for name in ("in.json", "in.jsonl.gz"):
        download_pretrain(tmp_path / name, tmp_path / f"{name}.out.jsonl")
        assert read_jsonl(tmp_path / f"{name}.out.jsonl") == PRETRAIN_ROWS
    with pytest.raises(ShoalError, match="needs the optional `datasets` package"):
        download_pretrain("erhwenkuo/wikinews-zhtw", tmp_path / "hub.jsonl")
    (tmp_path / "in.parquet").write_bytes(b"PAR1")
    with pytest.raises(ShoalError, match="needs pyarrow"):
        download_pretrain(tmp_path / "in.parquet", tmp_path / "pq.jsonl")


def test_pretrain_bad_input_writes_nothing(tmp_path: Path) -> None:
    rows = PRETRAIN_ROWS + [{"body": "no text here"}]
    with pytest.raises(ShoalError, match=r"in\.jsonl:4: text column 'text' missing .*columns: body"):
        download_pretrain(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ShoalError, match=r"broken\.jsonl:2: not valid JSON"):
        download_pretrain(tmp_path / "broken.jsonl", tmp_path / "out.jsonl")
    with pytest.raises(ShoalError, match="not found"):
        download_pretrain(tmp_path / "missing.jsonl", tmp_path / "out.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl", "in.jsonl"]


def fake_hub(monkeypatch, behaviour) -> list[dict]:
    """Install a stand-in `datasets` module whose load_dataset calls `behaviour`; returns its calls."""
    calls: list[dict] = []

    def load_dataset(name, split=None, token=None, **kwargs):
        calls.append({"name": name, "split": split, "token": token})
        return behaviour(token)

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_unreachable_hub_says_how_to_pass_a_local_path_and_hides_the_token(tmp_path, monkeypatch) -> None:
    def offline(token):
        raise ConnectionError(f"Couldn't reach 'org/set' on the Hub (token {token} rejected)")

    calls = fake_hub(monkeypatch, offline)
    with pytest.raises(ShoalError) as err:
        download_pretrain("hf://org/set", tmp_path / "out.jsonl", token="hf_SECRET123")
    message = str(err.value)
    assert "could not load 'org/set'" in message and "pass the local path" in message
    assert "hf_SECRET123" not in message
    assert calls == [{"name": "org/set", "split": "train", "token": "hf_SECRET123"}]
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_reads_token_from_environment_and_never_writes_it(tmp_path, monkeypatch, capsys) -> None:
    calls = fake_hub(monkeypatch, lambda token: PRETRAIN_ROWS)
    monkeypatch.setenv("HF_TOKEN", "hf_ENVSECRET")
    assert cli_main(["download", "pretrain", "--dataset_name", "erhwenkuo/wikinews-zhtw",
                     "--output", str(tmp_path / "w.jsonl")]) == 0
    assert calls[0]["token"] == "hf_ENVSECRET"
    assert read_jsonl(tmp_path / "w.jsonl") == PRETRAIN_ROWS
    calls = fake_hub(monkeypatch, lambda token: alpaca_rows(6))
    assert cli_main(["download", "sft", "--dataset_name", "org/alpaca", "--hf_token", "hf_FLAG",
                     "--output_dir", str(tmp_path / "alpaca"), "--split", "0.34,0.33,0.33"]) == 0
    assert calls[0]["token"] == "hf_FLAG"
    captured = capsys.readouterr()
    for secret in ("hf_ENVSECRET", "hf_FLAG"):
        assert secret not in captured.out + captured.err
        assert all(secret not in p.read_text(encoding="utf-8") for p in tmp_path.rglob("*.jsonl"))


def test_cli_errors_exit_2(tmp_path, capsys) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(5))
    assert cli_main(["download", "sft", "--dataset_name", str(source), "--output_dir",
                     str(tmp_path / "o"), "--split", "0.5,0.5"]) == 2
    assert "expected three fractions" in capsys.readouterr().err


def test_save_to_disk_folder_and_parquet(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    dataset = datasets.Dataset.from_list(PRETRAIN_ROWS)
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "dict"))
    pq.write_table(pa.Table.from_pylist(PRETRAIN_ROWS), tmp_path / "in.parquet")
    for source, split, expected in (("saved", "train", PRETRAIN_ROWS), ("dict", "test", PRETRAIN_ROWS[:1]),
                                    ("in.parquet", "train", PRETRAIN_ROWS)):
        out = tmp_path / f"{source}.jsonl"
        download_pretrain(tmp_path / source, out, split=split)
        assert read_jsonl(out) == expected
    with pytest.raises(ShoalError, match="has no split 'validation'"):
        download_pretrain(tmp_path / "dict", tmp_path / "v.jsonl", split="validation")
