"""Token ids the model can embed: checked at training start, before the experiment is written.

A token id at or past the model's `vocab_size` ends a run inside `F.embedding` (an IndexError on
CPU, a device-side assert on GPU), after the experiment folder was made. Two cheap checks come
first: the tokenizer's size, and for pretraining the largest id in the `.bin` files. The `.idx`
does not store that maximum; a `.bin` whose dtype cannot hold an id past the vocabulary needs no
scan, a small one is read whole, a large one is sampled in evenly spaced chunks (a bad corpus made
with a too-large tokenizer has such ids everywhere, so a sample finds them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from shoal.errors import ShoalError

_FULL_SCAN_TOKENS = 1 << 26  # 64M tokens (128 MiB of uint16): read whole
_CHUNKS, _CHUNK_TOKENS = 64, 1 << 20  # beyond that: 64 chunks of 1M tokens


def check_tokenizer_fits(tokenizer_dir: Path | None, vocab_size: int) -> None:
    """The tokenizer's size (base vocabulary plus added tokens) must not exceed the embedding's."""
    if tokenizer_dir is None:
        return
    from shoal.data.tokenizer import load_tokenizer

    size = len(load_tokenizer(tokenizer_dir))
    if size > vocab_size:
        raise ShoalError(
            f"the tokenizer in {tokenizer_dir} has {size} tokens, more than the model's vocab_size {vocab_size}: ids "
            f"{vocab_size}..{size - 1} cannot be embedded; use the tokenizer the model was trained with, or a model "
            "whose embedding covers this tokenizer"
        )


def max_token_id(prefix: str) -> tuple[int, bool]:
    """(largest id found in PREFIX.bin, whether the whole file was read)."""
    from shoal.data.indexed import IndexedDataset

    dtype = IndexedDataset(prefix).dtype
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    if tokens.size == 0:
        return -1, True
    if tokens.size <= _FULL_SCAN_TOKENS:
        return int(tokens.max()), True
    starts = np.linspace(0, tokens.size - _CHUNK_TOKENS, _CHUNKS).astype(np.int64)
    return max(int(tokens[s:s + _CHUNK_TOKENS].max()) for s in starts), False


def check_data_fits(dataset_path: list[str], vocab_size: int, *, verbose: bool) -> None:
    """Every `.bin` of a pretraining dataset holds ids below `vocab_size` (read or sampled); an
    empty one is worth a warning (an empty input file, or a wrong --json-keys at preprocessing)."""
    from shoal.data.gpt_dataset import parse_blend
    from shoal.data.indexed import IndexedDataset

    prefixes, _ = parse_blend(dataset_path)
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)
        dtype = dataset.dtype
        if len(dataset.sequence_lengths) == 0 or int(dataset.sequence_lengths.sum()) == 0:
            if verbose:
                print(f"shoal: warning: dataset {prefix} holds no tokens (was its input empty, or --json-keys "
                      "wrong at `shoal preprocess`?)", file=sys.stderr)
            continue
        if dtype.kind in "iu" and np.iinfo(dtype).max < vocab_size:
            continue  # no id this dtype can store reaches the vocabulary's end
        high, whole = max_token_id(prefix)
        if high >= vocab_size:
            seen = "holds" if whole else "holds (in a sample of its tokens)"
            raise ShoalError(
                f"dataset {prefix}.bin {seen} token id {high}, but the model's vocab_size is {vocab_size}: "
                "it was tokenized with another (larger) tokenizer; run `shoal preprocess` again with the "
                "model's tokenizer (--tokenizer CKPT)"
            )
