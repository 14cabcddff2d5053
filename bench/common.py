"""What the training benchmarks share: a batch of random tokens and the timing of a step.

Imported by the scripts beside it (`python bench/NAME.py` puts this folder on sys.path).
"""

from __future__ import annotations

import time

import torch


def random_batch(vocab: int, mbs: int, seq: int, device: torch.device, seed: int | None = None) -> dict[str, torch.Tensor]:
    """`mbs` rows of `seq` random tokens, one document a row, the loss on every token; `seed` gives
    each data-parallel rank its own tokens."""
    g = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    tokens = torch.randint(0, vocab, (mbs, seq + 1), device=device, generator=g)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": torch.ones(mbs, seq, device=device),
        "position_ids": torch.arange(seq, device=device).expand(mbs, seq).contiguous(),
        "document_ids": torch.zeros(mbs, seq, dtype=torch.long, device=device),
    }


def time_steps(step, warmup: int, steps: int, device: torch.device) -> tuple[float, float | None]:
    """Seconds per step (the median of `steps` after `warmup` untimed ones) and peak GPU memory in
    GiB (None on CPU)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30 if cuda else None
