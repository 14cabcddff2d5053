"""`shoal report EXPERIMENT`: plots and a summary of a training run (matplotlib, an optional extra)."""

from shoal.report.page import add_arguments, main, write_report

__all__ = ["add_arguments", "main", "write_report"]
