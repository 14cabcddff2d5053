"""The learning-rate schedule against values worked out by hand.

The reference is NeMo's `CosineAnnealing` (nemo/core/optim/lr_scheduler.py, what the seed's NeMo 2
recipes use, with `constant_steps=0`) and its siblings `WarmupAnnealing` (linear) and
`WarmupPolicy` (constant). Step s is 0-based and is the s-th optimizer step, as a PyTorch scheduler's
`last_epoch` is when Lightning steps it once per optimizer step. With W warmup steps and T total:

    s <= W (W > 0):  peak * (s + 1) / (W + 1)          the peak is reached at s = W, not before
    cosine:          floor + (peak - floor) * (1 + cos(pi * (s - W) / (T - W))) / 2
    linear:          peak - (peak - floor) * (s - W) / (T - W)
    constant:        peak
    s > T:           floor  (constant: peak)

`min_lr` unset means peak / 10 (NeMo 2's `distributed_fused_adam_with_cosine_annealing` default).
"""

from __future__ import annotations

import math

import pytest

from shoal.config.recipe import TrainSection
from shoal.train.schedule import lr_at

SQRT_HALF = math.sqrt(0.5)  # cos(pi/4) = -cos(3pi/4) = 0.70710678...


def curve(steps, total: int, **train) -> list[float]:
    cfg = TrainSection(**train)
    return [lr_at(s, cfg, total) for s in steps]


def test_cosine_without_warmup_from_peak_through_midpoint_to_floor():
    # peak 1.0, floor 0.2, T = 4: the half-amplitude is (1.0 - 0.2) / 2 = 0.4.
    expected = [
        1.0,  # s=0: cos 0 = 1         -> 0.2 + 0.4 * 2
        0.2 + 0.4 * (1 + SQRT_HALF),  # s=1: cos(pi/4)  -> 0.88284271
        0.6,  # s=2: cos(pi/2) = 0  -> the midpoint 0.2 + 0.4, halfway between peak and floor
        0.2 + 0.4 * (1 - SQRT_HALF),  # s=3: cos(3pi/4) -> 0.31715729
        0.2,  # s=4 = T: cos(pi) = -1 -> the floor
        0.2,  # s=9 > T: held at the floor
    ]
    assert curve([0, 1, 2, 3, 4, 9], 4, lr=1.0, min_lr=0.2) == pytest.approx(expected, rel=1e-12)


def test_warmup_then_cosine():
    # peak 1.0, floor 0.0, W = 4, T = 12: warmup (s + 1) / 5 for s = 0..4, then 8 steps of cosine.
    warmup = [0.2, 0.4, 0.6, 0.8, 1.0]  # s = 0..4; s = 4 = W is the peak (and cosine's start)
    decay = {
        6: 0.5 * (1 + SQRT_HALF),  # (6 - 4) / 8 = 1/4 of the way: 0.85355339
        8: 0.5,  # 4/8: the cosine midpoint, halfway between 1.0 and 0.0
        10: 0.5 * (1 - SQRT_HALF),  # 6/8 = 3/4: 0.14644661
        12: 0.0,  # T: the floor
    }
    assert curve(range(5), 12, lr=1.0, min_lr=0.0, warmup_steps=4) == pytest.approx(warmup, rel=1e-12)
    got = curve(decay, 12, lr=1.0, min_lr=0.0, warmup_steps=4)
    assert got == pytest.approx(list(decay.values()), rel=1e-12, abs=1e-15)


def test_warmup_of_one_step_starts_at_half_the_peak():
    # W = 1, T = 3: s=0 is (0 + 1) / 2 = 0.5 of the peak 0.4, s=1 the peak, then the cosine over
    # 2 steps: its midpoint (0.4 + 0.04) / 2 = 0.22 at s=2 and the floor 0.04 (lr / 10) at s=3.
    assert curve(range(4), 3, lr=0.4, warmup_steps=1) == pytest.approx([0.2, 0.4, 0.22, 0.04], rel=1e-12)


def test_min_lr_unset_floors_at_a_tenth_of_the_peak():
    # peak 0.5 -> floor 0.05; T = 2: s=1 is the midpoint 0.05 + 0.45 / 2 = 0.275, s=2 the floor.
    assert curve([0, 1, 2, 50], 2, lr=0.5) == pytest.approx([0.5, 0.275, 0.05, 0.05], rel=1e-12)


def test_linear_decay_with_and_without_warmup():
    # peak 1.0, floor 0.2, T = 4: 0.8 less over 4 steps, 0.2 per step.
    assert curve(range(6), 4, lr=1.0, min_lr=0.2, lr_schedule="linear") == pytest.approx(
        [1.0, 0.8, 0.6, 0.4, 0.2, 0.2], rel=1e-12)
    # W = 1, T = 5: s=0 warms up to (0 + 1) / 2 = 0.5, s=1 is the peak, then 0.8 less over 4 steps.
    assert curve(range(6), 5, lr=1.0, min_lr=0.2, lr_schedule="linear", warmup_steps=1) == pytest.approx(
        [0.5, 1.0, 0.8, 0.6, 0.4, 0.2], rel=1e-12)


def test_constant_after_warmup_ignores_the_floor():
    # W = 2: 1/3 and 2/3 of the peak, then the peak for good (min_lr plays no part).
    expected = [1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    got = curve([0, 1, 2, 3, 1000], 10, lr=1.0, min_lr=0.2, lr_schedule="constant", warmup_steps=2)
    assert got == pytest.approx(expected, rel=1e-12)
    assert curve([0, 7], 10, lr=0.3, lr_schedule="constant") == [0.3, 0.3]
