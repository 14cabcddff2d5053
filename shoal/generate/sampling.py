"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

The filters are applied in the order Hugging Face's generate applies its warpers (temperature,
then top-k, then top-p), so the same settings mean the same distribution in both. Randomness comes
from one `torch.Generator` seeded by the caller, never from the global stream: a seeded run draws
the same tokens again whatever ran before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.errors import ShoalError


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each token. temperature 0 (or do_sample False) means greedy."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ShoalError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ShoalError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ShoalError(f"--top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        parts = [f"temperature={self.temperature:g}", f"top_p={self.top_p:g}"]
        if self.top_k:
            parts.append(f"top_k={self.top_k}")
        parts.append(f"seed={self.seed}")
        return "sampled: " + ", ".join(parts)


def filter_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """logits [B, V] in fp32 -> scaled logits with the excluded tokens at -inf."""
    logits = logits / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1:
        # Keep the smallest set of most likely tokens whose probability reaches top_p (at least one):
        # sorted ascending, a token goes when the mass of the tokens below it is <= 1 - top_p.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1 - settings.top_p
        remove_sorted[:, -1] = False
        remove = remove_sorted.scatter(1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row [B] from the last position's logits [B, V]."""
    if settings.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float(), settings).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def make_generator(settings: SamplingSettings, device: torch.device) -> torch.Generator | None:
    """The random stream of a sampled run (seeded when a seed is given); None for greedy."""
    if settings.greedy:
        return None
    generator = torch.Generator(device=device)
    if settings.seed is not None:
        generator.manual_seed(settings.seed)
    else:
        generator.seed()
    return generator
