"""First-fit decreasing packing and the layout of packed rows, on synthetic examples."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from shoal.data.packing import build_row, first_fit_decreasing, packing_efficiency


def _naive_first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """The textbook algorithm, scanning every open bin: the oracle for the tree-based one."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, room in enumerate(free):
            if room >= lengths[i]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_decreasing_matches_the_textbook_algorithm(seed):
    rng = random.Random(seed)
    capacity = rng.choice([16, 64, 100])
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 300))]
    bins = first_fit_decreasing(lengths, capacity)
    assert bins == _naive_first_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    used = sum(lengths)
    assert packing_efficiency(lengths, bins, capacity) == pytest.approx(used / (len(bins) * capacity))


def test_first_fit_decreasing_edge_cases():
    assert first_fit_decreasing([], 8) == []
    assert first_fit_decreasing([3, 5, 8, 4, 4], 8) == [[2], [1, 0], [3, 4]]
    with pytest.raises(ValueError, match="item 1 has length 9"):
        first_fit_decreasing([3, 9], 8)


def _example(n: int, first_answer: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(offset, offset + n, dtype=np.int64)
    return ids, np.arange(n) >= first_answer


def test_build_row_layout():
    a, b = _example(5, 3, 10), _example(4, 1, 20)
    row = build_row([a, b], length=10, pad_id=0)
    # a fills 4 positions, b 3, padding 3; labels stay inside their example.
    assert row["tokens"].tolist() == [10, 11, 12, 13, 20, 21, 22, 0, 0, 0]
    assert row["labels"].tolist() == [11, 12, 13, 14, 21, 22, 23, 0, 0, 0]
    # loss where the *label* is an answer token: a's ids 13, 14 and b's ids 21..23.
    assert row["loss_mask"].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0]
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert row["document_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert row["loss_mask"].dtype == torch.float32 and row["tokens"].dtype == torch.int64
    full = build_row([a, b, _example(4, 0, 30)], length=10, pad_id=0)
    assert full["document_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="more than the row's"):
        build_row([a, b], length=6, pad_id=0)
