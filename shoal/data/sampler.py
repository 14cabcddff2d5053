"""Which samples each data-parallel rank reads, as a resumable position in one global order.

Megatron's pretraining sampler, plus wrap-around epochs for small datasets. The run reads one
global sequence of sample indices, `global_batch = micro_batch_size * dp_size` at a time; within a
global batch rank r takes the contiguous slice `[r * micro_batch_size, (r + 1) * micro_batch_size)`.
The ranks therefore see disjoint micro-batches that together cover the sequence with no gap and no
duplicate, exactly what a single process reading global batches would see.

The only state is `consumed_samples`, the number of samples of the global sequence already
handed out to all ranks together. It does not depend on the data-parallel size, so a run saved
with 8 ranks resumes with 4 (or 16) at the same place in the data: the new ranks slice the same
global sequence from the same position, and no sample is skipped or read twice.

Epochs: a `GPTDataset` is built with as many epochs as the requested sample count needs, so for
pretraining `total_samples <= dataset_size` and the order is the dataset's own (already shuffled).
A smaller dataset, such as a fine-tuning set read for several epochs, wraps around: global
position p reads sample `p % dataset_size` of epoch `p // dataset_size`, and with a `seed` each
epoch is visited in its own permutation, seeded by (seed, epoch) so that it is the same after a
resume whatever the layout.

Resuming with a prefetching `DataLoader`: the loader runs ahead of the training step, so the
sampler's live `consumed_samples` counts batches that were fetched but not trained on. The
training loop should count the samples it trained on (steps x global batch) and hand that count to
`load_state_dict`/the constructor, as Megatron does; `state_dict()` is exact only when nothing is
prefetched.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from shoal.errors import ShoalError


class MicroBatchSampler:
    """Yields this rank's micro-batches (lists of dataset indices); a `DataLoader` batch_sampler.

    `total_samples` is how many samples the run reads in all ranks together. With
    `drop_last=False` the final partial global batch is shared out in near-equal contiguous parts
    (so a rank may get a smaller micro-batch, or none); with `drop_last=True` it is not read.
    """

    def __init__(
        self,
        total_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
        drop_last: bool = True,
        *,
        dataset_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        if micro_batch_size < 1 or dp_size < 1:
            raise ShoalError(
                f"micro_batch_size and data-parallel size must be positive, got "
                f"{micro_batch_size} and {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ShoalError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
        if total_samples < 0 or consumed_samples < 0:
            raise ShoalError(
                f"sample counts must not be negative (total {total_samples}, "
                f"consumed {consumed_samples})"
            )
        if dataset_size is not None and dataset_size < 1 and total_samples > 0:
            raise ShoalError(f"cannot read {total_samples} samples from an empty dataset")
        self.total_samples = total_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples
        self.drop_last = drop_last
        self.dataset_size = dataset_size if dataset_size is not None else max(total_samples, 1)
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    def _rank_slice(self, begin: int, end: int) -> tuple[int, int]:
        """This rank's part of the global positions [begin, end)."""
        count = end - begin
        if count == self.global_batch_size:
            lo = begin + self.dp_rank * self.micro_batch_size
            return lo, lo + self.micro_batch_size
        # A final partial batch: near-equal contiguous parts, the first ranks one larger.
        base, extra = divmod(count, self.dp_size)
        lo = begin + self.dp_rank * base + min(self.dp_rank, extra)
        return lo, lo + base + (1 if self.dp_rank < extra else 0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._permutations = {epoch: rng.permutation(self.dataset_size)}  # keep one epoch
        return self._permutations[epoch]

    def indices(self, begin: int, end: int) -> list[int]:
        """Dataset indices at global positions [begin, end) of the run's sample sequence."""
        positions = np.arange(begin, end, dtype=np.int64)
        epochs, within = np.divmod(positions, self.dataset_size)
        if self.seed is None:
            return within.tolist()
        out = np.empty_like(within)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            out[chosen] = self._epoch_order(int(epoch))[within[chosen]]
        return out.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        while self.consumed_samples < self.total_samples:
            begin = self.consumed_samples
            end = min(begin + self.global_batch_size, self.total_samples)
            if end - begin < self.global_batch_size and self.drop_last:
                return
            lo, hi = self._rank_slice(begin, end)
            # Counted before the yield: once handed out, the global batch is consumed.
            self.consumed_samples = end
            if hi > lo:
                yield self.indices(lo, hi)

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches this rank still yields from the current position."""
        remaining = max(self.total_samples - self.consumed_samples, 0)
        full, partial = divmod(remaining, self.global_batch_size)
        if self.drop_last or partial == 0:
            return full
        lo, hi = self._rank_slice(0, partial)
        return full + (1 if hi > lo else 0)

    def __len__(self) -> int:
        return self.num_micro_batches

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        consumed = state.get("consumed_samples")
        if not isinstance(consumed, int) or consumed < 0:
            raise ShoalError(f"sampler state needs a non-negative 'consumed_samples', got {state}")
        self.consumed_samples = consumed
