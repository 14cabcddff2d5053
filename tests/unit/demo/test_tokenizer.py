"""The shipped demo tokenizer, seen through `transformers` as a user would load it."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from shoal.demo import corpus
from shoal.demo.tokenizer import TOKENIZER_DIR, write_tokenizer

# Llama 3.1's special tokens and their offsets from <|begin_of_text|> (formats.md §5.2).
LLAMA31_SPECIAL_OFFSETS = {
    "<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|finetune_right_pad_id|>": 4, "<|start_header_id|>": 6,
    "<|end_header_id|>": 7, "<|eom_id|>": 8, "<|eot_id|>": 9, "<|python_tag|>": 10,
}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def test_loads_with_no_flags_and_has_llama3_special_tokens(tok):
    assert sorted(p.name for p in TOKENIZER_DIR.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert 512 <= len(tok) <= 2048
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.eos_token == "<|eot_id|>"
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    for token, offset in LLAMA31_SPECIAL_OFFSETS.items():
        assert tok.convert_tokens_to_ids(token) == bos + offset, token
        assert tok.encode(token, add_special_tokens=False) == [bos + offset], token  # never split
    # Every id up to the vocabulary size has a token: no holes for the model's embedding to cover.
    assert len(tok.convert_ids_to_tokens(list(range(len(tok))))) == len(tok)
    assert tok.unk_token is None


def test_round_trips_the_corpus_and_any_text(tok):
    texts = corpus.pretraining_documents(600) + [r["input"] for r in corpus.instruction_examples(200)]
    texts += [
        "繁體中文：臺灣的鳳梨酥很好吃！Emoji 🐢🍍, accents éàü, Ελληνικά, русский, tabs\tand\nnewlines\n\n",
        "  leading and trailing spaces  ", "12345 + 67890 = 80235", "<not special> <|not a token|>",
    ]
    assert any(not t.isascii() for t in texts)
    bos = tok.bos_token_id
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == bos and bos not in ids[1:]  # Llama 3 style: BOS added once in front
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids[1:]) == text


def test_vocabulary_fits_the_corpus(tok):
    """Trained on the corpus, the BPE compresses it well below one token per character."""
    texts = corpus.pretraining_documents(300)
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    chars = sum(len(t) for t in texts)
    assert tokens < 0.5 * chars


def test_chat_template_renders_llama3_format(tok):
    user, answer = "王小明住在哪裡？ ", "台南"
    expected = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n王小明住在哪裡？<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n台南<|eot_id|>"
    )
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == expected[: expected.index("台南")]
    with_system = tok.apply_chat_template(
        [{"role": "system", "content": "Answer briefly."}] + messages[:1], tokenize=False)
    assert with_system.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>")
    # Tokenised, the rendering holds one BOS and the special tokens as single ids.
    ids = tok(expected, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids.count(tok.convert_tokens_to_ids("<|eot_id|>")) == 2
    assert tok.decode(ids) == expected


def test_rebuild_reproduces_the_shipped_files(tmp_path: Path):
    out = write_tokenizer(tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name
