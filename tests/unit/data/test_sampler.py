"""The data-parallel sampler against a one-process reading and an uninterrupted run.

The oracle is the plain global sequence of sample indices a single process would read, written
here directly: positions 0, 1, 2, ... of the run, wrapped around the dataset (each epoch in its
own permutation when a seed is given).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from shoal.data.sampler import MicroBatchSampler
from shoal.errors import ShoalError


def one_process_order(total, dataset_size=None, seed=None):
    """The global order of sample indices, written independently of the sampler."""
    size = dataset_size or total
    order = []
    for epoch in range(-(-total // size)):
        if seed is None:
            order += list(range(size))
        else:
            order += np.random.Generator(np.random.PCG64([seed, epoch])).permutation(size).tolist()
    return order[:total]


def run_ranks(total, mbs, dp, consumed=0, drop_last=True, **kwargs):
    """Each rank's micro-batches, and the global batches they form taken in step order."""
    samplers = [MicroBatchSampler(total, mbs, r, dp, consumed, drop_last, **kwargs) for r in range(dp)]
    per_rank = [list(s) for s in samplers]
    return per_rank, samplers


@pytest.mark.parametrize("total,mbs,dp,drop_last", [(96, 4, 2, True), (100, 3, 4, True),
                                                     (100, 3, 4, False), (7, 2, 4, False),
                                                     (10, 2, 4, False)])
def test_ranks_together_read_what_one_process_reads(total, mbs, dp, drop_last):
    per_rank, samplers = run_ranks(total, mbs, dp, drop_last=drop_last)
    gbs = mbs * dp
    usable = total if not drop_last else total // gbs * gbs
    expected = one_process_order(total)[:usable]
    # Step by step, the ranks' micro-batches concatenated in rank order are the next global batch.
    steps = max(len(batches) for batches in per_rank)
    stitched = [i for step in range(steps) for batches in per_rank if step < len(batches)
                for i in batches[step]]
    assert stitched == expected
    flat = [i for batches in per_rank for batch in batches for i in batch]
    assert len(flat) == len(set(flat)) == usable  # disjoint, no gap
    for rank, sampler in enumerate(samplers):
        fresh = MicroBatchSampler(total, mbs, rank, dp, 0, drop_last)
        assert len(fresh) == fresh.num_micro_batches == len(per_rank[rank])
        if drop_last:
            assert all(len(b) == mbs for b in per_rank[rank])
        assert sampler.consumed_samples == usable


@pytest.mark.parametrize("stop_after", [0, 1, 5, 11])
@pytest.mark.parametrize("seed", [None, 3])
def test_resume_continues_the_uninterrupted_run(stop_after, seed):
    total, mbs, dp, dataset_size = 120, 2, 3, 45  # a small dataset read for several epochs
    uninterrupted, _ = run_ranks(total, mbs, dp, dataset_size=dataset_size, seed=seed)
    resumed = []
    for rank in range(dp):
        first = MicroBatchSampler(total, mbs, rank, dp, dataset_size=dataset_size, seed=seed)
        # Read `stop_after` micro-batches (and not one more: a batch handed out is consumed).
        head = list(itertools.islice(first, stop_after))
        state = first.state_dict()
        # A new process: a fresh sampler restored from the saved state.
        second = MicroBatchSampler(total, mbs, rank, dp, dataset_size=dataset_size, seed=seed)
        second.load_state_dict(state)
        assert len(second) == len(uninterrupted[rank]) - stop_after
        resumed.append(head + list(second))
    assert resumed == uninterrupted


def test_position_survives_a_change_of_data_parallel_size():
    total, mbs = 96, 2
    expected = one_process_order(total, dataset_size=40, seed=9)
    before, samplers = [], []
    for rank in range(4):  # 4 ranks read 3 global batches of 8
        sampler = MicroBatchSampler(total, mbs, rank, 4, dataset_size=40, seed=9)
        it = iter(sampler)
        before.append([next(it) for _ in range(3)])
        samplers.append(sampler)
    state = samplers[0].state_dict()
    assert state == {"consumed_samples": 24} and all(s.state_dict() == state for s in samplers)
    after = []
    for rank in range(2):  # resumed on 2 ranks: global batches of 4 from the same position
        sampler = MicroBatchSampler(total, mbs, rank, 2, dataset_size=40, seed=9)
        sampler.load_state_dict(state)
        after.append(list(sampler))
    read = [i for step in range(3) for r in range(4) for i in before[r][step]]
    read += [i for step in range(len(after[0])) for r in range(2) for i in after[r][step]]
    assert read == expected


def test_epochs_wrap_around_with_a_fresh_permutation_each():
    size, epochs = 30, 4
    sampler = MicroBatchSampler(size * epochs, 5, 0, 1, dataset_size=size, seed=1)
    order = [i for batch in sampler for i in batch]
    blocks = [order[e * size : (e + 1) * size] for e in range(epochs)]
    assert all(sorted(b) == list(range(size)) for b in blocks)  # each epoch sees every sample once
    assert len({tuple(b) for b in blocks}) == epochs  # ... in its own order
    again = MicroBatchSampler(size * epochs, 5, 0, 1, dataset_size=size, seed=1)
    assert [i for batch in again for i in batch] == order  # and reproducibly
    plain = MicroBatchSampler(size * 2, 5, 0, 1, dataset_size=size)
    assert [i for batch in plain for i in batch] == list(range(size)) * 2


def test_drives_a_dataloader():
    data = torch.utils.data.TensorDataset(torch.arange(50) * 10)
    sampler = MicroBatchSampler(40, 4, 1, 2, consumed_samples=16)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    assert len(loader) == 3  # micro-batches left from the position
    batches = [b[0].tolist() for b in loader]
    assert batches == [[200, 210, 220, 230], [280, 290, 300, 310], [360, 370, 380, 390]]
    assert len(loader) == 0 and sampler.state_dict() == {"consumed_samples": 40}


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ShoalError, match="micro_batch_size"):
        MicroBatchSampler(10, 0, 0, 1)
    with pytest.raises(ShoalError, match="rank 2"):
        MicroBatchSampler(10, 1, 2, 2)
    with pytest.raises(ShoalError, match="negative"):
        MicroBatchSampler(10, 1, 0, 1, consumed_samples=-1)
    with pytest.raises(ShoalError, match="consumed_samples"):
        MicroBatchSampler(10, 1, 0, 1).load_state_dict({"position": 3})
