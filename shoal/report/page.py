"""`shoal report`: the PNG and a self-contained HTML page (the PNG inlined, and the summary table).

Both files are written under a temporary name and renamed into place, so a failed report never
leaves a half-written file; they are the report's own outputs and are replaced on every run.
"""

from __future__ import annotations

import base64
import html
import io
import os
import sys
from pathlib import Path

from shoal.report.figure import build_figure
from shoal.report.run_data import RunData, load_run
from shoal.report.summary import summary_rows

PNG_NAME, HTML_NAME = "report.png", "report.html"


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def render_png(run: RunData) -> bytes:
    buffer = io.BytesIO()
    build_figure(run).savefig(buffer, format="png")
    return buffer.getvalue()


def render_html(run: RunData, png: bytes) -> str:
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary_rows(run))
    image = base64.b64encode(png).decode("ascii")
    title = html.escape(f"shoal report: {run.experiment_dir.name}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}} th{{background:#f4f4f4}}</style></head>
<body><h1>{title}</h1>
<table>
{rows}
</table>
<p><img alt="loss, learning rate, gradient norm and throughput against steps" src="data:image/png;base64,{image}"></p>
</body></html>
"""


def write_report(experiment_dir: Path, output_dir: Path | None = None) -> Path:
    """Write report.png and report.html for an experiment (into it, or `output_dir`); returns the HTML path."""
    run = load_run(Path(experiment_dir))
    out = Path(output_dir) if output_dir is not None else run.experiment_dir
    out.mkdir(parents=True, exist_ok=True)
    png = render_png(run)
    _write_atomically(out / PNG_NAME, png)
    page = out / HTML_NAME
    _write_atomically(page, render_html(run, png).encode("utf-8"))
    return page


def add_arguments(parser) -> None:
    parser.add_argument("experiment", help="the experiment folder (results/EXPERIMENT)")
    parser.add_argument("--output_dir", help="where to write report.png and report.html (default: the experiment)")


def main(args) -> int:
    page = write_report(Path(args.experiment), Path(args.output_dir) if args.output_dir else None)
    print(f"shoal report: {page.with_name(PNG_NAME)}", file=sys.stderr)
    print(f"shoal report: {page}", file=sys.stderr)
    for key, value in summary_rows(load_run(Path(args.experiment))):
        print(f"  {key}: {value}")
    return 0
