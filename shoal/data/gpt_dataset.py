"""Pretraining samples from Megatron indexed datasets, built the way megatron-core builds them.

Given the same `.bin/.idx` files, split string, seed and sequence length, the document, sample and
shuffle indices here equal megatron-core's `GPTDataset` (and the blending indices its
`BlendedDataset`), so a run moved between NeMo/Megatron and shoal reads the same samples in the
same order. `docs/data-formats.md` ("Pretraining samples") explains the algorithm; in short:

* a split (`"998,1,0"`) is a contiguous range of documents (sequences) in file order;
* an epoch is the split's documents in a shuffled order, flattened into one token stream; as many
  epochs are built as the requested number of samples needs;
* sample j is the window of `seq_length + 1` tokens starting at token `j * seq_length` of that
  stream, so neighbouring samples share one token (the last label of one is the first input of
  the next) and samples cross document boundaries;
* the samples are then visited through a shuffled permutation.

Index arrays are cached as `.npy` files named by the MD5 of a JSON description of everything they
depend on, written atomically so that ranks building at the same time never read a partial file.
Where megatron-core loops in C++, this module uses cumsum/searchsorted so that millions of
documents take seconds in numpy; only the blending rule, which is sequential by nature, is a loop.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from shoal.data.blended_dataset import BlendedDataset
from shoal.data.index_cache import description_hash, load_or_build_arrays
from shoal.errors import ShoalError

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
# Megatron pads with -1 (never a real token id) unless the tokenizer has a distinct pad token.
DEFAULT_PAD_TOKEN_ID = -1
# megatron-core builds each blended member 0.5% larger than its share so the greedy blend never
# runs past a member's end (`mid_level_dataset_surplus`).
BLEND_SURPLUS = 0.005
_INT32_MAX = np.iinfo(np.int32).max


class IndexedDatasetLike(Protocol):
    """What the sample builder needs from `shoal.data.indexed.IndexedDataset`."""

    sequence_lengths: np.ndarray  # int32, tokens per sequence (a sequence is one document here)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class GPTDatasetConfig:
    """How samples are cut and what each one carries.

    The indices depend on `seq_length`, `seed`, `split` and the drop-last rule only; the token
    ids and flags shape each sample as it is read, so changing them reuses the cached indices.
    """

    seq_length: int
    seed: int
    split: str = "998,1,0"
    cache_dir: str | None = None  # None: `<prefix>/cache/GPTDataset_indices`, Megatron's default
    eod_token_id: int | None = None
    pad_token_id: int = DEFAULT_PAD_TOKEN_ID
    reset_position_ids: bool = False
    eod_mask_loss: bool = False
    # Megatron's default drops the last partial validation sample; False keeps it, padded.
    drop_last_partial_validation_sequence: bool = True

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ShoalError(f"seq_length must be a positive integer, got {self.seq_length}")
        if self.eod_token_id is None and (self.reset_position_ids or self.eod_mask_loss):
            raise ShoalError(
                "reset_position_ids and eod_mask_loss need eod_token_id (the tokenizer's "
                "end-of-document id, appended by `shoal preprocess --append-eod`)"
            )


# ----------------------------------------------------------------------------------------------
# Splits


def parse_split(split: str) -> list[float]:
    """`"998,1,0"` -> normalised train/valid/test fractions (missing entries are 0)."""
    try:
        numbers = [float(x) for x in re.findall(r"[.0-9]+", split)]
    except ValueError:
        numbers = []
    if not numbers or len(numbers) > 3 or sum(numbers) <= 0:
        raise ShoalError(
            f"split {split!r}: expected up to three non-negative numbers for train,valid,test "
            "with a positive sum, such as '998,1,0'"
        )
    numbers += [0.0] * (3 - len(numbers))
    # numpy's division, as Megatron's `normalize`, so the boundaries round the same way.
    weights = np.asarray(numbers, dtype=np.float64)
    return (weights / weights.sum()).tolist()


def split_matrix(split: str) -> list[tuple[float, float] | None]:
    """Cumulative (lo, hi) bookends per split; a zero-width split is None (not built)."""
    bounds = [0.0]
    for fraction in parse_split(split):
        bounds.append(bounds[-1] + fraction)  # left-to-right float sums, like Megatron
    return [(lo, hi) if hi > lo else None for lo, hi in zip(bounds[:-1], bounds[1:])]


def split_ranges(split: str, num_sequences: int) -> list[tuple[int, int] | None]:
    """Per split, the document range [begin, end) it owns; None for a split not built."""
    ranges: list[tuple[int, int] | None] = []
    for bookend in split_matrix(split):
        if bookend is None:
            ranges.append(None)
        else:
            lo, hi = bookend
            n = float(num_sequences)
            ranges.append((int(round(lo * n)), int(round(hi * n))))
    return ranges


# ----------------------------------------------------------------------------------------------
# Index construction: pure functions of arrays, each one step of megatron-core's algorithm


def num_epochs_for(tokens_per_epoch: int, num_samples: int | None, seq_length: int) -> int:
    """The fewest epochs whose tokens cover `num_samples` windows of `seq_length + 1` tokens."""
    if num_samples is None or tokens_per_epoch == 0:
        return 1
    needed = num_samples * seq_length + 1  # + 1: the last window's extra label token
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(
    sequence_ids: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_final_epoch: bool
) -> np.ndarray:
    """`num_epochs` copies of the split's document ids, shuffled (int32).

    With `separate_final_epoch`, the last epoch is shuffled on its own after the others, so a
    small final partial epoch does not mix with (and over-sample into) the full ones.
    """
    if separate_final_epoch and num_epochs > 1:
        first = build_document_index(sequence_ids, num_epochs - 1, rng, False)
        last = build_document_index(sequence_ids, 1, rng, False)
        return np.concatenate((first, last))
    document_index = np.tile(np.asarray(sequence_ids), num_epochs).astype(np.int32)
    rng.shuffle(document_index)
    return document_index


def build_sample_index(
    sequence_lengths: np.ndarray, document_index: np.ndarray, seq_length: int, drop_last: bool = True
) -> np.ndarray:
    """Rows `(position in document_index, token offset in that document)` where samples start.

    Sample j starts at token `j * seq_length` of the flattened stream and ends at row j+1 (that
    token included), which is `seq_length + 1` tokens. Shape `[num_samples + 1, 2]`.
    """
    doc_lengths = np.asarray(sequence_lengths)[document_index].astype(np.int64)
    doc_ends = np.cumsum(doc_lengths)
    total_tokens = int(doc_ends[-1]) if len(doc_ends) else 0
    largest = max(len(document_index), int(np.max(sequence_lengths, initial=0)))
    dtype = np.int32 if largest <= _INT32_MAX else np.int64
    if total_tokens <= 1:
        return np.zeros((1, 2), dtype=dtype)  # no window fits: zero samples
    if drop_last:
        num_samples = (total_tokens - 1) // seq_length
    else:
        num_samples = -(-(total_tokens - 1) // seq_length)
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # The document holding token p is the first whose end lies past p; empty documents never
    # hold a token, so this also skips them as megatron-core's loop does.
    positions = np.searchsorted(doc_ends, starts, side="right")
    holding = np.minimum(positions, len(doc_ends) - 1)
    offsets = starts - (doc_ends[holding] - doc_lengths[holding])
    sample_index = np.stack([positions, offsets], axis=1).astype(dtype)
    sample_index[0] = (0, 0)  # megatron-core starts at the first document even if it is empty
    overflow = starts > total_tokens - 1  # only the start after a kept partial last sample
    if overflow.any():
        # A kept partial sample ends on the stream's last token, recorded against the last
        # document of the index, as megatron-core records it.
        last = len(document_index) - 1
        sample_index[overflow] = (last, int(sequence_lengths[document_index[last]]) - 1)
    return sample_index


def build_shuffle_index(num_first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, total): [0, num_first) and [num_first, total) shuffled separately."""
    dtype = np.int64 if total >= np.iinfo(np.uint32).max - 1 else np.uint32
    first = np.arange(num_first, dtype=dtype)
    rng.shuffle(first)
    if num_first == total:
        return first
    rest = np.arange(num_first, total, dtype=dtype)
    rng.shuffle(rest)
    return np.concatenate((first, rest))


def build_gpt_indices(
    sequence_lengths: np.ndarray,
    sequence_ids: np.ndarray,
    seq_length: int,
    seed: int,
    num_samples: int | None,
    drop_last: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Document, sample and shuffle indices for one split, from one RandomState(seed)."""
    tokens_per_epoch = int(np.sum(np.asarray(sequence_lengths)[sequence_ids], dtype=np.int64))
    if num_samples and tokens_per_epoch <= 1:
        raise ShoalError(
            f"{num_samples} samples requested from documents holding {tokens_per_epoch} tokens"
        )
    num_epochs = num_epochs_for(tokens_per_epoch, num_samples, seq_length)
    separate_final_epoch = False
    if num_epochs > 1:
        assert num_samples is not None
        samples_before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        samples_per_epoch = (tokens_per_epoch - 1) // seq_length
        # A final epoch used for less than 80% is shuffled apart from the others.
        separate_final_epoch = num_samples - samples_before_final < int(0.80 * samples_per_epoch)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(sequence_ids, num_epochs, rng, separate_final_epoch)
    sample_index = build_sample_index(sequence_lengths, document_index, seq_length, drop_last)
    total = sample_index.shape[0] - 1
    first = samples_before_final if separate_final_epoch else total
    shuffle_index = build_shuffle_index(first, total, rng)
    return document_index, sample_index, shuffle_index


# ----------------------------------------------------------------------------------------------
# Samples


def sample_from_tokens(text: np.ndarray, config: GPTDatasetConfig) -> dict[str, torch.Tensor]:
    """Turn `seq_length + 1` tokens (padded with `pad_token_id`) into one training sample.

    `loss_mask` is 0 where the label is padding and, with `eod_mask_loss`, where the *input*
    token is EOD (as Megatron does: the step from one document's end into the next is not
    learned). `document_ids` counts the EOD tokens before each position, so an EOD belongs to
    the document it ends; `position_ids` restart after each EOD with `reset_position_ids`.
    """
    tokens = text[:-1].astype(np.int64)
    labels = text[1:].astype(np.int64)
    seq_length = tokens.shape[0]
    loss_mask = np.ones(seq_length, dtype=np.float32)
    positions = np.arange(seq_length, dtype=np.int64)
    if config.eod_token_id is None:
        document_ids = np.zeros(seq_length, dtype=np.int64)
        position_ids = positions
    else:
        is_eod = tokens == config.eod_token_id
        if config.eod_mask_loss:
            loss_mask[is_eod] = 0.0
        eod_before = np.cumsum(is_eod, dtype=np.int64) - is_eod
        document_ids = eod_before
        if config.reset_position_ids:
            # Each position minus the start of its document (one past the previous EOD).
            starts = np.zeros(seq_length, dtype=np.int64)
            starts[1:] = np.where(is_eod[:-1], positions[1:], 0)
            position_ids = positions - np.maximum.accumulate(starts)
        else:
            position_ids = positions
    pad = config.pad_token_id
    loss_mask[labels == pad] = 0.0
    tokens[tokens == pad] = 0  # so the embedding can look the padding up
    labels[labels == pad] = 0
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "document_ids": torch.from_numpy(document_ids),
    }


class GPTDataset(torch.utils.data.Dataset):
    """Samples of one split of one indexed dataset; `len` may exceed `num_samples` (whole epochs)."""

    def __init__(
        self,
        indexed: IndexedDatasetLike,
        dataset_path: str,
        sequence_ids: np.ndarray,
        num_samples: int | None,
        split_name: str,
        config: GPTDatasetConfig,
    ) -> None:
        self.indexed = indexed
        self.dataset_path = dataset_path
        self.split_name = split_name
        self.num_samples = num_samples
        self.config = config
        lengths = indexed.sequence_lengths
        if num_samples and int(np.sum(lengths[sequence_ids], dtype=np.int64)) <= 1:
            raise ShoalError(
                f"dataset {dataset_path}: {num_samples} {split_name} samples requested, but its "
                f"{split_name} split ({len(sequence_ids)} documents) holds no complete sample"
            )
        description = json.dumps(
            {
                "class": "GPTDataset",
                "dataset_path": os.path.abspath(dataset_path),
                "num_samples": None if num_samples is None else int(num_samples),
                "index_split": split_name,
                "random_seed": config.seed,
                "sequence_length": config.seq_length,
                "split": config.split,
                "split_matrix": split_matrix(config.split),
                "drop_last_partial_sequence": self._drop_last,
                # Megatron does not hash the data; we add its shape so a corpus rewritten under
                # the same prefix does not silently reuse stale indices.
                "sequence_count": int(len(lengths)),
                "token_count": int(np.sum(lengths, dtype=np.int64)),
            },
            indent=4,
        )
        self.unique_description = description
        cache_dir = config.cache_dir or os.path.join(dataset_path, "cache", "GPTDataset_indices")
        arrays = load_or_build_arrays(
            cache_dir,
            f"{description_hash(description)}-GPTDataset-{split_name}",
            description,
            ("document_index", "sample_index", "shuffle_index"),
            lambda: dict(
                zip(
                    ("document_index", "sample_index", "shuffle_index"),
                    build_gpt_indices(
                        lengths,
                        sequence_ids,
                        config.seq_length,
                        config.seed,
                        num_samples,
                        self._drop_last,
                    ),
                )
            ),
            _gpt_indices_consistent,
        )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    @property
    def _drop_last(self) -> bool:
        return self.split_name != "valid" or self.config.drop_last_partial_validation_sequence

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The `seq_length + 1` tokens of sample `idx` (int64), padded at the stream's end."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        i = int(self.shuffle_index[idx])
        first_doc, first_offset = (int(v) for v in self.sample_index[i])
        last_doc, last_offset = (int(v) for v in self.sample_index[i + 1])
        get, docs = self.indexed.get, self.document_index
        if first_doc == last_doc:
            parts = [get(int(docs[first_doc]), first_offset, last_offset - first_offset + 1)]
        else:
            parts = [get(int(docs[first_doc]), first_offset, None)]
            parts += [get(int(docs[d]), 0, None) for d in range(first_doc + 1, last_doc)]
            parts.append(get(int(docs[last_doc]), 0, last_offset + 1))
        text = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
        missing = self.config.seq_length + 1 - len(text)
        if missing > 0:
            padding = np.full(missing, self.config.pad_token_id, dtype=np.int64)
            text = np.concatenate((text, padding))
        return text

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return sample_from_tokens(self.sample_tokens(idx), self.config)


def _gpt_indices_consistent(arrays: dict[str, np.ndarray]) -> bool:
    doc, sample, shuffle = arrays["document_index"], arrays["sample_index"], arrays["shuffle_index"]
    return (
        doc.ndim == 1
        and sample.ndim == 2
        and sample.shape[1] == 2
        and shuffle.ndim == 1
        and shuffle.shape[0] == sample.shape[0] - 1
    )


# ----------------------------------------------------------------------------------------------
# Building the three splits from the user's paths


def is_blend_weight(text: str | float) -> bool:
    """Whether an item of a `--dataset_path` list is a weight of Megatron's `[w1, p1, ...]` form."""
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def prefixes_in(path: str) -> list[str]:
    """The dataset prefixes a path names: itself, or every `*.idx` pair inside a directory.

    A prefix with its files wins over a directory of the same name, which Megatron's default
    cache folder (`<prefix>/cache/...`) creates next to every dataset it reads.
    """
    is_prefix = os.path.isfile(path + ".idx") or os.path.isfile(path + ".bin")
    if os.path.isdir(path) and not is_prefix:
        found = glob.glob(os.path.join(glob.escape(path), "*.idx"))
        prefixes = sorted(p[: -len(".idx")] for p in found)
        if not prefixes:
            raise ShoalError(
                f"dataset directory {path} holds no Megatron .idx/.bin pair (make one with "
                "`shoal preprocess`)"
            )
    else:
        prefix = path[: -len(".idx")] if path.endswith((".idx", ".bin")) else path
        prefixes = [prefix]
    for prefix in prefixes:
        for suffix in (".idx", ".bin"):
            if not os.path.isfile(prefix + suffix):
                raise ShoalError(
                    f"dataset {prefix}: {prefix + suffix} not found (expected a .bin/.idx pair)"
                )
    return prefixes


def parse_blend(paths: Sequence[str | float]) -> tuple[list[str], list[float] | None]:
    """`[p1, p2, ...]` or Megatron's `[w1, p1, w2, p2, ...]` -> (prefixes, weights or None).

    A directory expands to the prefixes inside it, sorted; unweighted prefixes are weighted by
    their sizes, as Megatron does.
    """
    items = list(paths)
    if not items:
        raise ShoalError("no pretraining dataset given (expected --dataset_path PREFIX or DIR)")
    weighted = len(items) % 2 == 0 and all(is_blend_weight(w) for w in items[0::2])
    if not weighted:
        return [p for item in items for p in prefixes_in(str(item))], None
    prefixes, weights = [], []
    for weight, path in zip(items[0::2], items[1::2]):
        expanded = prefixes_in(str(path))
        if len(expanded) != 1:
            raise ShoalError(
                f"weight {weight} is given to directory {path}, which holds {len(expanded)} "
                "datasets; give each prefix its own weight"
            )
        if float(weight) <= 0:
            raise ShoalError(f"weight {weight} for {path} must be positive")
        prefixes.append(expanded[0])
        weights.append(float(weight))
    return prefixes, weights


def _open_indexed(prefix: str) -> IndexedDatasetLike:
    from shoal.data.indexed import IndexedDataset  # imported late: the reader is its own module

    return IndexedDataset(prefix)


def build_pretrain_datasets(
    paths: Sequence[str | float],
    seq_length: int,
    seed: int,
    split: str = "998,1,0",
    num_samples: Sequence[int | None] | None = None,
    cache_dir: str | None = None,
    eod_token_id: int | None = None,
    pad_token_id: int | None = None,
    reset_position_ids: bool = False,
    eod_mask_loss: bool = False,
    drop_last_partial_validation_sequence: bool = True,
    open_dataset: Callable[[str], IndexedDatasetLike] = _open_indexed,
) -> tuple[GPTDataset | BlendedDataset | None, ...]:
    """(train, valid, test) datasets, None for a split that is not built or holds no sample.

    `num_samples` is the number of samples each split must provide (None: one epoch). One
    unweighted prefix gives plain `GPTDataset`s; several prefixes or weights give
    `BlendedDataset`s whose members are built 0.5% larger than their share, as in Megatron.
    A pad id equal to the EOD id is replaced by -1 (Megatron's rule), so real EOD labels are
    never masked as padding.
    """
    if pad_token_id is None or pad_token_id == eod_token_id:
        pad_token_id = DEFAULT_PAD_TOKEN_ID
    config = GPTDatasetConfig(
        seq_length,
        seed,
        split,
        cache_dir,
        eod_token_id,
        pad_token_id,
        reset_position_ids,
        eod_mask_loss,
        drop_last_partial_validation_sequence,
    )
    sizes = list(num_samples) if num_samples is not None else [None, None, None]
    if len(sizes) != 3:
        raise ShoalError(f"num_samples must give train, valid and test counts, got {sizes}")
    prefixes, weights = parse_blend(paths)
    matrix = split_matrix(split)

    if weights is not None:
        normalised = (np.asarray(weights) / np.sum(weights)).tolist()
        for name, size, bookend in zip(SPLIT_NAMES, sizes, matrix):
            if size is None and bookend is not None:
                raise ShoalError(f"a weighted blend needs a sample count for the {name} split")
        # Each member is asked for its share of every split, plus the surplus.
        targets = [[None if n is None else math.ceil(n * w) for n in sizes] for w in normalised]
        requests = [
            [None if t is None else math.ceil(t * (1 + BLEND_SURPLUS)) for t in row] for row in targets
        ]
    else:
        requests = [list(sizes) if len(prefixes) == 1 else [None, None, None] for _ in prefixes]

    # members[split][dataset]: each prefix's split, built with its own request.
    members: list[list[GPTDataset | None]] = [[], [], []]
    for prefix, request in zip(prefixes, requests):
        indexed = open_dataset(prefix)
        ranges = split_ranges(split, len(indexed.sequence_lengths))
        for i, (name, doc_range) in enumerate(zip(SPLIT_NAMES, ranges)):
            if doc_range is None or (name != "train" and doc_range[1] <= doc_range[0]):
                # A small corpus can round a validation/test share down to no document: run without it.
                members[i].append(None)
                continue
            ids = np.arange(doc_range[0], doc_range[1], dtype=np.int32)
            members[i].append(GPTDataset(indexed, prefix, ids, request[i], name, config))

    results: list[GPTDataset | BlendedDataset | None] = []
    for i, name in enumerate(SPLIT_NAMES):
        if matrix[i] is None:
            results.append(None)
            continue
        datasets = members[i]
        if len(prefixes) == 1 and weights is None:
            result: GPTDataset | BlendedDataset | None = datasets[0]
        elif weights is not None:
            size = sum(row[i] for row in targets)
            # Normalised weights, normalised again inside: Megatron does both, and the second
            # division can move the last bit, which the greedy blend would notice.
            result = BlendedDataset(datasets, normalised, size, name, cache_dir)
        else:
            # Size-weighted blend; empty members drop out (Megatron would reject a zero weight).
            kept = [d for d in datasets if d is not None and len(d) > 0]
            lengths = [len(d) for d in kept]
            size = None if sizes[i] is None else min(sizes[i], sum(lengths))
            result = BlendedDataset(kept, lengths, size, name, cache_dir) if kept else None
        if result is None or len(result) == 0:
            if name == "train":
                raise ShoalError(
                    f"the train split of {', '.join(prefixes)} holds no sample of {seq_length + 1} "
                    f"tokens (split {split!r}); use more data, a shorter seq_length or another split"
                )
            logger.warning("the %s split of %s holds no sample", name, ", ".join(prefixes))
            result = None
        results.append(result)
    return tuple(results)
