"""The report's figure: loss, learning rate, gradient norm and throughput against steps.

Every panel has steps on its bottom axis and tokens seen on its top axis, and a dashed vertical
line where the run resumed. Lines carry the metrics.jsonl key as their label (`loss`, `val_loss`,
...) and resume marks the gid `resumed`, so the figure can be checked against the file.
Built on a bare `matplotlib.figure.Figure` (no pyplot): no window, no global state.
"""

from __future__ import annotations

from typing import Any

from shoal.errors import ShoalError
from shoal.report.run_data import RunData

# (panel title, y label, keys plotted on it, log scale)
PANELS = [
    ("Loss", "loss (nats/token)", ("loss", "val_loss"), False),
    ("Learning rate", "lr", ("lr",), False),
    ("Gradient norm", "global norm (before clipping)", ("grad_norm",), True),
    ("Throughput", "tokens/s/GPU", ("tokens_per_s_per_gpu",), False),
]
RESUME_LABEL = "resumed"


def import_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ShoalError("shoal report needs matplotlib: pip install 'shoal[report]'") from None
    return matplotlib


def _tokens_axis(ax: Any, run: RunData) -> None:
    """Tokens seen on the top axis, interpolated from (step, consumed tokens) of the records."""
    import numpy as np

    tokens = run.tokens_at()
    if not tokens.steps:
        return
    steps = np.array([0, *tokens.steps], dtype=float)
    seen = np.array([0, *tokens.values], dtype=float)
    order = np.argsort(steps, kind="stable")
    steps, seen = steps[order], seen[order]
    if np.any(np.diff(seen) <= 0) or np.any(np.diff(steps) <= 0):
        return  # not invertible (e.g. a step logged twice): leave the top axis out rather than lie
    # Continue the last tokens-per-step slope past the data, so ticks beyond it do not pile up.
    slope = (seen[-1] - seen[-2]) / (steps[-1] - steps[-2])
    far = steps[-1] * 10 + 10
    steps, seen = np.append(steps, far), np.append(seen, seen[-1] + slope * (far - steps[-1]))
    top = ax.secondary_xaxis("top", functions=(lambda s: np.interp(s, steps, seen), lambda t: np.interp(t, seen, steps)))
    top.set_xlabel("tokens seen")
    top.xaxis.get_major_formatter().set_useOffset(False)


def build_figure(run: RunData) -> Any:
    """A matplotlib Figure with one panel per entry of PANELS (a panel without data says so)."""
    import_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).flatten()
    title = run.experiment_dir.name + (f" ({run.stage})" if run.stage else "")
    fig.suptitle(title)
    for ax, (name, ylabel, keys, log) in zip(axes, PANELS):
        ax.set_title(name)
        ax.set_ylabel(ylabel)
        if ax in axes[-2:]:
            ax.set_xlabel("step")
        plotted = False
        for key in keys:
            series = run.series.get(key)
            if series is None or not series.steps:
                continue
            style = {"marker": "o", "linestyle": "--"} if key == "val_loss" else {"linewidth": 1.2}
            ax.plot(series.steps, series.values, label=key, **style)
            plotted = True
        if not plotted:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="grey")
        elif log and all(v > 0 for k in keys if k in run.series for v in run.series[k].values):
            ax.set_yscale("log")
        for i, step in enumerate(run.resumed_at):
            # Labelled once per panel (for the legend); every mark carries the gid.
            ax.axvline(step, color="tab:red", linestyle=":", linewidth=1.5, gid=RESUME_LABEL,
                       label=RESUME_LABEL if i == 0 else "_nolegend_")
        if plotted and (len(keys) > 1 or run.resumed_at):
            ax.legend(loc="best", fontsize="small")
        ax.grid(True, alpha=0.3)
        _tokens_axis(ax, run)
    return fig
