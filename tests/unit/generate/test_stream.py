"""Streamed text equals the text of the whole answer, for a byte-level BPE tokenizer whose tokens
cut multi-byte characters (the demo tokenizer, Llama 3 style)."""

from __future__ import annotations

import io


def test_streamed_pieces_add_up_to_the_decoded_text():
    from transformers import AutoTokenizer

    from shoal.demo.tokenizer import TOKENIZER_DIR
    from shoal.generate.stream import TextStream

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    text = "Shoals of fish — 魚群 — swim together; naïve café ☕ ok\nnext line"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = io.StringIO()
    stream = TextStream(tokenizer, out)
    pieces = []
    for token in ids:
        before = out.getvalue()
        stream.push(token)
        pieces.append(out.getvalue()[len(before):])
        assert "\ufffd" not in out.getvalue()  # half a character is never shown
    assert stream.finish() == tokenizer.decode(ids) == text
    assert out.getvalue() == text + "\n"
    assert sum(1 for p in pieces if p) > len(ids) // 2  # it did stream, not print at the end
