"""Text of a growing list of token ids, printed as it grows.

Decoding token by token would cut multi-byte characters and merge-sensitive spaces wrongly, so the
whole completion is decoded each time and only the new end is printed; a trailing U+FFFD means a
character is still incomplete, and is held back until its next byte arrives.
"""

from __future__ import annotations

import sys
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TextStream:
    """Prints the text of the tokens pushed so far to `out`, a piece at a time."""

    def __init__(self, tokenizer: "PreTrainedTokenizerBase", out: IO[str] | None = None):
        self.tokenizer = tokenizer
        self.out = out or sys.stdout
        self.tokens: list[int] = []
        self.printed = 0  # characters of the decoded text already written

    def push(self, token_id: int) -> None:
        self.tokens.append(token_id)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def finish(self) -> str:
        """Write whatever is left and a newline; return the full text."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()
        self.printed = len(text)
        return text
