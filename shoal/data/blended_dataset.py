"""Mixing several pretraining datasets in fixed proportions, as Megatron's `BlendedDataset` does.

The order of the mix is deterministic (no random numbers): each blended sample goes to the dataset
furthest behind its share. The arithmetic follows megatron-core's C++ helper step by step, in
doubles, so a blend built here picks the same dataset for every sample as megatron-core does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from shoal.data.index_cache import description_hash, load_or_build_arrays
from shoal.errors import ShoalError


class BlendMember(Protocol):
    """What a blend needs of each dataset (a `GPTDataset`)."""

    dataset_path: str
    unique_description: str

    def __len__(self) -> int: ...

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]: ...


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset (int16) and which of its samples (int64) each blended sample comes from.

    Greedy and deterministic: sample s goes to the dataset furthest behind its share,
    `argmax_d(w_d * max(s, 1) - count_d)`, the lowest index winning ties. The arithmetic is
    done in doubles in the same order as megatron-core's C++ so that the choices match it.
    """
    shares = [float(w) for w in weights]
    counts = [0] * len(shares)
    chosen = [0] * size
    picked = [0] * size
    others = range(1, len(shares))
    for s in range(size):
        scale = float(s) if s > 1 else 1.0
        best, best_error = 0, shares[0] * scale - counts[0]
        for d in others:
            error = shares[d] * scale - counts[d]
            if error > best_error:
                best, best_error = d, error
        chosen[s] = best
        picked[s] = counts[best]
        counts[best] += 1
    return np.asarray(chosen, dtype=np.int16), np.asarray(picked, dtype=np.int64)


def build_exhaustive_blending_indices(sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Like `build_blending_indices` with weights `sizes / sum`, drawing exactly `sizes[d]` each.

    A dataset leaves the race once it is used up, so the blend ends when all of them are.
    """
    total = int(sum(sizes))
    shares = [size / float(total) for size in sizes] if total else []
    counts = [0] * len(sizes)
    live = [d for d, size in enumerate(sizes) if size > 0]
    chosen, picked = [0] * total, [0] * total
    for s in range(total):
        scale = float(s) if s > 1 else 1.0
        best, best_error = -1, -math.inf
        for d in live:
            error = shares[d] * scale - counts[d]
            if error > best_error:
                best, best_error = d, error
        chosen[s] = best
        picked[s] = counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            live.remove(best)
    return np.asarray(chosen, dtype=np.int16), np.asarray(picked, dtype=np.int64)


class BlendedDataset(torch.utils.data.Dataset):
    """Samples drawn from several datasets in fixed proportions (Megatron's `BlendedDataset`).

    `weights` are normalised; with `size=None` every sample of every dataset is used exactly
    once, in proportion to the dataset sizes. Indices are cached only when `cache_dir` is given,
    as in megatron-core.
    """

    def __init__(
        self,
        datasets: Sequence[BlendMember],
        weights: Sequence[float],
        size: int | None,
        split_name: str,
        cache_dir: str | None = None,
    ) -> None:
        if not datasets or len(datasets) != len(weights) or len(datasets) >= 32767:
            raise ShoalError(
                f"a blend needs 1 to 32766 datasets with one weight each, got {len(datasets)} "
                f"datasets and {len(weights)} weights"
            )
        if any(w <= 0 for w in weights):
            raise ShoalError(f"blend weights must be positive, got {list(weights)}")
        self.datasets = list(datasets)
        self.split_name = split_name
        self.size = size
        if size is not None:
            w = np.asarray(weights, dtype=np.float64)
            self.weights: list[float] = (w / w.sum()).tolist()
        else:
            self.weights = [int(w) for w in weights]
        description = json.dumps(
            {
                "class": "BlendedDataset",
                "datasets": [json.loads(d.unique_description) for d in self.datasets],
                "split": split_name,
                "weights": self.weights,
                "size": size,
            },
            indent=4,
        )

        def build() -> dict[str, np.ndarray]:
            if size is None:
                dataset_index, sample_index = build_exhaustive_blending_indices(self.weights)
            else:
                dataset_index, sample_index = build_blending_indices(self.weights, size)
            return {"dataset_index": dataset_index, "dataset_sample_index": sample_index}

        arrays = load_or_build_arrays(
            cache_dir,
            f"{description_hash(description)}-BlendedDataset-{split_name}",
            description,
            ("dataset_index", "dataset_sample_index"),
            build,
            lambda a: a["dataset_index"].shape == a["dataset_sample_index"].shape,
        )
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        index = np.asarray(self.dataset_index, dtype=np.int64)
        for count, dataset in zip(np.bincount(index, minlength=len(self.datasets)), self.datasets):
            if count > len(dataset):
                raise ShoalError(
                    f"the {split_name} blend takes {count} samples from {dataset.dataset_path}, "
                    f"which has only {len(dataset)}"
                )

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        dataset = self.datasets[int(self.dataset_index[idx])]
        return dataset[int(self.dataset_sample_index[idx])]
