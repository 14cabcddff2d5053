"""Shared data fixtures: a tiny Hugging Face fast tokenizer built here, saved as a tokenizer folder.

The tokenizer is byte-level BPE (so any text, Traditional Chinese included, encodes without
unknown tokens), trained in milliseconds on a few sentences. Like Llama 3's, its ordinary encoding
starts with `<|begin_of_text|>`; `<|end_of_text|>` is its eos, `<|pad|>` its pad, and it carries a
small Llama-3-style chat template.
"""

from __future__ import annotations

from pathlib import Path

import pytest

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Shoal turns a Hugging Face model into a trained one.",
    "台灣的新聞：今天天氣晴朗，適合出門散步。",
    "請用繁體中文回答下列問題。",
    "def main(): return 0",
]


def build_tiny_tokenizer(vocab_size: int = 400):
    """A `transformers` fast tokenizer object (not saved)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT * 10, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    hf.chat_template = CHAT_TEMPLATE
    return hf


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding tokenizer.json, tokenizer_config.json and the chat template."""
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    """The tokenizer as `transformers.AutoTokenizer` loads it from `tiny_tokenizer_dir`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
