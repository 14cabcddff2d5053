"""The record of an experiment's runs: which settings each segment used, and where old runs go.

    EXPERIMENT/runs.jsonl     one line per run segment (a first start, or a resume), appended
                              when the segment starts training: its first step, the settings that
                              fix what the saved data position means, the layout, and the whole
                              resolved recipe (config.yaml holds only the newest)
    EXPERIMENT/runs/<n>/      an earlier run's checkpoints/, metrics.jsonl, runs.jsonl, config.yaml
                              and tensorboard/, moved there when a new run starts (checkpoint.new_run)

A checkpoint's data position is a count of global samples. It points at the same data only while
the global batch size, the sequence length, the datasets, the data seed and split (and packing,
for fine-tuning) stay the same, so a resume that changes one of them is refused unless the user
says so; other changes (learning rate, layout, max_steps) are logged.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from shoal.checkpoint.catalog import CHECKPOINTS_DIR, list_checkpoints
from shoal.config.recipe import Recipe
from shoal.errors import ShoalError

RUNS_FILE = "runs.jsonl"
OLD_RUNS_DIR = "runs"
# What moves with a run when a new one starts in the same experiment.
RUN_RECORDS = (CHECKPOINTS_DIR, "metrics.jsonl", RUNS_FILE, "config.yaml", "tensorboard")

# Settings whose change moves the meaning of "N samples consumed": (key, the flag users know).
DATA_POSITION = {
    "global_batch_size": "--global_batch_size",
    "seq_length": "--seq_length",
    "dataset_path": "--dataset_path",
    "data_seed": "--data.seed",
    "split": "--data.split",
    "pack_sequences": "--data.pack_sequences",
}
LOGGED = ("micro_batch_size", "max_steps", "lr", "world_size", "layout")


def _dataset_paths(paths: list[str]) -> list[str]:
    """Resolved paths (two spellings of one folder are one dataset); blend weights as they are."""
    out = []
    for p in paths:
        try:
            float(p)
            out.append(p)
        except ValueError:
            out.append(str(Path(p).resolve()))
    return out


def segment_settings(recipe: Recipe, world_size: int, layout: dict[str, int]) -> dict[str, Any]:
    d, t = recipe.data, recipe.train
    settings = {"global_batch_size": t.global_batch_size, "seq_length": d.seq_length,
                "dataset_path": _dataset_paths(list(d.dataset_path)), "data_seed": d.seed, "split": d.split,
                "micro_batch_size": t.micro_batch_size, "max_steps": t.max_steps, "lr": t.lr,
                "world_size": world_size, "layout": layout}
    if recipe.stage == "finetune":
        settings["pack_sequences"] = d.pack_sequences
    else:
        settings.pop("pack_sequences", None)
    return settings


def read_segments(experiment_dir: Path) -> list[dict[str, Any]]:
    path = experiment_dir / RUNS_FILE
    if not path.is_file():
        return []
    segments = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            segments.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ShoalError(f"{path}:{number}: not valid JSON ({err.msg}); the file records each run segment's "
                             "settings, fix or remove that line") from None
    return segments


def _previous_settings(experiment_dir: Path) -> tuple[dict[str, Any], str] | None:
    """The settings of the segment a resume continues, and where they were read from."""
    segments = read_segments(experiment_dir)
    if segments:
        last = segments[-1]
        return last.get("settings", {}), f"{RUNS_FILE}, the segment that started at step {last.get('start_step')}"
    config = experiment_dir / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    # An experiment from before runs.jsonl: its config.yaml is the one record of the settings.
    try:
        tree = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return None
    data, train = tree.get("data") or {}, tree.get("train") or {}
    found = {"global_batch_size": train.get("global_batch_size"), "seq_length": data.get("seq_length"),
             "dataset_path": _dataset_paths([str(p) for p in data.get("dataset_path") or []]),
             "data_seed": data.get("seed"), "split": data.get("split")}
    if tree.get("stage") == "finetune":
        found["pack_sequences"] = data.get("pack_sequences")
    return {k: v for k, v in found.items() if v is not None}, "config.yaml"


def _show(value: Any) -> str:
    return " ".join(value) if isinstance(value, list) else str(value)


def check_resumed_settings(recipe: Recipe, experiment_dir: Path, settings: dict[str, Any], step: int,
                           *, verbose: bool) -> None:
    """Refuse a resume whose data-position settings differ from the run so far; log other changes."""
    previous = _previous_settings(experiment_dir)
    if previous is None:
        return
    before, source = previous
    changed = [k for k in DATA_POSITION if k in before and k in settings and before[k] != settings[k]]
    if changed and not recipe.checkpoint.allow_changed_data:
        lines = [f"{DATA_POSITION[k]} is {_show(settings[k])}, the run so far used {_show(before[k])}" for k in changed]
        raise ShoalError(
            f"cannot resume {experiment_dir} at step {step}: " + "; ".join(lines) + f" (recorded in {source}). "
            "The saved data position counts samples of those settings and would point elsewhere in the data. "
            "Use the same settings, start a new --experiment, start a new run in this one "
            "(--checkpoint.new_run=true keeps the old one under runs/), or resume anyway "
            "(--checkpoint.allow_changed_data=true)"
        )
    if verbose:
        for k in changed:
            print(f"shoal: warning: resuming with {DATA_POSITION[k]} {_show(settings[k])} (was {_show(before[k])}), "
                  "as --checkpoint.allow_changed_data=true allows; the data seen from here differs", file=sys.stderr)
        for k in LOGGED:
            if k in before and before[k] != settings.get(k):
                print(f"shoal: resuming with {k} {settings.get(k)} (was {before[k]})", file=sys.stderr)


def has_run(experiment_dir: Path) -> bool:
    return bool(list_checkpoints(experiment_dir / CHECKPOINTS_DIR))


def check_new_run(recipe: Recipe, experiment_dir: Path) -> None:
    """resume=false in an experiment with checkpoints: refused unless a new run was asked for."""
    ck = recipe.checkpoint
    if ck.resume and not ck.new_run or not has_run(experiment_dir):
        return
    if not ck.new_run:
        last = list_checkpoints(experiment_dir / CHECKPOINTS_DIR)[-1]
        raise ShoalError(
            f"--checkpoint.resume=false, but {experiment_dir} has checkpoints (the latest {last.path.name}); "
            "resume it (drop --checkpoint.resume=false), use a new --experiment, or pass --checkpoint.new_run=true "
            f"to keep the old run under {experiment_dir / OLD_RUNS_DIR}/<n>/ and start a new one here"
        )


def archive_run(experiment_dir: Path) -> Path | None:
    """Move the experiment's current run records to `runs/<n>/` (n one past the highest there)."""
    present = [experiment_dir / name for name in RUN_RECORDS if (experiment_dir / name).exists()]
    if not present:
        return None
    old = experiment_dir / OLD_RUNS_DIR
    numbers = [int(p.name) for p in old.iterdir() if p.name.isdigit()] if old.is_dir() else []
    dest = old / str(max(numbers, default=0) + 1)
    dest.mkdir(parents=True)
    for path in present:  # renames within one folder: nothing is copied, nothing half-moved is lost
        path.rename(dest / path.name)
    return dest


def begin_segment(recipe: Recipe, experiment_dir: Path, settings: dict[str, Any], step: int,
                  recipe_tree: dict[str, Any]) -> None:
    """Rank 0, once every check has passed: a new run's old records moved aside, then this segment
    appended to runs.jsonl (its settings and whole resolved recipe)."""
    if recipe.checkpoint.new_run and has_run(experiment_dir):
        dest = archive_run(experiment_dir)
        print(f"shoal: starting a new run in {experiment_dir}; the previous run is kept in {dest}", file=sys.stderr)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    record = {"start_step": step, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stage": recipe.stage,
              "settings": settings, "recipe": recipe_tree}
    with open(experiment_dir / RUNS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
