"""`shoal plan`: memory, speed and better layouts of a training command line, before running it.

`shoal.plan.estimate` holds the formulas (docs/planning.md), `shoal.plan.measured` the figures of
shoal's benchmarks the speed estimate is read from, `shoal.plan.layouts` the search for layouts,
`shoal.plan.command` the command. A training run can call `build_plan(recipe, stage, gpu)` and log
`brief(plan)` beside what it measures.
"""

from shoal.plan.command import ACCEPTS_OVERRIDES, add_arguments, brief, build_plan, main, render_text

__all__ = ["ACCEPTS_OVERRIDES", "add_arguments", "brief", "build_plan", "main", "render_text"]
