"""`shoal report`: the files it writes, and that what it plots is what the run logged.

Oracles: metrics.jsonl read here with plain `json` (not shoal's reader), the checkpoint folder
names listed here, tokens seen worked out by hand (steps × global batch × sequence length), and
the PNG's bytes found base64-encoded in the HTML page.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import shoal
from tests.helpers.training import TrainAssets, train_args

pytest.importorskip("matplotlib")

GLOBAL_BATCH, SEQ = 4, 32  # train_args' pretraining run


def logged(exp: Path, key: str) -> tuple[list[int], list[float]]:
    records = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines() if line]
    pairs = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in pairs], [v for _, v in pairs]


def lines_by_label(fig) -> dict[str, list]:
    found: dict[str, list] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            found.setdefault(line.get_gid() or line.get_label(), []).append(line)
    return found


def test_report_of_a_resumed_pretrain_run(train_assets: TrainAssets, tmp_path: Path, capsys):
    from shoal.report.figure import build_figure
    from shoal.report.run_data import load_run

    common = ["--checkpoint.save_interval=2", "--train.val_check_interval=2", "--checkpoint.save_top_k=2"]
    args = lambda steps: train_args(train_assets, "pretrain", tmp_path / "res", "run", "--max_steps", steps, *common)  # noqa: E731
    assert shoal(*args(4)) == 0
    assert shoal(*args(6)) == 0  # the same experiment, longer: resumes from its step-4 checkpoint
    exp = tmp_path / "res" / "run"

    assert shoal("report", exp) == 0
    png, page = exp / "report.png", exp / "report.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    html = page.read_text()
    assert base64.b64encode(png.read_bytes()).decode() in html  # self-contained: the same image inlined

    # The summary: best checkpoint by the validation loss in the folder names, tokens by hand.
    names = sorted(p.name for p in (exp / "checkpoints").iterdir())
    scored = {n: float(re.search(r"val_loss=([0-9.]+)", n).group(1)) for n in names}
    best = min(scored, key=lambda n: (scored[n], -int(n[5:11])))
    assert f"<th>best checkpoint</th><td>{best}</td>" in html
    assert f"<th>tokens seen</th><td>{6 * GLOBAL_BATCH * SEQ:,}</td>" in html
    assert "<th>resumes</th><td>from step 4</td>" in html

    # The plotted series are metrics.jsonl's, point for point.
    fig = build_figure(load_run(exp))
    lines = lines_by_label(fig)
    for key in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s_per_gpu"):
        steps, values = logged(exp, key)
        (line,) = lines[key]
        assert list(line.get_xdata()) == steps and list(line.get_ydata()) == values, key
    assert logged(exp, "loss")[0] == [1, 2, 3, 4, 5, 6]
    # One resume mark per panel, at the step the second run continued from.
    marks = lines["resumed"]
    assert len(marks) == 4 and all(list(m.get_xdata()) == [4, 4] for m in marks)


def test_a_step_going_back_marks_a_resume(tmp_path: Path):
    """A metrics file appended to without truncation (steps 1-3, then 2-4 again) shows the resume."""
    from shoal.report.run_data import load_run

    exp = tmp_path / "exp"
    exp.mkdir()
    rows = [{"step": s, "loss": 5.0 - s, "consumed_samples": 8 * s} for s in (1, 2, 3, 2, 3, 4)]
    (exp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = load_run(exp)
    assert run.resumed_at == [1]  # the second segment starts at step 2: it continued from step 1
    assert run.wall_seconds is None  # no elapsed_s in these records: wall time is not made up


def run_report(*args) -> tuple[int, str]:
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        rc = shoal("report", *args)
    return rc, err.getvalue()


def test_bad_inputs(tmp_path: Path, monkeypatch):
    rc, err = run_report(tmp_path / "missing")
    assert rc == 2 and "is not a directory" in err

    (tmp_path / "folder").mkdir()
    rc, err = run_report(tmp_path / "folder")
    assert rc == 2 and "not a shoal experiment: it has no metrics.jsonl" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    rc, err = run_report(empty)
    assert rc == 2 and "holds no training or validation records" in err
    assert not (empty / "report.png").exists() and not (empty / "report.html").exists()

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n')
    rc, err = run_report(broken)
    assert rc == 2 and f"{broken / 'metrics.jsonl'}:2: not a JSON record" in err

    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    rc, err = run_report(broken)
    assert rc == 2 and "needs matplotlib: pip install 'shoal[report]'" in err
    assert list(broken.iterdir()) == [broken / "metrics.jsonl"]  # nothing half-written
