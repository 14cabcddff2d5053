"""Turning tokenized fine-tuning examples into fixed-length training rows, one or several per row.

An example is a pair of equal-length arrays: `ids` (the token ids of prompt and answer) and
`answer` (True where the id is an answer token the model must learn to produce). An example of n ids
fills n - 1 positions of a row: its tokens are `ids[:-1]` and its labels `ids[1:]`, so its first
answer token is predicted from the last prompt token and its last id (the end-of-turn token) is only
ever a label. Labels therefore never reach into the next example.

Several examples share a row by first-fit decreasing bin packing; each keeps its own document id
(so `shoal.models.document_attention` keeps them apart) and its positions restart at 0, which makes
every example's logits in a packed row equal its logits alone. Padding is one more document.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Example = tuple[np.ndarray, np.ndarray]  # (ids int64 [n], answer bool [n])


def example_length(example: Example) -> int:
    """Positions an example fills in a row: every id but the last is an input token."""
    return len(example[0]) - 1


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items into as few bins of `capacity` as first-fit decreasing finds; returns item indices per bin.

    Items are taken longest first (ties by index, so the result is deterministic) and each goes to
    the lowest-numbered bin with room. A max-tree over the bins' free space finds that bin in
    O(log n) rather than scanning every open bin, which matters for 100k-example data sets.
    """
    n = len(lengths)
    if n == 0:
        return []
    for i, length in enumerate(lengths):
        if not 1 <= length <= capacity:
            raise ValueError(f"item {i} has length {length}, outside 1..{capacity}")
    size = 1
    while size < n:
        size *= 2
    # Leaves are bins (at most one per item); unused bins hold full capacity, so the leftmost bin
    # with room is always an open one or the next fresh one.
    free = [0] * (2 * size)
    free[size:size + n] = [capacity] * n
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = []
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    for item in order:
        need = lengths[item]
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        slot = node - size
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
        if slot == len(bins):
            bins.append([])
        bins[slot].append(item)
    return bins


def packing_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], capacity: int) -> float:
    """Fraction of the positions in all packed rows that hold example tokens rather than padding."""
    if not bins:
        return 0.0
    used = sum(lengths[i] for b in bins for i in b)
    return used / (len(bins) * capacity)


def build_row(examples: Sequence[Example], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One training row of `length` positions holding `examples` back to back, then padding.

    Keys (all [length]): `tokens` and `labels` int64, `loss_mask` float32 (1 where the label is an
    answer token), `position_ids` int64 (restarting at 0 per example), `document_ids` int64
    (0, 1, ... per example; the padding after them gets the next id and loss 0).
    """
    tokens = np.full(length, pad_id, dtype=np.int64)
    labels = np.full(length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(length, dtype=np.float32)
    position_ids = np.zeros(length, dtype=np.int64)
    document_ids = np.full(length, len(examples), dtype=np.int64)
    start = 0
    for doc, (ids, answer) in enumerate(examples):
        n = len(ids) - 1
        end = start + n
        if end > length:
            raise ValueError(f"examples need {end} positions, more than the row's {length}")
        tokens[start:end] = ids[:-1]
        labels[start:end] = ids[1:]
        loss_mask[start:end] = answer[1:]
        position_ids[start:end] = np.arange(n)
        document_ids[start:end] = doc
        start = end
    # Padding restarts its positions too, so they stay below the row length.
    position_ids[start:] = np.arange(length - start)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "document_ids": torch.from_numpy(document_ids),
    }
