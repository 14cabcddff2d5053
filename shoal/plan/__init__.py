"""`shoal plan`: memory, speed and better layouts of a training command line, before running it.

`shoal.plan.estimate` holds the formulas (docs/planning.md), `shoal.plan.measured` the figures of
shoal's benchmarks the speed estimate is read from, `shoal.plan.layouts` the search for layouts,
`shoal.plan.command` the command. A training run can call `build_plan(recipe, stage, gpu)` and log
`brief(plan)` beside what it measures.
"""

import importlib

__all__ = ["ACCEPTS_OVERRIDES", "add_arguments", "brief", "build_plan", "main", "render_text"]


def __getattr__(name: str):
    """The command's names, imported on first use: the package itself imports no torch, so
    `shoal.plan.options` (the flags, read for `shoal plan --help`) loads without it."""
    if name in __all__:
        return getattr(importlib.import_module("shoal.plan.command"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
