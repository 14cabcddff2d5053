"""Prompts as the user gives them (text, chat messages, a JSONL file) -> token ids for the model.

A JSONL prompt file holds one object per line: `{"prompt": "..."}` or `{"messages": [{"role",
"content"}, ...]}`; other keys are carried through to the output line (an `id`, say). With
`--chat` a plain prompt becomes one user message (after `--system_prompt` when given) and goes
through the tokenizer's chat template with the assistant's header opened; without it the text is
tokenized as it is, with the tokenizer's own special tokens (BOS), as `tokenizer(text)` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.errors import ShoalError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")


@dataclass
class Prompt:
    """One request: plain text or chat messages, plus the keys of its JSONL line to echo back."""

    text: str | None = None
    messages: list[dict[str, str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ShoalError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise ShoalError(f"{where}: messages[{i}] must be {{\"role\": one of {list(ROLES)}, "
                             f"\"content\": a string}}, got {json.dumps(message)[:80]}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Every prompt of a JSONL file; a bad line is reported as FILE:LINE with what was expected."""
    path = Path(path)
    if not path.is_file():
        raise ShoalError(f"--prompts {path}: no such file")
    prompts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ShoalError(f"{path}: not a UTF-8 text file") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ShoalError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise ShoalError(f"{where}: expected a JSON object with \"prompt\" or \"messages\"")
        if "messages" in row:
            extra = {k: v for k, v in row.items() if k != "messages"}
            prompts.append(Prompt(messages=check_messages(row["messages"], where), extra=extra))
        elif isinstance(row.get("prompt"), str):
            prompts.append(Prompt(text=row["prompt"], extra={k: v for k, v in row.items() if k != "prompt"}))
        else:
            raise ShoalError(f"{where}: expected a \"prompt\" string or a \"messages\" list, "
                             f"found keys {sorted(row)}")
    if not prompts:
        raise ShoalError(f"{path}: holds no prompts")
    return prompts


def chat_messages(prompt: Prompt, system_prompt: str | None) -> list[dict[str, str]]:
    """The conversation a prompt stands for in chat mode."""
    messages = list(prompt.messages) if prompt.messages is not None else [{"role": "user", "content": prompt.text}]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation with the assistant's turn opened, by the tokenizer's own template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ShoalError("the tokenizer has no chat template (tokenizer_config.json has no \"chat_template\"); "
                         "drop --chat, or use a checkpoint of an instruction-tuned model")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, chat: bool,
                  system_prompt: str | None = None) -> list[int]:
    """Token ids of one prompt: through the chat template in chat mode (or when it is messages)."""
    if chat or prompt.messages is not None:
        return apply_chat_template(tokenizer, chat_messages(prompt, system_prompt))
    return [int(i) for i in tokenizer(prompt.text)["input_ids"]]
