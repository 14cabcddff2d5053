"""`shoal preprocess` against the tokenizer's own ids (the NeMo and Megatron-LM conventions), against
itself with one worker (the order is kept), and with bad input (clear errors, nothing written)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shoal.cli import main as cli_main
from shoal.data.indexed import IndexedDataset
from shoal.data.preprocess import preprocess
from shoal.errors import ShoalError

TEXTS = [
    "台灣的新聞：今天天氣晴朗。",
    "The quick brown fox jumps over the lazy dog.",
    "",  # empty: no document, as NeMo skips it
    "請用繁體中文回答下列問題。 And some English too.",
    " ",
    "def main(): return 0\n\nprint(main())",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_docs(prefix: str | Path) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    assert ds.document_indices.tolist() == list(range(len(ds) + 1))  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


def own_ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)])


def test_default_is_nemo_no_bos_and_eos_as_eod(tmp_path, corpus, tiny_tokenizer_dir, tiny_tokenizer):
    summary = preprocess([corpus], tmp_path / "out" / "wiki", tiny_tokenizer_dir, append_eod=True,
                         progress=False)
    prefix = tmp_path / "out" / "wiki_text_document"
    assert summary.prefixes == {"text": str(prefix)}
    eos = tiny_tokenizer.eos_token_id
    expected = [own_ids(tiny_tokenizer, t) + [eos] for t in TEXTS if t]
    assert read_docs(prefix) == expected
    assert all(doc[0] != tiny_tokenizer.bos_token_id for doc in expected)
    assert IndexedDataset(prefix).dtype == np.uint16  # len(tokenizer) < 65500
    assert summary.documents["text"] == len(expected) and summary.empty_skipped["text"] == 1
    assert summary.tokens["text"] == sum(map(len, expected))


def test_add_bos_gives_megatron_lm_tokens(tmp_path, corpus, tiny_tokenizer):
    preprocess([corpus], tmp_path / "p", tiny_tokenizer, append_eod=True, add_bos=True, progress=False)
    # Megatron-LM's script encodes with the tokenizer's special tokens, which put BOS in front.
    expected = [own_ids(tiny_tokenizer, t, special=True) + [tiny_tokenizer.eos_token_id]
                for t in TEXTS if t]
    assert all(doc[0] == tiny_tokenizer.bos_token_id for doc in expected)
    assert read_docs(tmp_path / "p_text_document") == expected


def test_without_append_eod_documents_are_bare_text(tmp_path, corpus, tiny_tokenizer):
    preprocess([corpus], tmp_path / "p", tiny_tokenizer, progress=False)
    assert read_docs(tmp_path / "p_text_document") == [own_ids(tiny_tokenizer, t) for t in TEXTS if t]


def test_several_workers_write_the_same_bytes_as_one(tmp_path, tiny_tokenizer):
    rows = [{"text": f"{TEXTS[i % len(TEXTS)]} {i}" * (i % 4)} for i in range(90)]
    inputs = [write_jsonl(tmp_path / "a.jsonl", rows[:50]), write_jsonl(tmp_path / "b.jsonl.gz", rows[50:])]
    for workers in (1, 3):
        # small batches so that many are in flight at once and finish out of order
        preprocess(inputs, tmp_path / f"w{workers}", tiny_tokenizer, append_eod=True,
                   workers=workers, batch_size=4, progress=False)
    for ext in ("bin", "idx"):
        one = (tmp_path / f"w1_text_document.{ext}").read_bytes()
        assert one == (tmp_path / f"w3_text_document.{ext}").read_bytes()
    expected = [own_ids(tiny_tokenizer, r["text"]) + [tiny_tokenizer.eos_token_id]
                for r in rows if r["text"]]
    assert read_docs(tmp_path / "w1_text_document") == expected


def test_each_json_key_gets_its_own_pair(tmp_path, tiny_tokenizer):
    rows = [{"text": "台灣", "title": ""}, {"text": "", "title": "新聞"}, {"text": "a b", "title": "c"}]
    summary = preprocess([write_jsonl(tmp_path / "in.jsonl", rows)], tmp_path / "p", tiny_tokenizer,
                         json_keys=["text", "title"], progress=False)
    for key in ("text", "title"):
        expected = [own_ids(tiny_tokenizer, r[key]) for r in rows if r[key]]
        assert read_docs(tmp_path / f"p_{key}_document") == expected
        assert summary.empty_skipped[key] == 1


def test_globs_folders_and_gz_inputs_are_read_in_sorted_order(tmp_path, tiny_tokenizer):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "2.jsonl.gz", [{"text": "second"}])
    write_jsonl(data / "1.json", [{"text": "first"}])
    write_jsonl(data / "3.jsonl", [{"text": "third"}])
    expected = [own_ids(tiny_tokenizer, t) for t in ("first", "second", "third")]
    preprocess([str(data / "*.json*")], tmp_path / "g", tiny_tokenizer, progress=False)
    assert read_docs(tmp_path / "g_text_document") == expected
    preprocess([data], tmp_path / "d", tiny_tokenizer, progress=False)
    assert read_docs(tmp_path / "d_text_document") == expected


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "not valid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"body": "x"}', "no key 'text' \\(keys present: 'body'\\)"),
    ('{"text": 7}', "key 'text' holds int, expected a string"),
])
def test_bad_line_is_an_error_naming_file_and_line(tmp_path, tiny_tokenizer, line, message):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n' + line + '\n{"text": "four"}\n',
                    encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ShoalError, match=message) as err:
        preprocess([path], out / "p", tiny_tokenizer, workers=2, batch_size=1, progress=False)
    assert f"{path}:3:" in str(err.value)
    assert list(out.iterdir()) == []  # no output, not even a temporary file
    summary = preprocess([path], out / "p", tiny_tokenizer, skip_bad_lines=True, progress=False)
    assert summary.bad_lines == 1
    assert read_docs(out / "p_text_document") == [own_ids(tiny_tokenizer, t) for t in ("one", "two", "four")]


def test_a_json_array_file_gets_a_hint(tmp_path, tiny_tokenizer):
    path = tmp_path / "in.json"
    path.write_text('[{"text": "a"}, {"text": "b"}]\n', encoding="utf-8")
    with pytest.raises(ShoalError, match="looks like one JSON array; expected JSON Lines"):
        preprocess([path], tmp_path / "p", tiny_tokenizer, progress=False)


def test_existing_outputs_need_overwrite_and_are_replaced_whole(tmp_path, corpus, tiny_tokenizer):
    preprocess([corpus], tmp_path / "p", tiny_tokenizer, progress=False)
    with pytest.raises(ShoalError, match="already exists; pass --overwrite"):
        preprocess([corpus], tmp_path / "p", tiny_tokenizer, append_eod=True, progress=False)
    preprocess([corpus], tmp_path / "p", tiny_tokenizer, append_eod=True, overwrite=True, progress=False)
    assert read_docs(tmp_path / "p_text_document")[0][-1] == tiny_tokenizer.eos_token_id


def test_large_vocabulary_uses_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70_000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w69999")
    texts = ["w1 w65535 w65536", "w69998 w2"]
    preprocess([write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])], tmp_path / "p",
               hf, append_eod=True, progress=False)
    assert IndexedDataset(tmp_path / "p_text_document").dtype == np.int32
    assert read_docs(tmp_path / "p_text_document") == [own_ids(hf, t) + [69999] for t in texts]


def test_tokenizer_from_a_shoal_checkpoint(tmp_path, corpus, tiny_tokenizer_dir, tiny_tokenizer):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_tokenizer_dir, ckpt / "tokenizer")
    (ckpt / "shoal.json").write_text("{}", encoding="utf-8")
    preprocess([corpus], tmp_path / "p", ckpt, progress=False)
    assert read_docs(tmp_path / "p_text_document") == [own_ids(tiny_tokenizer, t) for t in TEXTS if t]


def test_nemo_command_line_as_the_seed_writes_it(tmp_path, corpus, tiny_tokenizer_dir,
                                                 tiny_tokenizer, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["preprocess", f"--input={corpus}", "--json-keys=text", "--dataset-impl", "mmap",
            "--tokenizer-library=huggingface", "--tokenizer-type", str(tiny_tokenizer_dir),
            "--output-prefix=data/preprocessed/wikinews", "--append-eod", "--log-interval", "2",
            "--workers", "2"]
    assert cli_main(argv) == 0
    prefix = tmp_path / "data/preprocessed/wikinews_text_document"
    eos = tiny_tokenizer.eos_token_id
    assert read_docs(prefix) == [own_ids(tiny_tokenizer, t) + [eos] for t in TEXTS if t]
    err = capsys.readouterr().err
    assert "docs/s" in err and "ETA" in err  # progress
    assert "5 documents" in err and "1 empty documents skipped" in err  # summary

    megatron = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    theirs = megatron.IndexedDataset(str(prefix))
    assert [theirs[i].tolist() for i in range(len(theirs))] == read_docs(prefix)


@pytest.mark.parametrize("flags, message", [
    (["--tokenizer-library", "sentencepiece"], "only|not supported"),
    (["--dataset-impl", "lazy"], "--dataset-impl lazy is not supported"),
])
def test_unsupported_nemo_options_are_refused(tmp_path, corpus, tiny_tokenizer_dir, capsys,
                                              flags, message):
    argv = ["preprocess", "--input", str(corpus), "--tokenizer", str(tiny_tokenizer_dir),
            "--output-prefix", str(tmp_path / "p"), *flags]
    assert cli_main(argv) == 2
    assert "error:" in capsys.readouterr().err
    assert not list(tmp_path.glob("p_*"))


def test_missing_input_and_tokenizer_are_named(tmp_path, tiny_tokenizer):
    with pytest.raises(ShoalError, match="nope.jsonl matches no file"):
        preprocess([tmp_path / "nope.jsonl"], tmp_path / "p", tiny_tokenizer, progress=False)
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    with pytest.raises(ShoalError, match="no tokenizer found in"):
        preprocess([tmp_path / "in.jsonl"], tmp_path / "p", tmp_path, progress=False)


def test_load_tokenizer_sources_and_errors(tmp_path, tiny_tokenizer_dir, tiny_tokenizer, monkeypatch):
    from transformers import AutoTokenizer

    from shoal.data.tokenizer import load_tokenizer

    assert load_tokenizer(tiny_tokenizer_dir)("台灣").input_ids == tiny_tokenizer("台灣").input_ids
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "shoal.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ShoalError, match="has no tokenizer/ folder"):
        load_tokenizer(ckpt)
    with pytest.raises(ShoalError, match="is a file"):
        load_tokenizer(tiny_tokenizer_dir / "tokenizer.json")
    with pytest.raises(ShoalError, match="not found: not a local folder"):
        load_tokenizer(tmp_path / "no" / "such" / "dir")

    calls = []

    def unreachable(name, **kwargs):
        calls.append((name, kwargs))
        raise OSError(f"We couldn't connect to the Hub (token {kwargs.get('token')})")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", unreachable)
    with pytest.raises(ShoalError, match="if this machine is offline, pass a local tokenizer folder") as err:
        load_tokenizer("hf://meta-llama/Llama-3.1-8B-Instruct", token="hf_SECRET")
    assert "hf_SECRET" not in str(err.value)
    assert calls == [("meta-llama/Llama-3.1-8B-Instruct", {"trust_remote_code": False, "token": "hf_SECRET"})]
