"""`shoal chat` driven as a person drives it: a child process on a pseudo-terminal, keys typed
into it (Ctrl-C included, which the terminal turns into SIGINT), the screen read back.

The answers are checked against transformers generating from the Hugging Face folder with the
whole conversation so far through the same chat template.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time

import pytest
import torch
from test_generate_matches_transformers import hf_generate

from tests.helpers.generation import EOT_ID, TinyModel, write_model

VOCAB = 33  # exactly the test tokenizer's, so that every generated id prints as a word


class Terminal:
    """A command on a pseudo-terminal: type into it, read the screen until a text appears."""

    def __init__(self, argv: list[str]):
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TERM="dumb")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            os.execvpe(argv[0], argv, env)
        self.screen = ""
        self.pos = 0

    def read_until(self, text: str, timeout: float = 120) -> str:
        """What the screen shows from the end of the last match until `text` (inclusive)."""
        deadline = time.monotonic() + timeout
        while text not in self.screen[self.pos:]:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"{text!r} did not appear; the screen shows:\n{self.screen[-3000:]}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # the child has gone
                chunk = b""
            if not chunk:
                raise AssertionError(f"the program ended before {text!r}:\n{self.screen[-3000:]}")
            self.screen += chunk.decode("utf-8", "replace").replace("\r\n", "\n")
        end = self.screen.index(text, self.pos) + len(text)
        seen, self.pos = self.screen[self.pos:end], end
        return seen

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def exit_status(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep the pty drained so the child never blocks on a full buffer
                if select.select([self.fd], [], [], 0.1)[0]:
                    os.read(self.fd, 4096)
            except OSError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the program did not exit")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> TinyModel:
    """A tiny Mistral (untied output head) whose vocabulary is the tokenizer's, its <|eot_id|> row
    of the output head zeroed so that greedy answers run to --max_new_tokens: long answers to stop."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("chat")
    hf = write_model(root / "orig", "mistral", vocab_size=VOCAB, max_position_embeddings=4096).hf_dir
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[EOT_ID] = 0
    model.save_pretrained(hf)
    from shoal.cli import main

    assert main(["import", "--source", str(hf), "--output_path", str(root / "ckpt")]) == 0
    return TinyModel("mistral", hf, root / "ckpt")


def expected_answer(model: TinyModel, messages: list[dict], max_new: int) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model.checkpoint / "tokenizer")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tok.decode(hf_generate(model.hf_dir, ids, max_new, [EOT_ID]), skip_special_tokens=True)


def chat(model: TinyModel, *extra: str) -> Terminal:
    return Terminal([sys.executable, "-m", "shoal.cli", "chat", "--source", str(model.checkpoint), "--device", "cpu",
                     "--greedy", *extra])


def answer_of(seen: str) -> str:
    """The assistant's text in a screen capture `... assistant: TEXT\\nyou: `."""
    return re.search(r"assistant: (.*)\nyou: $", seen, re.S).group(1)


def test_two_turns_then_reset(chat_model: TinyModel):
    term = chat(chat_model, "--max_new_tokens", "12", "--system_prompt", "you are a fish")
    term.read_until("you: ")
    system = {"role": "system", "content": "you are a fish"}
    first = [system, {"role": "user", "content": "hello world"}]
    term.type("hello world\n")
    answer1 = answer_of(term.read_until("\nyou: "))
    assert answer1 == expected_answer(chat_model, first, 12) and answer1

    second = first + [{"role": "assistant", "content": answer1}, {"role": "user", "content": "how are you"}]
    term.type("how are you\n")
    answer2 = answer_of(term.read_until("\nyou: "))
    assert answer2 == expected_answer(chat_model, second, 12)
    # The history mattered: alone, the second question gets another answer.
    assert answer2 != expected_answer(chat_model, [system, {"role": "user", "content": "how are you"}], 12)

    term.type("/reset\n")
    term.read_until("(conversation reset)\nyou: ")
    term.type("how are you\n")
    assert answer_of(term.read_until("\nyou: ")) == expected_answer(
        chat_model, [system, {"role": "user", "content": "how are you"}], 12)
    term.type("/exit\n")
    assert term.exit_status() == 0


def test_ctrl_c_stops_the_answer_not_the_chat(chat_model: TinyModel):
    long = 3000  # greedy answers of this model never end early (see chat_model)
    term = chat(chat_model, "--max_new_tokens", str(long))
    term.read_until("you: ")
    term.type("hello world\n")
    term.read_until("assistant: ")
    term.read_until(" ")  # a few words in
    term.type("\x03")  # Ctrl-C
    seen = term.read_until("(stopped)\nyou: ")
    assert len(seen.split()) < long // 2  # stopped well before the end
    # Still talking: it takes commands and starts (and stops) the next answer.
    term.type("/reset\n")
    term.read_until("(conversation reset)\nyou: ")
    term.type("the quick fox\n")
    term.read_until("assistant: ")
    term.read_until(" ")
    term.type("\x03")
    term.read_until("(stopped)\nyou: ")
    term.type("\x04")  # Ctrl-D leaves
    assert term.exit_status() == 0
