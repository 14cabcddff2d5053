"""SFT dataset: prompts, answer-only loss masks, truncation, BOS, packing, and bad input.

Two tokenizers are built here with the `tokenizers` library: a Llama 3 style one (BOS added by its
post-processor, `<|start_header_id|>`...`<|eot_id|>` chat template) and a ChatML one in Qwen's style
(no BOS, `<|im_start|>`...`<|im_end|>\\n`). Expected answer tokens are computed independently by
tokenizing `answer + end-of-turn` directly; the rendered conversation comes from
`apply_chat_template`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from shoal.data.sft import (
    PackedSFTDataset,
    SFTDataset,
    build_sft_dataset,
    load_sft_split,
    read_prompt_template,
    truncate_example,
)
from shoal.errors import ShoalError
from shoal.models.document_attention import attention_mask
from shoal.models.model import build_model
from shoal.models.presets import get_preset
from tests.helpers.tokenizers import byte_level_bpe

torch.set_num_threads(1)

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Translate to French: good morning. Bonjour.",
    "Write a short poem about the sea. The sea is wide and blue, the waves come back to you.",
    "You are a helpful assistant. Answer briefly and politely.",
    "Tell me a joke. Why did the chicken cross the road? To get to the other side!",
    "Count from one to five: 1, 2, 3, 4, 5.",
    "List three colours.\nred, green, blue",
]

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The seed's style of Llama 3 prompt: a system prompt, the user's input, the answer closed by <|eot_id|>.
SEED_TEMPLATE = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{output}<|eot_id|>"
)


def _bpe(specials: list[str]) -> Tokenizer:
    return byte_level_bpe(CORPUS, specials, vocab_size=400)


@pytest.fixture(scope="module")
def llama_tok() -> PreTrainedTokenizerFast:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _bpe(specials)
    # Like Llama 3's tokenizer.json: every ordinary encoding starts with <|begin_of_text|>.
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   additional_special_tokens=specials[1:4], chat_template=LLAMA_TEMPLATE)


@pytest.fixture(scope="module")
def chatml_tok() -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(specials), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=CHATML_TEMPLATE)


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _answer_runs(item: dict[str, torch.Tensor]) -> list[list[int]]:
    """Label tokens under the loss mask, grouped into contiguous runs."""
    runs: list[list[int]] = []
    previous = False
    for label, m in zip(item["labels"].tolist(), item["loss_mask"].tolist()):
        if m:
            if not previous:
                runs.append([])
            runs[-1].append(label)
        previous = bool(m)
    return runs


def _sequence(item: dict[str, torch.Tensor]) -> list[int]:
    """The example's full id sequence: its tokens plus the final label (document 0 only)."""
    doc0 = item["document_ids"] == 0
    return item["tokens"][doc0].tolist() + item["labels"][doc0][-1:].tolist()


CHAT = {"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": "Why did the chicken cross the road?"},
]}


@pytest.mark.parametrize("which, eot", [("llama_tok", "<|eot_id|>"), ("chatml_tok", "<|im_end|>")])
def test_multi_turn_mask_covers_each_answer_and_its_end_token(which, eot, request, tmp_path):
    tok = request.getfixturevalue(which)
    ds = SFTDataset(_write(tmp_path / "training.jsonl", [CHAT]), tok, seq_length=160)
    item = ds[0]
    assert {k: (v.shape, v.dtype) for k, v in item.items()} == {
        "tokens": ((160,), torch.int64), "labels": ((160,), torch.int64), "loss_mask": ((160,), torch.float32),
        "position_ids": ((160,), torch.int64), "document_ids": ((160,), torch.int64)}
    answers = [m["content"] for m in CHAT["messages"] if m["role"] == "assistant"]
    assert _answer_runs(item) == [_ids(tok, a + eot) for a in answers]
    # The whole sequence is the chat template's rendering (ChatML's newline after the last turn dropped).
    rendered = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tok.decode(_sequence(item)) == rendered.removesuffix("\n")
    assert tok.decode(_sequence(item)).count("<|begin_of_text|>") == (1 if which == "llama_tok" else 0)
    # Before each answer are exactly the ids a model is given at inference: the generation prompt's.
    seq, starts = _sequence(item), [i + 1 for i in range(159) if item["loss_mask"][i] and not item["loss_mask"][i - 1]]
    turns = [k for k, m in enumerate(CHAT["messages"]) if m["role"] == "assistant"]
    for k, start in zip(turns, starts, strict=True):
        prompt = tok.apply_chat_template(CHAT["messages"][:k], tokenize=False, add_generation_prompt=True)
        assert seq[:start] == _ids(tok, prompt)
    # Labels are the next tokens; padding after the example is its own document with no loss.
    n = len(_sequence(item)) - 1
    assert torch.equal(item["labels"][: n - 1], item["tokens"][1:n])
    assert item["position_ids"][:n].tolist() == list(range(n))
    assert (item["document_ids"][:n] == 0).all() and (item["document_ids"][n:] == 1).all()
    assert (item["loss_mask"][n:] == 0).all() and (item["tokens"][n:] == ds.pad_id).all()


def test_seed_and_alpaca_rows_use_the_chat_template_with_a_system_prompt(chatml_tok, llama_tok, tmp_path):
    rows = [{"input": "Count from one to five:", "output": "1, 2, 3, 4, 5."},
            {"instruction": "Translate to French:", "input": "good morning.", "output": "Bonjour."},
            {"instruction": "List three colours.", "input": "", "output": "red, green, blue"}]
    users = ["Count from one to five:", "Translate to French:\ngood morning.", "List three colours."]
    path = _write(tmp_path / "training.jsonl", rows)
    for tok, eot in ((chatml_tok, "<|im_end|>"), (llama_tok, "<|eot_id|>")):
        ds = SFTDataset(path, tok, seq_length=96, system_prompt="Answer briefly and politely.")
        assert len(ds) == 3
        for i, (row, user) in enumerate(zip(rows, users)):
            messages = [{"role": "system", "content": "Answer briefly and politely."},
                        {"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
            expected = tok.apply_chat_template(messages, tokenize=False).removesuffix("\n")
            assert tok.decode(_sequence(ds[i])) == expected
            assert _answer_runs(ds[i]) == [_ids(tok, row["output"] + eot)]


def test_prompt_template_with_system_prompt(llama_tok, tmp_path):
    row = {"input": "What is the capital of France?", "output": "Paris."}
    path = _write(tmp_path / "training.jsonl", [row])
    ds = SFTDataset(path, llama_tok, seq_length=96, prompt_template=SEED_TEMPLATE, system_prompt="Answer briefly.")
    expected = SEED_TEMPLATE.format(system="Answer briefly.", **row)
    assert llama_tok.decode(_sequence(ds[0])) == expected
    assert _sequence(ds[0]).count(llama_tok.bos_token_id) == 1  # the template writes it; none added
    assert _answer_runs(ds[0]) == [_ids(llama_tok, "Paris.<|eot_id|>")]


def test_prompt_template_bos_eos_and_trailing_text(llama_tok, chatml_tok, tmp_path):
    path = _write(tmp_path / "training.jsonl", [{"input": "Tell me a joke.", "output": "Why not?"}])
    # No BOS in the template: the Llama tokenizer's own encoding has one, so exactly one is added;
    # the template ends at {output}, so EOS closes the answer.
    ds = SFTDataset(path, llama_tok, seq_length=64, prompt_template="Q: {input}\nA: {output}")
    seq = _sequence(ds[0])
    assert seq[0] == llama_tok.bos_token_id and seq.count(llama_tok.bos_token_id) == 1
    assert llama_tok.decode(seq[1:]) == "Q: Tell me a joke.\nA: Why not?<|eot_id|>"
    assert _answer_runs(ds[0]) == [_ids(llama_tok, "Why not?<|eot_id|>")]
    # ChatML has no BOS; text after the end-of-turn token is not part of the answer.
    ds = SFTDataset(path, chatml_tok, seq_length=64,
                    prompt_template="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n{output}<|im_end|>\n")
    assert chatml_tok.decode(_sequence(ds[0])) == \
        "<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\nWhy not?<|im_end|>"
    assert _answer_runs(ds[0]) == [_ids(chatml_tok, "Why not?<|im_end|>")]
    # Closing text without a special token is part of the answer, and EOS still ends it.
    ds = SFTDataset(path, chatml_tok, seq_length=64, prompt_template="{input}\n{output}\n")
    assert _answer_runs(ds[0]) == [_ids(chatml_tok, "Why not?\n<|im_end|>")]


def test_nemo_default_template_tokenizes_prompt_and_answer_apart(chatml_tok, tmp_path):
    # NeMo's default "{input} {output}": the space ends the prompt, and the answer is tokenized on its
    # own, so it is not merged into the answer's first token.
    path = _write(tmp_path / "training.jsonl", [{"input": "Tell me a joke.", "output": "Why not?"}])
    ds = SFTDataset(path, chatml_tok, seq_length=64, prompt_template="{input} {output}", pad_to=80)
    answer = _ids(chatml_tok, "Why not?<|im_end|>")
    assert _sequence(ds[0]) == _ids(chatml_tok, "Tell me a joke. ") + answer
    assert _answer_runs(ds[0]) == [answer]
    assert ds[0]["tokens"].shape == (80,)
    with pytest.raises(ShoalError, match=r"pad_to \(32\) must be at least seq_length \(64\)"):
        SFTDataset(path, chatml_tok, seq_length=64, pad_to=32)


def test_read_prompt_template(tmp_path):
    assert read_prompt_template(r"{input}\n\t{output}\\n") == "{input}\n\t{output}\\n"
    (tmp_path / "t.txt").write_text("A {input}\nB {output}", encoding="utf-8")
    assert read_prompt_template(f"@{tmp_path / 't.txt'}") == "A {input}\nB {output}"


def test_truncation_cuts_the_prompt_from_the_left_then_the_answer_from_the_right(llama_tok, tmp_path):
    prompt_text = "Write a short poem about the sea. " * 4
    template = "{input}\n{output}"
    seq_length = 40
    rows = [{"input": prompt_text, "output": "Paris."},  # long prompt, short answer
            {"input": "Hi", "output": "The sea is wide and blue, the waves come back to you. " * 3}]  # long answer
    ds = SFTDataset(_write(tmp_path / "training.jsonl", rows), llama_tok, seq_length, prompt_template=template)
    assert ds.num_truncated == 2 and ds.num_dropped == 0 and len(ds) == 2
    bos = llama_tok.bos_token_id
    for i, row in enumerate(rows):
        prompt = _ids(llama_tok, row["input"] + "\n")
        answer = _ids(llama_tok, row["output"] + "<|eot_id|>")
        assert 1 + len(prompt) + len(answer) > seq_length + 1  # the case really needs truncation
        seq = _sequence(ds[i])
        assert len(seq) == seq_length + 1 and seq[0] == bos
        if i == 0:  # the whole answer stays; the prompt keeps its last tokens after BOS
            kept = seq_length + 1 - len(answer) - 1
            assert seq[1:] == prompt[-kept:] + answer
        else:  # the prompt is short and stays whole; the answer is cut at the window's end
            assert seq[1:] == prompt + answer[: seq_length - len(prompt)]
            assert _answer_runs(ds[i]) == [answer[: seq_length - len(prompt)]]
    # Long prompt and long answer: the prompt keeps half the window, the answer gets the rest.
    ids = torch.arange(100, 150).numpy()
    answer = ids >= 130
    ids[0] = bos
    kept_ids, kept_answer = truncate_example(ids, answer, seq_length=9, bos_id=bos)
    assert kept_ids.tolist() == [bos, 126, 127, 128, 129, 130, 131, 132, 133, 134]
    assert kept_answer.tolist() == [False] * 5 + [True] * 5


def test_examples_with_nothing_to_learn_are_dropped_and_counted(chatml_tok, tmp_path):
    # No BOS, empty prompt, empty output: the only id is EOS, which is never a label.
    rows = [{"input": "", "output": ""}, {"input": "Hi", "output": "Bonjour."}]
    ds = SFTDataset(_write(tmp_path / "training.jsonl", rows), chatml_tok, 32, prompt_template="{input}{output}")
    assert (ds.num_rows, ds.num_dropped, len(ds)) == (2, 1, 1)
    assert _answer_runs(ds[0]) == [_ids(chatml_tok, "Bonjour.<|im_end|>")]


def _chats(n: int) -> list[dict]:
    words = CORPUS * 3
    return [{"input": words[i][: 10 + 7 * i % 50], "output": words[i + 1][: 5 + 11 * i % 40]} for i in range(n)]


def test_packed_rows_hold_whole_examples_that_cannot_see_each_other(chatml_tok, tmp_path):
    path = _write(tmp_path / "training.jsonl", _chats(12))
    seq_length = 96
    plain = SFTDataset(path, chatml_tok, seq_length)
    packed = PackedSFTDataset(path, chatml_tok, seq_length)
    assert sorted(i for p in packed.packs for i in p) == list(range(len(plain)))
    assert len(packed) == len(packed.packs) < len(plain)
    # Efficiency against a direct count of the non-pad tokens (the pad id never occurs in examples).
    tokens = torch.stack([packed[r]["tokens"] for r in range(len(packed))])
    assert packed.packing_efficiency == pytest.approx((tokens != chatml_tok.pad_token_id).sum().item() / tokens.numel())
    for r, pack in enumerate(packed.packs):
        row = packed[r]
        start = 0
        for doc, i in enumerate(pack):
            alone = plain[i]
            n = int((alone["document_ids"] == 0).sum())
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert torch.equal(row[key][start:start + n], alone[key][:n]), key
            assert (row["document_ids"][start:start + n] == doc).all()
            start += n
        assert (row["loss_mask"][start:] == 0).all() and (row["document_ids"][start:] == len(pack)).all()
        # The attention mask lets a token see only earlier tokens of its own example.
        doc_of = row["document_ids"]
        mask = attention_mask(doc_of[None])[0, 0]
        q, k = torch.meshgrid(torch.arange(seq_length), torch.arange(seq_length), indexing="ij")
        assert torch.equal(mask, (doc_of[q] == doc_of[k]) & (k <= q))


def test_packed_logits_equal_each_example_alone(chatml_tok, tmp_path):
    torch.manual_seed(0)
    path = _write(tmp_path / "training.jsonl", _chats(6))
    packed = PackedSFTDataset(path, chatml_tok, seq_length=128)
    cfg = get_preset("llama_tiny")
    cfg.vocab_size = len(chatml_tok)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for r, pack in enumerate(packed.packs):
            row = packed[r]
            logits = model(row["tokens"][None], row["position_ids"][None], row["document_ids"][None])[0]
            start = 0
            for i in pack:
                ids = torch.from_numpy(packed.examples[i][0])
                alone = model(ids[:-1][None])[0]
                torch.testing.assert_close(logits[start:start + len(alone)], alone, rtol=1e-5, atol=1e-5)
                start += len(alone)


def test_build_sft_dataset_unescapes_a_command_line_template_and_reports(chatml_tok, tmp_path, capsys):
    path = _write(tmp_path / "training.jsonl", [{"input": "Hi", "output": "Bonjour."}] * 3)
    ds = build_sft_dataset(path, chatml_tok, 96, pack=True, prompt_template=r"Q: {input}\nA: {output}",
                           seed=1234, verbose=True)
    assert chatml_tok.decode(_sequence(ds[0])) == "Q: Hi\nA: Bonjour.<|im_end|>"
    assert len(ds) == 1 and len(ds.packs[0]) == 3
    err = capsys.readouterr().err
    assert "3 examples from 3 rows" in err and f"packing efficiency {ds.packing_efficiency:.3f}" in err


def test_load_split_and_missing_split(chatml_tok, tmp_path):
    _write(tmp_path / "training.jsonl", _chats(3))
    assert len(load_sft_split(tmp_path, "train", chatml_tok, 64)) == 3
    assert isinstance(load_sft_split(tmp_path, "training", chatml_tok, 64, pack=True), PackedSFTDataset)
    with pytest.raises(ShoalError, match="validation.jsonl: missing"):
        load_sft_split(tmp_path, "validation", chatml_tok, 64)


@pytest.mark.parametrize("rows, message", [
    (['{"input": "a", "output": "b"}', '{"input": "a", "output": "b"}', '{"input": "a", oops}'],
     r"training.jsonl:3: not valid JSON"),
    (['{"input": "a", "output": "b"}', '{"question": "a", "answer": "b"}'],
     r"training.jsonl:2: expected keys 'input' and 'output'.*found \['answer', 'question'\]"),
    (['{"input": "a", "output": 3}'], r"training.jsonl:1: key 'output' must be a string"),
    (['[1, 2]'], r"training.jsonl:1: expected a JSON object"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assitant", "content": "b"}]}'],
     r"training.jsonl:1: messages\[1\] has role 'assitant'"),
    (['{"messages": [{"role": "user", "content": "a"}]}'], r"training.jsonl:1: 'messages' has no assistant turn"),
])
def test_bad_rows_name_file_and_line(rows, message, chatml_tok, tmp_path):
    with pytest.raises(ShoalError, match=message):
        SFTDataset(_write(tmp_path / "training.jsonl", rows), chatml_tok, 32)


def test_bad_templates_are_refused(chatml_tok, tmp_path):
    path = _write(tmp_path / "training.jsonl", _chats(1) + [CHAT])
    with pytest.raises(ShoalError, match=r"\{output\} exactly once"):
        SFTDataset(path, chatml_tok, 32, prompt_template="{input}")
    with pytest.raises(ShoalError, match=r"uses \{system\} but no system prompt"):
        SFTDataset(path, chatml_tok, 32, prompt_template="{system}{input}{output}")
    with pytest.raises(ShoalError, match=r"training.jsonl:2: a prompt template renders one user turn"):
        SFTDataset(path, chatml_tok, 32, prompt_template="{input}{output}")
    no_template = PreTrainedTokenizerFast(tokenizer_object=chatml_tok.backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(ShoalError, match="no chat template"):
        SFTDataset(path, no_template, 32)
    # A template that renders the final answer differently from earlier ones is not prefix-stable.
    unstable = PreTrainedTokenizerFast(
        tokenizer_object=chatml_tok.backend_tokenizer, eos_token="<|im_end|>",
        chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if loop.last %}!{% endif %}"
                      "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ShoalError, match=r"training.jsonl:1: the chat template is not prefix-stable"):
        SFTDataset(path, unstable, 32)
    # Text renders prefix-stably, but the generation prompt ends in a space that the whole text's
    # tokenization merges into the answer's first word: the prompt's ids are not a prefix of the row's.
    spaced = PreTrainedTokenizerFast(
        tokenizer_object=chatml_tok.backend_tokenizer, eos_token="<|im_end|>",
        chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
                      "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ShoalError, match=r"training.jsonl:1: the tokenizer splits the conversation differently"):
        SFTDataset(path, spaced, 32)
