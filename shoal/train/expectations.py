"""What a run expects of itself and what it wrote about itself: `shoal plan`'s estimate printed at
the start (on a GPU it knows), set against the measured memory and speed after the first steps, and
`shoal report`'s plots written at the end. Neither may fail a run: a problem is a warning."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from shoal.config.recipe import Recipe

GIB = 2**30
# The estimate's speed comes from MFU measured on 1B-8B shapes; a much smaller model says nothing by it.
MIN_PLANNED_PARAMETERS = 300_000_000


def planned(recipe: Recipe, device: torch.device) -> Any | None:
    """The plan's estimate for this run on this GPU kind (None on CPU or an unknown GPU), printed."""
    if device.type != "cuda":
        return None
    from shoal.plan.command import brief, build_plan
    from shoal.plan.hardware import GPUS

    name = torch.cuda.get_device_name(device).lower()
    kind = next((gpu for key, gpu in GPUS.items() if key.split("-")[0] in name), None)
    if kind is None:
        return None
    if recipe.model.preset is None and recipe.model.checkpoint is None:
        return None
    try:
        plan = build_plan(recipe, recipe.stage, kind)
        if plan.counts.total < MIN_PLANNED_PARAMETERS:
            return None  # far below the benchmarked shapes, where the run is overhead-bound, not FLOP-bound
    except Exception as err:  # the estimate is advice: it never stops a run
        print(f"shoal: warning: no estimate for this run ({err})", file=sys.stderr)
        return None
    print(brief(plan), file=sys.stderr)
    return plan.estimate


def compare(estimate: Any, metrics: dict[str, Any]) -> str | None:
    """One line: measured peak memory and tokens/s/GPU against the estimate."""
    if estimate is None or "memory_gib" not in metrics:
        return None
    memory = estimate.memory.allocated / GIB
    speed = estimate.speed.tokens_per_s_per_gpu
    return (f"shoal: measured {metrics['memory_gib']:.1f} GiB/GPU allocated (estimated {memory:.1f}, "
            f"{metrics['memory_gib'] / memory - 1:+.0%}), {metrics['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU "
            f"(estimated {speed:,.0f}, {metrics['tokens_per_s_per_gpu'] / speed - 1:+.0%})")


def write_run_report(experiment_dir: Path) -> Path | None:
    """report.png/report.html of the run (needs matplotlib, the `report` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("shoal: the run's plots need matplotlib: pip install 'shoal[report]', then shoal report "
              f"{experiment_dir}", file=sys.stderr)
        return None
    from shoal.report.page import write_report

    try:
        path = write_report(experiment_dir)
    except Exception as err:
        print(f"shoal: warning: no report for {experiment_dir} ({err})", file=sys.stderr)
        return None
    print(f"shoal: report of the run: {path}", file=sys.stderr)
    return path
