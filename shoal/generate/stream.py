"""Text of a growing list of token ids, printed as it grows.

Decoding token by token would cut multi-byte characters and lose the spaces some tokenizers only
produce between tokens, so each new token is decoded together with the one before it and only the
difference is printed; a trailing U+FFFD means a character is still incomplete, and it waits for
the next token. Each step decodes two or three tokens, whatever the answer's length.
"""

from __future__ import annotations

import sys
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TextStream:
    """Prints the text of the tokens pushed so far to `out`, a piece at a time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, out: IO[str] | None = None):
        self.tokenizer = tokenizer
        self.out = out or sys.stdout
        self.tokens: list[int] = []
        self.start = 0  # first token of the decoding window
        self.done = 0  # tokens whose text has been printed
        self.printed = ""

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def push(self, token_id: int) -> None:
        self.tokens.append(token_id)
        before = self._decode(self.tokens[self.start:self.done])
        after = self._decode(self.tokens[self.start:])
        if after.endswith("\ufffd") or not after.startswith(before):
            return  # an incomplete character: wait for the next token
        piece = after[len(before):]
        self._write(piece)
        if piece:  # a token that printed nothing (a skipped special) stays in the window
            self.start = self.done
        self.done = len(self.tokens)

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.printed += text

    def finish(self) -> str:
        """Write whatever is left and a newline; return the full text."""
        text = self._decode(self.tokens)
        if text.startswith(self.printed):
            self._write(text[len(self.printed):])
        self.out.write("\n")
        self.out.flush()
        return text
