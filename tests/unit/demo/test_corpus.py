"""The demo's generated data: deterministic, well-formed, and with answers an independent reader agrees with."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shoal.demo import corpus
from shoal.errors import ShoalError

# The task's sentence forms, parsed here with regular expressions written from the task's
# description rather than with the generator's own helpers, so a wrong answer cannot agree with itself.
_EN_FACT = {
    "city": re.compile(r"(\w+) lives in (\w+)\."),
    "pet": re.compile(r"(\w+) has a (\w+)\."),
    "color": re.compile(r"(\w+) likes the color (\w+)\."),
}
_EN_QUESTION = [
    (re.compile(r"Where does (\w+) live\?$"), "city"),
    (re.compile(r"What pet does (\w+) have\?$"), "pet"),
    (re.compile(r"What color does (\w+) like\?$"), "color"),
]
_ZH_FACT = {
    "city": re.compile(r"([^。？]+?)住在([^。？]+)。"),
    "pet": re.compile(r"([^。？]+?)養了一隻([^。？]+)。"),
    "color": re.compile(r"([^。？]+?)最喜歡([^。？]+)。"),
}
_ZH_QUESTION = [
    (re.compile(r"([^。？]+)住在哪裡？$"), "city"),
    (re.compile(r"([^。？]+)養了什麼動物？$"), "pet"),
    (re.compile(r"([^。？]+)最喜歡什麼顏色？$"), "color"),
]


def _answer_by_reading(text: str) -> str:
    """Answer one task input the way a person would: find the question, then the matching fact."""
    zh = not text.isascii()
    questions, facts = (_ZH_QUESTION, _ZH_FACT) if zh else (_EN_QUESTION, _EN_FACT)
    for pattern, kind in questions:  # noqa: B007 (`kind` is read after the loop's break)
        asked = pattern.search(text)
        if asked:
            break
    else:
        raise AssertionError(f"no question found in {text!r}")
    context = text[: asked.start()]
    values = [value for name, value in facts[kind].findall(context) if name == asked.group(1)]
    assert len(values) == 1, f"expected one {kind} fact about {asked.group(1)} in {text!r}, found {values}"
    return values[0]


def test_generators_are_deterministic_for_a_seed():
    assert corpus.pretraining_documents(200, seed=3) == corpus.pretraining_documents(200, seed=3)
    assert corpus.pretraining_documents(200, seed=3) != corpus.pretraining_documents(200, seed=4)
    assert corpus.instruction_examples(50, seed=3) == corpus.instruction_examples(50, seed=3)
    assert corpus.instruction_examples(50, seed=3) != corpus.instruction_examples(50, seed=4)


def test_pretraining_corpus_file(tmp_path: Path):
    path = corpus.write_pretraining_corpus(tmp_path / "data" / "corpus.jsonl", num_documents=300, seed=0)
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [list(r) for r in rows] == [["text"]] * 300
    texts = [r["text"] for r in rows]
    assert texts == corpus.pretraining_documents(300, seed=0)
    assert all(t and t == t.strip() for t in texts)
    # Both languages are there: Traditional Chinese documents (non-ASCII) and English ones.
    chinese = [t for t in texts if re.search(r"[\u4e00-\u9fff]", t)]
    assert 0.2 * len(texts) < len(chinese) < 0.5 * len(texts)
    assert any("臺" in t or "台" in t for t in chinese)
    # "A few thousand short documents" by default.
    assert len(corpus.pretraining_documents()) >= 2000
    assert list(tmp_path.joinpath("data").iterdir()) == [path]  # no temporary file left behind


def test_pretraining_corpus_refuses_to_overwrite(tmp_path: Path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("keep me\n")
    with pytest.raises(ShoalError, match="already exists"):
        corpus.write_pretraining_corpus(path, num_documents=10)
    assert path.read_text() == "keep me\n"
    corpus.write_pretraining_corpus(path, num_documents=10, overwrite=True)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 10


def test_instruction_set_files_and_answers(tmp_path: Path):
    paths = corpus.write_instruction_set(tmp_path / "sft", sizes=(300, 40, 50), seed=0)
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == ["test.jsonl", "training.jsonl", "validation.jsonl"]
    splits = {}
    for split, size in (("training", 300), ("validation", 40), ("test", 50)):
        rows = [json.loads(line) for line in paths[split].read_text(encoding="utf-8").splitlines()]
        assert len(rows) == size
        for row in rows:
            assert set(row) == {"input", "output"}
            assert row["output"] and "\n" not in row["output"]
            assert _answer_by_reading(row["input"]) == row["output"], row
        splits[split] = {r["input"] for r in rows}
    assert any(not text.isascii() for text in splits["training"])  # Chinese rows too
    # The splits are drawn independently: the test inputs are (almost all) unseen in training.
    assert len(splits["test"] & splits["training"]) <= 2
    # The answer is not guessable from the question's kind: several values occur for each question.
    outputs = [json.loads(line)["output"] for line in paths["training"].read_text(encoding="utf-8").splitlines()]
    assert len(set(outputs)) > 30


def test_instruction_set_refuses_to_overwrite(tmp_path: Path):
    (tmp_path / "sft").mkdir()
    with pytest.raises(ShoalError, match="already exists"):
        corpus.write_instruction_set(tmp_path / "sft", sizes=(2, 2, 2))
    assert list((tmp_path / "sft").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["sft"]


def test_names_are_not_words_of_the_sentences():
    """An invented name that is also a word of the templates ("Have") would make sentences ambiguous."""
    world = corpus.make_world()
    names = {p.name for p in world}
    assert len(names) == len(world) and len({p.name_zh for p in world}) == len(world)
    words = set()
    for text in corpus.pretraining_documents(1000):
        words |= {w.lower() for w in re.findall(r"[A-Za-z]+", text) if w not in names}
    assert not words & {n.lower() for n in names}


def test_command_line_writes_both(tmp_path: Path):
    assert corpus.main(["--corpus", str(tmp_path / "c.jsonl"), "--sft-dir", str(tmp_path / "sft"),
                        "--num-documents", "20"]) == 0
    assert len((tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()) == 20
    assert (tmp_path / "sft" / "test.jsonl").is_file()
