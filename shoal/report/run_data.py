"""What `shoal report` reads from an experiment folder: metrics.jsonl, config.yaml, checkpoint names.

`metrics.jsonl` (written by `shoal.train.metrics.MetricsLogger`) holds one JSON record per logged
step: training records carry `loss`, `lr`, `grad_norm`, `tokens_per_s_per_gpu`, `consumed_samples`
(and `mfu`, `memory_gib` on GPU); validation records carry `val_loss`. Each record also carries
`elapsed_s`, the seconds since that process began logging. A resumed run first drops the records
past the checkpoint it resumes from, then appends its own, so a resume shows as `elapsed_s`
going back (a new run segment); a file appended to without that truncation shows it as the step
going back. Both are treated as the start of a new segment.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.errors import ShoalError

# The series a report plots, in the order of its panels.
TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s_per_gpu")
# Checkpoint folder names (shoal.checkpoint.training.checkpoint_name), read without importing the
# training stack.
_CHECKPOINT_NAME = re.compile(r"^step=(\d+)(?:-val_loss=([0-9.]+|nan|inf))?(-last)?$")


@dataclass
class Series:
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)


@dataclass(frozen=True)
class Checkpoint:
    name: str
    step: int
    val_loss: float | None


@dataclass
class RunData:
    """An experiment's metrics as plotted, plus what its summary table needs."""

    experiment_dir: Path
    series: dict[str, Series]  # every numeric key of the records, by name
    resumed_at: list[int]  # the last step kept before each new run segment
    segment_seconds: list[float]  # wall time of each segment, when records carry elapsed_s
    seq_length: int | None
    stage: str | None
    model: str | None
    checkpoints: list[Checkpoint]

    def tokens_at(self) -> Series:
        """Tokens seen after each training step: consumed samples × sequence length."""
        samples = self.series.get("consumed_samples", Series())
        if self.seq_length is None:
            return Series()
        return Series(list(samples.steps), [v * self.seq_length for v in samples.values])

    @property
    def wall_seconds(self) -> float | None:
        return sum(self.segment_seconds) if self.segment_seconds else None

    @property
    def best_checkpoint(self) -> Checkpoint | None:
        """Lowest validation loss in the name; without any, the latest."""
        scored = [c for c in self.checkpoints if c.val_loss is not None and math.isfinite(c.val_loss)]
        if scored:
            return min(scored, key=lambda c: (c.val_loss, -c.step))
        return max(self.checkpoints, key=lambda c: c.step) if self.checkpoints else None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, refusing a line that is not a JSON object with a step."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ShoalError(f"{path}:{number}: not a JSON record ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ShoalError(f"{path}:{number}: expected a JSON object with an integer \"step\"")
            records.append(record)
    return records


def _segment_starts(records: list[dict[str, Any]]) -> list[int]:
    """Indices of the records that begin a new run segment (the first record excluded)."""
    starts = []
    for i in range(1, len(records)):
        before, now = records[i - 1], records[i]
        elapsed_back = "elapsed_s" in before and "elapsed_s" in now and now["elapsed_s"] < before["elapsed_s"]
        if elapsed_back or now["step"] < before["step"]:
            starts.append(i)
    return starts


def _resumed_from(before: dict[str, Any], first: dict[str, Any]) -> int:
    """The step a new segment continues from: the last record kept by the truncation, or (when the
    file was not truncated and the step went back) the step before the segment's first record."""
    return first["step"] - 1 if first["step"] <= before["step"] else before["step"]


def _read_config(experiment_dir: Path) -> dict[str, Any]:
    path = experiment_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ShoalError(f"{path}: not valid YAML ({err})") from None
    return tree if isinstance(tree, dict) else {}


def _read_checkpoints(folder: Path) -> list[Checkpoint]:
    found = []
    if folder.is_dir():
        for child in sorted(folder.iterdir()):
            m = _CHECKPOINT_NAME.match(child.name)
            if m and child.is_dir():
                found.append(Checkpoint(child.name, int(m.group(1)), float(m.group(2)) if m.group(2) else None))
    return found


def load_run(experiment_dir: Path) -> RunData:
    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        raise ShoalError(f"{experiment_dir} is not a directory; expected an experiment folder (results/EXPERIMENT)")
    metrics = experiment_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ShoalError(
            f"{experiment_dir} is not a shoal experiment: it has no metrics.jsonl "
            "(written by `shoal pretrain` / `shoal finetune`)"
        )
    records = read_records(metrics)
    if not any(isinstance(r.get(k), (int, float)) for r in records for k in ("loss", "val_loss")):
        raise ShoalError(f"{metrics} holds no training or validation records yet; nothing to report")

    starts = _segment_starts(records)
    bounds = [0, *starts, len(records)]
    segment_seconds = []
    for a, b in zip(bounds, bounds[1:]):
        elapsed = [r["elapsed_s"] for r in records[a:b] if isinstance(r.get("elapsed_s"), (int, float))]
        if elapsed:
            segment_seconds.append(max(elapsed))
    series: dict[str, Series] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("step", "elapsed_s") and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, Series()).add(record["step"], float(value))

    config = _read_config(experiment_dir)
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    seq = data.get("seq_length")
    return RunData(
        experiment_dir=experiment_dir,
        series=series,
        resumed_at=[_resumed_from(records[i - 1], records[i]) for i in starts],
        segment_seconds=segment_seconds,
        seq_length=seq if isinstance(seq, int) else None,
        stage=config.get("stage"),
        model=model.get("preset") or model.get("checkpoint") or model.get("hf_model_id"),
        checkpoints=_read_checkpoints(experiment_dir / "checkpoints"),
    )
