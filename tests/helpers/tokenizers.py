"""Tiny tokenizers built by the tests with the `tokenizers` library: nothing is downloaded.

* `word_level_tokenizer()`: a fixed word list, Llama-3-like specials and chat template; ids are
  stable and small (the converter tests' checkpoints carry it).
* `llama3_bpe_tokenizer()`: byte-level BPE trained in milliseconds on a few sentences, so any text
  (Traditional Chinese included) encodes without unknown tokens; like Llama 3's, its ordinary
  encoding starts with `<|begin_of_text|>`, `<|end_of_text|>` is its eos and `<|pad|>` its pad.
* `byte_level_bpe(corpus, specials)`: the bare BPE core, for tests that dress it their own way.
"""

from __future__ import annotations

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"

# A Llama-3 style template: a header per message, <|eot_id|> after each, optional generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# The same without trimming the content (the data tests' tokenizer renders messages as they are).
UNTRIMMED_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<unk>"]
WORDS = ("hello world the a quick brown fox jumps over lazy dog user assistant system how are you "
         "fine thanks what is shoal fish swim together in water").split()

BPE_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Shoal turns a Hugging Face model into a trained one.",
    "台灣的新聞：今天天氣晴朗，適合出門散步。",
    "請用繁體中文回答下列問題。",
    "def main(): return 0",
]


def word_level_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """SPECIAL_TOKENS then WORDS, whitespace-split; eos is `<|eot_id|>`."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    bos = vocab[BOS]
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)],
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token="<|eot_id|>", unk_token="<unk>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", EOS],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def byte_level_bpe(corpus: list[str], specials: list[str], vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` trained on `corpus`, with `specials` first in its vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def llama3_bpe_tokenizer(vocab_size: int = 400) -> transformers.PreTrainedTokenizerFast:
    """A `transformers` fast tokenizer object (not saved); see the module docstring."""
    specials = [BOS, EOS, PAD, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = byte_level_bpe(BPE_TRAINING_TEXT * 10, specials, vocab_size)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    hf.chat_template = UNTRIMMED_CHAT_TEMPLATE
    return hf
