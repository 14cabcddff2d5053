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


def test_chat_drops_the_oldest_exchanges_to_fit():
    """Hand-worked: each message costs 10 tokens, 8 messages are 80; room for 45 keeps the system
    prompt, the exchange before the newest question and that question (40), dropping two exchanges."""
    from shoal.generate.chat import _fit

    def encode(messages):
        return [0] * (10 * len(messages))

    system = [{"role": "system", "content": "s"}]
    turns = [{"role": r, "content": str(i)} for i in range(3) for r in ("user", "assistant")]
    messages = system + turns + [{"role": "user", "content": "last"}]
    kept, ids, dropped = _fit(messages, encode, room=45)
    assert kept == system + turns[-2:] + messages[-1:] and len(ids) == 40 and dropped == 2
    kept, ids, dropped = _fit(messages, encode, room=80)
    assert kept == messages and dropped == 0
