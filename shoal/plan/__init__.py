"""`shoal plan`: memory, speed and better layouts of a training command line, before running it.

`shoal.plan.estimate` holds the formulas (docs/planning.md), `shoal.plan.measured` the figures of
shoal's benchmarks the speed estimate is read from, `shoal.plan.layouts` the search for layouts,
`shoal.plan.command` the command. `build_plan(recipe, stage, gpu)` is what a training run calls.
"""

from shoal.plan.command import ACCEPTS_OVERRIDES, add_arguments, build_plan, main, render_text

__all__ = ["ACCEPTS_OVERRIDES", "add_arguments", "build_plan", "main", "render_text"]
