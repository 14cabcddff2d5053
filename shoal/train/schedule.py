"""Learning-rate schedule: linear warmup, then cosine, linear or constant decay to `min_lr`, as NeMo's
`CosineAnnealing` / `WarmupAnnealing` / `WarmupPolicy` compute it (tests/unit/train/test_schedule.py).

The rate is a pure function of the step, so resuming needs only the step count: nothing else of the
scheduler has to be saved for the resumed run to follow the same curve.
"""

from __future__ import annotations

import math

from shoal.config.recipe import TrainSection
from shoal.train.run_plan import warmup_steps


def lr_at(step: int, cfg: TrainSection, total_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`."""
    peak = cfg.lr
    floor = cfg.min_lr if cfg.min_lr is not None else peak / 10
    warmup = warmup_steps(cfg, total_steps)
    if warmup and step < warmup:
        # NeMo's warmup (WarmupPolicy): (s + 1) / (W + 1), so step W is the first at the peak, where
        # the decay starts from, and the ramp has no flat step at its top.
        return peak * (step + 1) / (warmup + 1)
    if cfg.lr_schedule == "constant":
        return peak
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if cfg.lr_schedule == "linear":
        return peak + (floor - peak) * progress
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
