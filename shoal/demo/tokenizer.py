"""The demo's tokenizer: a small byte-level BPE trained on the demo corpus, with Llama 3's special
tokens and a Llama-3-style chat template, saved as Hugging Face tokenizer files.

Byte-level BPE means any text, Chinese included, round-trips exactly. The special tokens come after
the BPE vocabulary in Llama 3.1's order (`<|begin_of_text|>`, `<|end_of_text|>`, ..., `<|eot_id|>`),
so code written for Llama 3 finds them where it expects them relative to each other. The files are
shipped in `shoal/demo/assets/tokenizer/`; `python -m shoal.demo.corpus --rebuild-tokenizer`
regenerates them byte for byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from shoal.checkpoint.atomic import atomic_directory

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"

VOCAB_SIZE = 1024  # a multiple of 64, as embedding tables like
NUM_SPECIAL = 16  # the last ids, Llama 3.1's special-token layout in miniature

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOM = "<|eom_id|>"
EOT = "<|eot_id|>"  # ends an assistant turn: the chat EOS
PYTHON_TAG = "<|python_tag|>"


def special_tokens() -> list[str]:
    """The NUM_SPECIAL special tokens in id order, unused slots reserved as Llama 3 does."""
    named = {0: BOS, 1: END_OF_TEXT, 4: PAD, 6: START_HEADER, 7: END_HEADER, 8: EOM, 9: EOT, 10: PYTHON_TAG}
    tokens, reserved = [], 0
    for slot in range(NUM_SPECIAL):
        if slot in named:
            tokens.append(named[slot])
        else:
            tokens.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return tokens


# Every message is a header with its role, a blank line, the trimmed content and <|eot_id|>; the
# generation prompt opens an assistant header. The BOS comes from the template, so applying it with
# the tokenizer's own special tokens switched off (as transformers does) gives exactly one BOS.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Pre-tokenisation: each Chinese character alone, runs of other letters (with one leading
# non-letter such as a space), single digits, punctuation runs, newlines and spaces.
# Chinese is written without spaces, so without the first rule BPE would learn whole clauses
# ("住在宜蘭", lives-in-Yilan) as tokens, and a tiny model could not copy "宜蘭" out of one. Single
# digits make sums learnable digit by digit.
_SPLIT_PATTERN = (
    r"\p{Han}|[^\r\n\p{L}\p{N}]?(?:(?!\p{Han})\p{L})+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train the byte-level BPE on `texts` and append the special tokens after its vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    bpe_size = vocab_size - NUM_SPECIAL
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != bpe_size:
        raise ValueError(f"the corpus gave only {tok.get_vocab_size()} BPE tokens, {bpe_size} wanted: use more text")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens()])
    bos_id = tok.token_to_id(BOS)
    # As Llama 3's tokenizer does, encoding text adds <|begin_of_text|> in front.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def default_training_texts() -> list[str]:
    """The demo corpus, plus the instruction set's turns as the chat template lays them out between
    special tokens, so role names, the blank line after a header and the questions' wording are
    single tokens or few, as they are in Llama 3's vocabulary."""
    from shoal.demo.corpus import instruction_examples, pretraining_documents

    texts = pretraining_documents()
    for row in instruction_examples(2000, split="training"):
        texts += [f"user\n\n{row['input']}", f"assistant\n\n{row['output']}"]
    return texts + ["system\n\n", "ipython\n\n"]


def tokenizer_config() -> dict:
    """`tokenizer_config.json`: what `AutoTokenizer` needs besides `tokenizer.json`."""
    first = VOCAB_SIZE - NUM_SPECIAL
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": PAD,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(first + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True}
            for i, t in enumerate(special_tokens())
        },
    }


def write_tokenizer(out_dir: str | os.PathLike = TOKENIZER_DIR, overwrite: bool = False,
                    texts: list[str] | None = None) -> Path:
    """Train on the default demo corpus (or `texts`) and write tokenizer.json, tokenizer_config.json
    and special_tokens_map.json."""
    tok = train_tokenizer(default_training_texts() if texts is None else texts)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        tok.save(str(tmp / "tokenizer.json"), pretty=True)
        _write_json(tmp / "tokenizer_config.json", tokenizer_config())
        _write_json(tmp / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOT, "pad_token": PAD})
    return Path(out_dir)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
