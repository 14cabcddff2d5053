"""Fine-tuning (SFT) data: JSONL rows -> prompt + answer tokens with an answer-only loss mask.

A data set is a folder holding `training.jsonl`, `validation.jsonl` and `test.jsonl`. Each line is one
of three forms (other keys are ignored):

* `{"input", "output"}`: the seed's form, a single turn;
* `{"instruction", "input", "output"}`: alpaca; the user turn is `instruction + "\n" + input`
  (just the instruction when `input` is empty);
* `{"messages": [{"role", "content"}, ...]}`: a chat with system/user/assistant turns, any number.

The prompt comes from the tokenizer's chat template, or from a template string the user gives (see
`PromptTemplate`). The loss covers exactly each assistant turn's text and its end-of-turn token.
Truncation, BOS handling and packing are described in `docs/sft-data.md`; the row layout (tokens,
labels, loss_mask, position_ids, document_ids) is that of `shoal.data.packing.build_row`, the same
keys the pretraining dataset returns.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from shoal.data.packing import Example, build_row, example_length, first_fit_decreasing, packing_efficiency
from shoal.errors import ShoalError

if TYPE_CHECKING:  # transformers is slow to import; only a tokenizer object or a path reaches us
    from transformers import PreTrainedTokenizerBase

SPLITS = ("training", "validation", "test")
_SPLIT_ALIASES = {"train": "training", "val": "validation", "valid": "validation"}
_ROLES = ("system", "user", "assistant", "tool", "ipython")
# Examples are tokenized in batches of this many so the fast tokenizer works in parallel in Rust
# while memory stays bounded on large files.
_TOKENIZE_BATCH = 2048


# ---------------------------------------------------------------------------------------------
# Reading rows


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a JSONL file as (`file:line`, object) pairs; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ShoalError(f"{path}: no such file (expected a JSONL file of fine-tuning examples)")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ShoalError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ShoalError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ShoalError(f"{where}: expected a JSON object, got {type(row).__name__}")
            rows.append((where, row))
    if not rows:
        raise ShoalError(f"{path}: holds no examples")
    return rows


def _string_field(row: dict[str, Any], key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise ShoalError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    return value


def row_to_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """Any of the three row forms as a list of chat messages."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ShoalError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ShoalError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
            if m["role"] not in _ROLES:
                raise ShoalError(f"{where}: messages[{i}] has role {m['role']!r}; expected one of {', '.join(_ROLES)}")
            if not isinstance(m["content"], str):
                raise ShoalError(f"{where}: messages[{i}].content must be a string")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise ShoalError(f"{where}: 'messages' has no assistant turn, so there is nothing to learn")
        return out
    if "output" not in row or ("input" not in row and "instruction" not in row):
        raise ShoalError(
            f"{where}: expected keys 'input' and 'output', or 'instruction', 'input' and 'output' (alpaca), "
            f"or 'messages' (chat); found {sorted(row)}"
        )
    output = _string_field(row, "output", where)
    if "instruction" in row:
        user = _string_field(row, "instruction", where)
        extra = _string_field(row, "input", where) if "input" in row else ""
        if extra:
            user = user + "\n" + extra
    else:
        user = _string_field(row, "input", where)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


# ---------------------------------------------------------------------------------------------
# Prompt rendering


_PLACEHOLDER = re.compile(r"\{(system|input|output)\}")


@dataclass(frozen=True)
class PromptTemplate:
    """A user-given single-turn template with `{system}`, `{input}` and `{output}` placeholders.

    Only those three names are placeholders; any other brace is literal text. `{input}` and
    `{output}` must each appear once, `{output}` after `{input}`. Text before `{output}` is the
    prompt; the answer is the output plus the template's text after `{output}` up to and including
    its first special token (the end-of-turn token, e.g. `<|eot_id|>`); anything after that is
    dropped. When no special token follows `{output}`, the tokenizer's EOS token is appended, as
    NeMo's `add_eos=True` does.
    """

    text: str

    def __post_init__(self) -> None:
        names = _PLACEHOLDER.findall(self.text)
        for name in ("input", "output"):
            if names.count(name) != 1:
                raise ShoalError(f"prompt template must contain {{{name}}} exactly once; got {self.text!r}")
        if names.index("output") < names.index("input") or names[-1] != "output":
            raise ShoalError(f"prompt template must put {{output}} after every other placeholder; got {self.text!r}")

    @property
    def uses_system(self) -> bool:
        return "{system}" in self.text

    @property
    def closing(self) -> str:
        """The template's text after `{output}`."""
        return self.text[self.text.index("{output}") + len("{output}"):]

    def split(self, system: str, user: str, output: str) -> tuple[str, str]:
        """(prompt text, output text followed by the template's closing text)."""
        at = self.text.index("{output}")
        values = {"system": system, "input": user}
        # One substitution pass, so braces inside the user's text are never expanded again.
        prompt = _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.text[:at])
        return prompt, output + self.closing


def read_prompt_template(value: str) -> str:
    """A template from the command line: `@FILE` reads the file, otherwise `\\n`, `\\t`, `\\\\` are unescaped."""
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_text(encoding="utf-8")
        except OSError as e:
            raise ShoalError(f"{value[1:]}: cannot read prompt template ({e.strerror})") from None
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], value)


def _special_token_pattern(tokenizer: PreTrainedTokenizerBase) -> re.Pattern[str] | None:
    """Regex matching any special added token's text: one of these closes an assistant turn."""
    texts = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content}
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def _answer_end(region: str, content: str, special: re.Pattern[str] | None) -> int:
    """Where the trained part of an assistant region ends: just after the first special token that
    follows the content (the end-of-turn token). Text after it (e.g. ChatML's newline) is context."""
    stripped = content.strip()
    at = region.find(stripped) if stripped else -1
    start = at + len(stripped) if at >= 0 else 0
    match = special.search(region, start) if special is not None else None
    return match.end() if match else len(region)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as e:  # jinja2 raises several types; the template's own raise_exception too
        raise ShoalError(f"{where}: the tokenizer's chat template failed on this row: {e}") from None
    if not isinstance(text, str):
        raise ShoalError(f"{where}: the tokenizer's chat template did not render to a string")
    return text


@dataclass
class Rendering:
    """A row as text, with the character spans of its answers.

    `whole` rows (chat templates) are tokenized in one piece, as `apply_chat_template` would, and
    the answer spans located by tokenizing the text up to each span boundary; other rows (prompt
    templates) are tokenized piece by piece, prompt apart from answer, as NeMo does.
    """

    text: str
    answers: list[tuple[int, int]]
    whole: bool


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], special: re.Pattern[str] | None, where: str
) -> Rendering:
    """The chat template's rendering of a conversation, with every assistant turn's span.

    For assistant turn k, rendering messages[:k] with the generation prompt gives where the answer
    starts and rendering messages[:k+1] where its turn ends; both must be prefixes of the whole
    conversation's rendering, or the template renders earlier turns differently once later turns
    exist and no answer span can be trusted.
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1]  # turns after the last answer teach nothing
    full = _render(tokenizer, messages, False, where)
    answers: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], True, where)
        through = _render(tokenizer, messages[: k + 1], False, where)
        if not (full.startswith(through) and through.startswith(before)) or (answers and len(before) < answers[-1][1]):
            raise ShoalError(
                f"{where}: the chat template is not prefix-stable: rendering the first {k} messages with the "
                f"generation prompt, then the first {k + 1}, does not give prefixes of the whole conversation, so "
                "the assistant turns cannot be located; give a prompt template instead or fix the chat template"
            )
        answers.append((len(before), len(before) + _answer_end(through[len(before):], message["content"], special)))
    # Text after the last end-of-turn token (ChatML's newline) would only be a label with no loss.
    return Rendering(full[: answers[-1][1]], answers, whole=True)


def _cuts(rendering: Rendering) -> tuple[list[int], list[bool]]:
    """Character offsets splitting the text into pieces, and whether each piece is answer."""
    cuts = sorted({0, len(rendering.text), *(c for span in rendering.answers for c in span)})
    is_answer = [any(a <= c < b for a, b in rendering.answers) for c in cuts[:-1]]
    return cuts, is_answer


def tokenize_renderings(
    tokenizer: PreTrainedTokenizerBase, renderings: list[Rendering], wheres: list[str]
) -> list[tuple[list[int], list[bool]]]:
    """Token ids and per-id answer flags for each rendering, in one batched tokenizer call.

    A whole rendering's answer boundaries are found by tokenizing the text up to each of them: each
    such prefix must tokenize to a prefix of the whole text's ids (so the prompt's ids are exactly
    those a model is given at inference), otherwise the row is refused.
    """
    requests: list[str] = []
    plans = []
    for r in renderings:
        cuts, is_answer = _cuts(r)
        pieces = [r.text[:c] for c in cuts[1:]] if r.whole else [r.text[a:b] for a, b in zip(cuts, cuts[1:])]
        plans.append((len(requests), len(pieces), cuts, is_answer))
        requests += pieces
    encoded = tokenizer(requests, add_special_tokens=False)["input_ids"] if requests else []
    out = []
    for r, where, (first, count, cuts, is_answer) in zip(renderings, wheres, plans):
        parts = encoded[first:first + count]
        if r.whole:
            ids = list(parts[-1])
            ends = []
            for cut, prefix in zip(cuts[1:], parts):
                if ids[: len(prefix)] != prefix:
                    raise ShoalError(
                        f"{where}: the tokenizer splits the conversation differently when it stops at character "
                        f"{cut}, where an answer starts or ends, so the answer's tokens cannot be located; "
                        "give a prompt template instead"
                    )
                ends.append(len(prefix))
            lengths = [b - a for a, b in zip([0, *ends[:-1]], ends)]
        else:
            ids = [i for piece in parts for i in piece]
            lengths = [len(piece) for piece in parts]
        answer = [flag for flag, n in zip(is_answer, lengths) for _ in range(n)]
        out.append((ids, answer))
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizing and truncating


def truncate_example(ids: np.ndarray, answer: np.ndarray, seq_length: int, bos_id: int | None) -> Example | None:
    """Fit an example into seq_length positions (seq_length + 1 ids); None when nothing is left to learn.

    The prompt (everything before the first answer token) is cut from the left, after a leading
    BOS which stays, but keeps at least half the window (or all of itself if shorter); what is still
    too long is cut from the right, through the answer and any later turns.
    """
    budget = seq_length + 1
    n = len(ids)
    if n > budget:
        first = int(np.argmax(answer)) if answer.any() else n
        keep_prompt = min(first, max(budget - (n - first), budget // 2))
        keep_rest = budget - keep_prompt
        if keep_prompt and bos_id is not None and ids[0] == bos_id:
            prompt = np.r_[0, np.arange(first - keep_prompt + 1, first)]
        else:
            prompt = np.arange(first - keep_prompt, first)
        index = np.r_[prompt, np.arange(first, first + keep_rest)].astype(np.int64)
        ids, answer = ids[index], answer[index]
    if not answer[1:].any():
        return None
    return ids, answer


def _resolve_tokenizer(tokenizer: PreTrainedTokenizerBase | str | os.PathLike) -> PreTrainedTokenizerBase:
    """A tokenizer object as it is; a folder, shoal checkpoint or Hub id loaded (never remote code)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from shoal.data.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's ordinary encoding starts with BOS (Llama's does, Qwen's has no BOS)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


class SFTDataset(Dataset):
    """Map-style fine-tuning dataset: one example per row of `pad_to` (default `seq_length`) positions.

    Every row is tokenized once, at construction. Rows whose answer does not survive truncation
    are dropped; `num_dropped` and `num_truncated` count them. Items are the dicts of
    `shoal.data.packing.build_row`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike,
        seq_length: int,
        prompt_template: str | None = None,
        system_prompt: str | None = None,
        pad_to: int | None = None,
        pad_id: int | None = None,
    ):
        if seq_length < 1:
            raise ShoalError(f"seq_length must be at least 1, got {seq_length}")
        self.path = Path(path)
        self.tokenizer = _resolve_tokenizer(tokenizer)
        self.seq_length = seq_length
        self.length = seq_length if pad_to is None else pad_to
        if self.length < seq_length:
            raise ShoalError(f"pad_to ({pad_to}) must be at least seq_length ({seq_length})")
        self.template = PromptTemplate(prompt_template) if prompt_template is not None else None
        self.system_prompt = system_prompt
        self.pad_id = self._pick_pad_id(pad_id)
        self._special = _special_token_pattern(self.tokenizer)
        # A template whose closing text has no end-of-turn token gets EOS after each answer.
        self._append_eos = self.template is not None and (
            self._special is None or not self._special.search(self.template.closing))
        self._check_prompt_source()
        self.examples: list[Example] = []
        self.num_rows = self.num_truncated = self.num_dropped = 0
        self.empty_answers: list[str] = []  # `file:line` of rows whose answer is empty
        self._load()

    def _pick_pad_id(self, pad_id: int | None) -> int:
        # Padding carries no loss, so any valid id will do; the tokenizer's pad, else EOS as NeMo uses.
        for candidate in (pad_id, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def _check_prompt_source(self) -> None:
        if self.template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ShoalError(
                f"{self.path}: the tokenizer has no chat template; give a prompt template such as "
                "'<|start_header_id|>user<|end_header_id|>\\n\\n{input}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\\n\\n{output}<|eot_id|>'"
            )
        if self.template is not None and self.template.uses_system and self.system_prompt is None:
            raise ShoalError("the prompt template uses {system} but no system prompt was given")
        if self._append_eos and self.tokenizer.eos_token is None:
            raise ShoalError("no special token follows {output} in the prompt template and the tokenizer has no "
                             "EOS token to close answers with")

    def _render_row(self, row: dict[str, Any], where: str) -> Rendering:
        messages = row_to_messages(row, where)
        if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
            self.empty_answers.append(where)
        if self.template is None:
            if self.system_prompt is not None and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.system_prompt}, *messages]
            return render_chat(self.tokenizer, messages, self._special, where)
        system = self.system_prompt or ""
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise ShoalError(
                f"{where}: a prompt template renders one user turn and one answer; this row has "
                f"{[m['role'] for m in messages]} (use the tokenizer's chat template for multi-turn chats)"
            )
        prompt, answer = self.template.split(system, messages[0]["content"], messages[1]["content"])
        if self._append_eos:
            answer += self.tokenizer.eos_token
        end = len(prompt) + _answer_end(answer, messages[1]["content"], self._special)
        return Rendering((prompt + answer)[:end], [(len(prompt), end)], whole=False)

    def _load(self) -> None:
        rows = read_jsonl(self.path)
        bos = self.tokenizer.bos_token_id if _adds_bos(self.tokenizer) else None
        for start in range(0, len(rows), _TOKENIZE_BATCH):
            batch = rows[start:start + _TOKENIZE_BATCH]
            wheres = [where for where, _ in batch]
            renderings = [self._render_row(row, where) for where, row in batch]
            for ids, answer in tokenize_renderings(self.tokenizer, renderings, wheres):
                # Exactly one BOS when the tokenizer's own encoding has one; templates that write it keep theirs.
                if bos is not None and ids[:1] != [bos]:
                    ids, answer = [bos, *ids], [False, *answer]
                self._add(np.asarray(ids, dtype=np.int64), np.asarray(answer, dtype=bool))
        self.num_rows = len(rows)
        _warn_empty_answers(self.path, self.empty_answers, len(rows))
        if not self.examples:
            raise ShoalError(f"{self.path}: no example keeps an answer token within seq_length {self.seq_length}")

    def _add(self, ids: np.ndarray, answer: np.ndarray) -> None:
        kept = truncate_example(ids, answer, self.seq_length, self.tokenizer.bos_token_id)
        if kept is None:
            self.num_dropped += 1
            return
        self.num_truncated += len(kept[0]) != len(ids)
        self.examples.append(kept)

    def describe(self) -> str:
        """One line for the log: how many rows became examples, were truncated or dropped."""
        return (f"{self.path}: {len(self.examples)} examples from {self.num_rows} rows "
                f"({self.num_truncated} truncated to seq_length {self.seq_length}, "
                f"{self.num_dropped} dropped with no answer token left)")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return build_row([self.examples[index]], self.length, self.pad_id)


class PackedSFTDataset(SFTDataset):
    """SFTDataset whose rows hold several examples each, packed by first-fit decreasing.

    `packs` lists the example indices of each row; `packing_efficiency` is the fraction of
    positions holding example tokens. Examples in a row do not attend to each other (document ids)
    and their positions restart, so a packed row trains exactly as its examples would one by one.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        lengths = [example_length(e) for e in self.examples]
        self.packs = first_fit_decreasing(lengths, self.seq_length)
        self.packing_efficiency = packing_efficiency(lengths, self.packs, self.seq_length)

    def describe(self) -> str:
        return (f"{super().describe()}; packed into {len(self.packs)} sequences of {self.seq_length} tokens, "
                f"packing efficiency {self.packing_efficiency:.3f}")

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return build_row([self.examples[i] for i in self.packs[index]], self.length, self.pad_id)


def _warn_empty_answers(path: Path, wheres: list[str], rows: int) -> None:
    """Empty answers are kept (they teach the model to end its turn at once) but said, with where they are.

    Printed by the first rank only: every rank builds the same dataset.
    """
    if not wheres or os.environ.get("RANK", "0") != "0":
        return
    shown = ", ".join(wheres[:5]) + (f" and {len(wheres) - 5} more" if len(wheres) > 5 else "")
    print(f"shoal: warning: {path}: {len(wheres)} of {rows} rows have an empty answer ('output'): {shown}; each "
          "teaches the model to end its turn at once. Kept as they are; remove them if that is not meant",
          file=sys.stderr)


def sft_split_path(dataset_root: str | os.PathLike, split: str) -> Path:
    """`dataset_root/<split>.jsonl`, accepting train/val as short names; a clear error when missing."""
    name = _SPLIT_ALIASES.get(split, split)
    if name not in SPLITS:
        raise ShoalError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    path = Path(dataset_root) / f"{name}.jsonl"
    if not path.is_file():
        raise ShoalError(f"{path}: missing; a fine-tuning dataset folder holds {', '.join(s + '.jsonl' for s in SPLITS)}")
    return path


def load_sft_split(
    dataset_root: str | os.PathLike,
    split: str,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike,
    seq_length: int,
    pack: bool = False,
    **kwargs: Any,
) -> SFTDataset:
    """The dataset of one split of a fine-tuning folder, packed or not; kwargs go to SFTDataset."""
    return build_sft_dataset(sft_split_path(dataset_root, split), tokenizer, seq_length, pack=pack, **kwargs)


def build_sft_dataset(
    path: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike,
    seq_length: int,
    pack: bool = False,
    prompt_template: str | None = None,
    system_prompt: str | None = None,
    seed: int | None = None,
    verbose: bool = False,
    **kwargs: Any,
) -> SFTDataset:
    """The training entry point's way in: packed or not, a command-line template unescaped
    (`read_prompt_template`), and with `verbose` a summary line on stderr.

    `seed` is accepted for symmetry with the pretraining data but changes nothing: packing is
    deterministic and the sampler does the shuffling.
    """
    del seed
    template = read_prompt_template(prompt_template) if prompt_template is not None else None
    cls = PackedSFTDataset if pack else SFTDataset
    dataset = cls(path, tokenizer, seq_length, prompt_template=template, system_prompt=system_prompt, **kwargs)
    if verbose:
        print(f"shoal: {dataset.describe()}", file=sys.stderr)
    return dataset


__all__ = [
    "PackedSFTDataset", "PromptTemplate", "Rendering", "SFTDataset", "build_sft_dataset", "load_sft_split",
    "read_jsonl", "render_chat", "tokenize_renderings",
    "read_prompt_template", "row_to_messages", "sft_split_path", "truncate_example",
]
