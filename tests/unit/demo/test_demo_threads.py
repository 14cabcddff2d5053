"""The demo uses the cores other processes leave free, never fewer than one thread."""

from __future__ import annotations

import os

import pytest

from shoal.demo import run


@pytest.mark.parametrize("busy, expected", [(0.0, 2), (0.3, 2), (0.8, 1), (1.6, 1), (12.0, 1)])
def test_threads_are_the_idle_cores_of_the_process(monkeypatch, busy, expected) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(run, "_busy_cores", lambda seconds: busy)
    assert run.idle_cores() == expected


def test_busy_cores_is_a_share_of_the_online_cores() -> None:
    busy = run._busy_cores(0.05)
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9
