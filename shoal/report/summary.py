"""The report's summary table: what a reader asks first about a run, from the files it left."""

from __future__ import annotations

import statistics

from shoal.report.run_data import RunData


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _last(run: RunData, key: str) -> float | None:
    series = run.series.get(key)
    return series.values[-1] if series and series.values else None


def _median_after_first(run: RunData, key: str) -> float | None:
    """The median over logged steps, leaving out the first (it includes compilation and warm-up)."""
    series = run.series.get(key)
    if not series or not series.values:
        return None
    values = series.values[1:] or series.values
    return statistics.median(values)


def summary_rows(run: RunData) -> list[tuple[str, str]]:
    """(label, value) pairs; a value the run did not record reads "not recorded"."""
    missing = "not recorded"
    rows: list[tuple[str, str]] = [("experiment", str(run.experiment_dir))]
    if run.stage:
        rows.append(("stage", run.stage))
    if run.model:
        rows.append(("model", str(run.model)))
    loss = run.series.get("loss")
    rows.append(("steps logged", f"{loss.steps[-1]}" if loss and loss.steps else missing))
    tokens = run.tokens_at()
    rows.append(("tokens seen", f"{int(tokens.values[-1]):,}" if tokens.values else missing))
    wall = run.wall_seconds
    rows.append(("wall time (logged steps)", _duration(wall) if wall is not None else missing))
    rows.append(("resumes", ", ".join(f"from step {s}" for s in run.resumed_at) if run.resumed_at else "none"))
    best = run.best_checkpoint
    rows.append(("best checkpoint", best.name if best else "none saved"))
    last_loss, val = _last(run, "loss"), run.series.get("val_loss")
    rows.append(("last training loss", f"{last_loss:.4f}" if last_loss is not None else missing))
    rows.append(("best validation loss", f"{min(val.values):.4f}" if val and val.values else missing))
    tps = _median_after_first(run, "tokens_per_s_per_gpu")
    rows.append(("throughput (median)", f"{tps:,.0f} tokens/s/GPU" if tps is not None else missing))
    mfu = _median_after_first(run, "mfu")
    rows.append(("MFU (median)", f"{100 * mfu:.1f}%" if mfu is not None else "not recorded (no known GPU peak)"))
    memory = run.series.get("memory_gib")
    rows.append(("peak memory", f"{max(memory.values):.1f} GiB/GPU" if memory and memory.values else missing))
    return rows
